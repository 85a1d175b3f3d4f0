"""The CLI finds a config's input files without torch, to start their digests while torch is imported; what it
cannot find it leaves to the engine, and the engine's record is the same either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import assert_ok, run_cli, write_config
from mergelab.merge.inputs import config_input_files


def _write(path: Path, data: bytes = b"w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_files_follow_the_shard_index_not_every_file_in_the_folder(tmp_path: Path) -> None:
    model = tmp_path / "sharded"
    shards = [_write(model / f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]
    _write(model / "consolidated.safetensors")  # Mistral's repos ship one beside the shards: not read
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": shards[0].name, "b": shards[1].name, "c": shards[0].name}}))
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(model)}]})
    assert config_input_files(config) == shards


def test_paths_relative_to_the_config_every_document_and_no_duplicates(tmp_path: Path) -> None:
    one = _write(tmp_path / "cfg" / "one" / "model.safetensors")
    two = _write(tmp_path / "two.safetensors")
    config = tmp_path / "cfg" / "stages.yml"
    config.write_text("name: mid\nmerge_method: linear\nmodels:\n  - model: one\n  - model: " + str(two) + "\n"
                      "---\nmerge_method: slerp\nbase_model: mid\nmodels:\n  - model: one+lora\n"
                      "parameters: {t: 0.5}\n")
    assert config_input_files(config) == [one, two]


@pytest.mark.parametrize("text", ["merge_method: [", "- just\n- a list\n", "models: 7\n", "\x00\x01"])
def test_a_broken_config_gives_no_files_and_no_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "bad.yml"
    config.write_text(text)
    assert config_input_files(config) == []
    assert config_input_files(tmp_path / "missing.yml") == []


def test_missing_models_and_broken_indexes_are_left_to_the_engine(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    _write(broken / "model.safetensors.index.json", b"{not json")
    found = _write(tmp_path / "ok" / "model.safetensors")
    config = write_config(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "nowhere")}, {"model": str(broken)}, {"model": "org/not-cached"},
        {"model": str(tmp_path / "ok")}]})
    assert config_input_files(config) == [found]


def test_finding_the_files_imports_no_torch(tmp_path: Path) -> None:
    _write(tmp_path / "m" / "model.safetensors")
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path / "m")}]})
    code = ("import sys\nfrom pathlib import Path\nfrom mergelab.merge.inputs import config_input_files, "
            f"digests_started\nwith digests_started(config_input_files(Path({str(config)!r}))):\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_cli_records_every_input_digest_once_whether_found_early_or_not(
        sharded_family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import blake3

    monkeypatch.setenv("MERGELAB_HASH_CACHE", "off")
    base, fts = sharded_family
    # the base by a relative path from the working directory, which the early start resolves as the engine does
    monkeypatch.chdir(base.parent)
    config = write_config(tmp_path, {"merge_method": "task_arithmetic", "base_model": base.name,
                                     "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in fts]})
    assert len(config_input_files(config)) == sum(len(list(p.glob("*.safetensors"))) for p in (base, *fts))
    assert_ok(run_cli(config, tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "mergelab.json").read_text())
    # the base's path is relative
    digests = {str(Path(f).resolve()): d for f, d in record["input_digests"]["files"].items()}
    files = sorted(str(f.resolve()) for p in (base, *fts) for f in p.glob("*.safetensors"))
    assert sorted(digests) == files and record["input_digests"]["algorithm"] == "blake3"
    assert all(digests[f] == blake3.blake3(Path(f).read_bytes()).hexdigest() for f in files)


def test_a_multi_stage_config_with_models_not_a_list_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    # the stages' model references are read before any document is validated (a TypeError escaped here before)
    config = tmp_path / "stages.yml"
    config.write_text("name: mid\nmerge_method: linear\nmodels: 7\n---\nmerge_method: linear\nmodels:\n"
                      "  - model: mid\n")
    result = run_cli(config, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Input should be a valid list" in result.output and "bug in mergelab" not in result.output
    assert config_input_files(config) == []
