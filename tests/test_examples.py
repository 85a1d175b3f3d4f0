"""Every config in examples/ validates and runs on a tiny Llama-style family laid out as ./base, ./ft-a..."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import mergelab
from mergelab.merge.config import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yml"))


@pytest.fixture(scope="module")
def layout(families: dict[str, tuple[Path, list[Path]]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, fts = families["llama"]
    root = tmp_path_factory.mktemp("examples")
    (root / "base").symlink_to(base)
    for name, ft in zip(("ft-a", "ft-b", "ft-c"), fts):
        (root / name).symlink_to(ft)
    return root


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_runs(example: Path, layout: Path, tmp_path: Path) -> None:
    config = layout / example.name
    config.write_text(example.read_text())
    cfg, _ = load_config(config)
    result = mergelab.merge(config, tmp_path / "out", progress=False, hash_inputs=False)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(layout / "base" / "model.safetensors"))
    assert set(merged) == set(base)
    assert result.record["method"] == cfg.merge_method
    if cfg.out_dtype == "bfloat16":
        assert all(t.dtype.is_floating_point is False or str(t.dtype) == "torch.bfloat16" for t in merged.values())
