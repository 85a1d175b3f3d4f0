"""Helpers for the end-to-end, bad-input, fault and fuzz tests: run ``mergelab merge``, read its output."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from mergelab.cli import app

# The piece size of the tests that stream a merge in pieces and compare it with the whole merge: it crosses the
# tiny families' rows (32 and 64 entries) and the scalar passes' 50-entry test chunks, ends mid-row, and cuts
# each matrix (512 to 2,048 entries) into 3 to 10 pieces. Until 2026-12-03 these tests used 37 (and 7): the
# engine spends 1-5 ms of CPU per piece of the tiny Llama family whatever its size (linear 0.97 s, TIES 4.1 s
# for its 875 pieces of 37, against 0.05 and 0.15 s whole), and the streaming, side-by-side and kernels tests
# took 542 of the suite's 871 s (`pytest --durations=0`, 2 cores); 106 of 375 s since.
STREAM_PIECE = 211


def write_config(folder: Path, config: Mapping[str, Any], name: str = "merge.yml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def run_cli(config: Path, out: Path, *args: str) -> Result:
    """``mergelab merge CONFIG -o OUT -q ARGS`` in-process (monkeypatches apply)."""
    return CliRunner().invoke(app, ["merge", str(config), "-o", str(out), "-q", *args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"


def leftovers(out: Path) -> list[str]:
    """Hidden temporary or backup folders that a merge into ``out`` left beside it."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_clean_message(result: Result) -> str:
    """A user-facing error: non-zero exit, an ``error:`` paragraph, no traceback and no raw exception."""
    assert result.exit_code not in (0, None), result.output
    # CliRunner keeps an uncaught exception in result.exception; a handled error is only a SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.output.strip()
    assert text.startswith("error:"), text
    assert "Traceback" not in text and 'File "' not in text, text
    assert "\n\n" not in text, f"message should be one block of text:\n{text}"
    return text


def assert_refused(result: Result, out: Path, *fragments: str) -> str:
    """Refused with a clean message naming every fragment, and nothing written: no OUT, no temp folder."""
    text = assert_clean_message(result)
    for fragment in fragments:
        assert fragment.lower() in text.lower(), f"{fragment!r} not in message:\n{text}"
    assert not out.exists(), f"{out} was written"
    assert leftovers(out) == [], f"left behind: {leftovers(out)}"
    return text


def load_output(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (single file or shards)."""
    return load_output(folder)


def save_model_folder(folder: Path, state: Mapping[str, torch.Tensor], like: Path) -> Path:
    """A model folder holding ``state`` as ``model.safetensors``, with ``like``'s config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    shutil.copy2(like / "config.json", folder / "config.json")
    return folder


def weighted_config(method: str, base: Path, models: list[Path], **extra: Any) -> dict[str, Any]:
    """A merge of ``models`` onto ``base`` with weights 0.3, 0.5, 0.7, … (``extra``: more top-level keys)."""
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.3 + 0.2 * i}} for i, p in enumerate(models)],
            **extra}


def method_config(method: str, base: Path, fts: list[Path], **extra: Any) -> dict[str, Any]:
    """A config of ``method`` on the family ``base``, ``fts``: SLERP and NearSwap of the base and the first
    fine-tune (t 0.4), Model Stock of them all, the top-k and random-drop methods with densities 0.3, 0.6, 0.05
    (Breadcrumbs' with gamma 0.05; DELLA's 0.3, 0.6, 0.2 with epsilon 0.1), others weighted
    (:func:`weighted_config`)."""
    if method in ("slerp", "nearswap"):
        return {"merge_method": method, "base_model": str(base), "parameters": {"t": 0.4},
                "models": [{"model": str(base)}, {"model": str(fts[0])}], **extra}
    if method == "model_stock":
        return {"merge_method": method, "base_model": str(base), "models": [{"model": str(p)} for p in fts],
                **extra}
    config = weighted_config(method, base, fts, **extra)
    for i, model in enumerate(config["models"]):
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear"):
            model["parameters"]["density"] = [0.3, 0.6, 0.05][i]
        if method.startswith("della"):  # keep probabilities density ± epsilon inside (0, 1)
            model["parameters"].update({"density": [0.3, 0.6, 0.2][i], "epsilon": 0.1})
        if method.startswith("breadcrumbs"):
            model["parameters"]["gamma"] = 0.05
    return config


def assert_same_safetensors(a: Path, b: Path) -> None:
    """Two merged folders hold the same safetensors files, byte for byte."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
