"""Hostile or odd inputs to ``mergelab merge``: never a silent wrong merge, never a lost file, never a traceback.

Each test is one class of attack from issue 11; the checks go through the CLI (exit code, one ``error:``
paragraph, nothing written) unless the point is the library function itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import (
    assert_clean_message,
    assert_ok,
    assert_refused,
    leftovers,
    load_folder,
    load_output,
    run_cli,
    save_model_folder,
    write_config,
)
from tiny_models import tiny_tokenizer

Families = dict[str, tuple[Path, list[Path]]]


def _linear(models: list[Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "linear", "models": [{"model": str(p)} for p in models], **extra}


def _ties(base: Path, models: list[Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in models], **extra}


def _refuse(tmp_path: Path, config: dict[str, Any], *fragments: str, code: int | None = None) -> str:
    out = tmp_path / "out"
    result = run_cli(write_config(tmp_path, config), out)
    text = assert_refused(result, out, *fragments)
    if code is not None:
        assert result.exit_code == code, (result.exit_code, text)
    return text


def _sharded_copy(src: Path, dst: Path, weight_map_edit: Any = None) -> Path:
    """``src``'s tensors split into two shards plus an index, optionally with an edited weight map."""
    state = load_folder(src)
    names = sorted(state)
    half = len(names) // 2
    dst.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, part in shards.items():
        save_file({n: state[n].contiguous() for n in part}, str(dst / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    if weight_map_edit is not None:
        weight_map = weight_map_edit(weight_map)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy2(src / "config.json", dst / "config.json")
    return dst


# -- merges with nothing in them ---------------------------------------------------------------------------
def test_empty_weight_map_is_refused(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    empty = _sharded_copy(fts[0], tmp_path / "empty", lambda wm: {})
    _refuse(tmp_path, _linear([empty, fts[1]]), str(empty), "lists no tensors", code=1)


def test_checkpoint_with_zero_tensors_is_refused(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    nothing = tmp_path / "nothing.safetensors"
    save_file({}, str(nothing))
    _refuse(tmp_path, _linear([nothing, fts[1]]), str(nothing), "holds no tensors")


# -- shard indexes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("escape", ["../elsewhere/x.safetensors", "ABSOLUTE", "sub/../../x.safetensors",
                                    "..\\x.safetensors"])
def test_shard_paths_must_stay_inside_the_model_folder(families: Families, tmp_path: Path, escape: str) -> None:
    _, fts = families["llama"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"model.norm.weight": torch.ones(32)}, str(outside / "x.safetensors"))
    target = str(outside / "x.safetensors") if escape == "ABSOLUTE" else escape

    def redirect(wm: dict[str, str]) -> dict[str, str]:
        wm["model.norm.weight"] = target
        return wm
    model = _sharded_copy(fts[0], tmp_path / "model" / "evil", redirect)
    _refuse(tmp_path, _linear([model, fts[1]]), f"shard '{target}' is not a file name inside")


def test_tensor_listed_in_the_index_but_in_no_shard_is_refused(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]

    def phantom(wm: dict[str, str]) -> dict[str, str]:
        return {**wm, "model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}
    model = _sharded_copy(fts[0], tmp_path / "phantom", phantom)
    _refuse(tmp_path, _linear([model, fts[1]]), "model.layers.9.mlp.up_proj.weight", "no shard holds it")


def test_index_and_shards_that_disagree_are_refused(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]

    def swapped(wm: dict[str, str]) -> dict[str, str]:
        return {**wm, "lm_head.weight": "model-00002-of-00002.safetensors"
                if wm["lm_head.weight"].startswith("model-00001") else "model-00001-of-00002.safetensors"}
    _refuse(tmp_path, _linear([_sharded_copy(fts[0], tmp_path / "swapped", swapped), fts[1]]),
            "lm_head.weight", "but it is in")

    def unlisted(wm: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in wm.items() if k != "model.norm.weight"}
    _refuse(tmp_path, _linear([_sharded_copy(fts[0], tmp_path / "unlisted", unlisted), fts[1]]),
            "model.norm.weight", "does not list")


# -- files named for another format -------------------------------------------------------------------------
def test_safetensors_file_named_bin_is_read_as_safetensors(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    folder = tmp_path / "renamed"
    folder.mkdir()
    shutil.copy2(fts[0] / "model.safetensors", folder / "pytorch_model.bin")
    shutil.copy2(fts[0] / "config.json", folder / "config.json")
    lone = tmp_path / "weights.bin"
    shutil.copy2(fts[1] / "model.safetensors", lone)
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, _linear([folder, lone])), out))
    reference = tmp_path / "reference"
    assert_ok(run_cli(write_config(tmp_path, _linear(fts[:2]), "ref.yml"), reference))
    a, b = load_output(out), load_output(reference)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_pickle_named_safetensors_is_loaded_safely(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    disguised = tmp_path / "model.safetensors"
    torch.save(load_folder(fts[0]), disguised)
    assert_ok(run_cli(write_config(tmp_path, _linear([disguised, fts[1]])), tmp_path / "out"))


# -- --overwrite never replaces what the user owns ------------------------------------------------------------
def _copy_family(families: Families, tmp_path: Path) -> tuple[Path, list[Path]]:
    base, fts = families["llama"]
    shutil.copytree(base, tmp_path / "base")
    for i, p in enumerate(fts):
        shutil.copytree(p, tmp_path / f"ft{i}")
    return tmp_path / "base", [tmp_path / f"ft{i}" for i in range(len(fts))]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("victim", ["tokenizer_source", "config folder", "config file", "linear base",
                                    "parent of an input", "symlink to an input", "working directory"])
def test_overwrite_never_replaces_an_input_config_or_tokenizer(families: Families, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    base, fts = _copy_family(families, tmp_path / "models")
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer", ["a", "b"])
    tiny_tokenizer(base, ["a", "c"])
    config_dir = tmp_path / "configs"
    config = _ties(base, fts, tokenizer_source=str(tokenizer))
    if victim == "linear base":
        config = {**_linear(fts), "base_model": str(base)}
    config_path = write_config(config_dir, config)
    out = {"tokenizer_source": tokenizer, "config folder": config_dir, "config file": config_path,
           "linear base": base, "parent of an input": tmp_path / "models", "symlink to an input": tmp_path / "link",
           "working directory": tmp_path / "models"}[victim]
    if victim == "symlink to an input":
        out.symlink_to(fts[1])
    if victim == "working directory":
        monkeypatch.chdir(out)
    before = {p: _snapshot(p) for p in (tmp_path / "models", tokenizer, config_dir)}
    result = run_cli(config_path, out, "--overwrite")
    text = assert_clean_message(result)
    assert "writing the merge there would replace" in text and str(out) in text
    assert {p: _snapshot(p) for p in before} == before
    assert leftovers(out) == []


def test_overwriting_a_symlinked_output_replaces_the_link_not_its_target(families: Families,
                                                                          tmp_path: Path) -> None:
    base, fts = families["llama"]
    target = tmp_path / "somewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.symlink_to(target)
    result = run_cli(write_config(tmp_path, _ties(base, fts)), out, "--overwrite")
    assert_ok(result)
    assert "was a symbolic link to" in result.output and "left as it was" in result.output
    assert not out.is_symlink() and (out / "model.safetensors").is_file()
    assert (target / "keep.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert leftovers(out) == [], "no stray .old entry"


def test_dangling_symlink_output_needs_overwrite_and_is_replaced(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    config = write_config(tmp_path, _ties(base, fts))
    assert "--overwrite" in assert_clean_message(run_cli(config, out))
    assert_ok(run_cli(config, out, "--overwrite"))
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_overwrite_replaces_an_earlier_merge_with_every_file_it_wrote(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, _ties(base, fts)), out, "--max-shard-size", "20KB"))
    first = json.loads((out / "mergelab.json").read_text())["files"]
    assert first == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len([f for f in first if f.startswith("model-")]) > 1, "the first merge is sharded"
    assert_ok(run_cli(write_config(tmp_path, _linear(fts), "linear.yml"), out, "--overwrite"))
    second = json.loads((out / "mergelab.json").read_text())
    assert second["method"] == "linear" and "model.safetensors" in second["files"]
    assert sorted(p.name for p in out.iterdir()) == second["files"], "no stale shard of the first merge is left"
    assert leftovers(out) == []


@pytest.mark.parametrize("added", ["notes.txt", "sub/notes.txt", "empty folder/", "link"])
def test_overwrite_refuses_an_earlier_merge_holding_a_file_it_did_not_write(families: Families, tmp_path: Path,
                                                                            added: str) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    config = write_config(tmp_path, _ties(base, fts))
    assert_ok(run_cli(config, out))
    if added == "link":
        (out / added).symlink_to(tmp_path)
    elif added.endswith("/"):
        (out / added).mkdir()
    else:
        (out / added).parent.mkdir(exist_ok=True)
        (out / added).write_text("mine")
    before = _snapshot(out)
    text = assert_clean_message(run_cli(config, out, "--overwrite"))
    assert f"holds files no merge wrote there: {added}" in text and "never deletes" in text
    assert _snapshot(out) == before and (out / added.rstrip("/")).exists() and leftovers(out) == []


@pytest.mark.parametrize("what", ["model folder", "file", "old record"])
def test_overwrite_refuses_what_no_merge_wrote(families: Families, tmp_path: Path, what: str) -> None:
    """A model folder that is not an input (an earlier fine-tune, a mergekit output) is the user's too."""
    base, fts = families["llama"]
    out = tmp_path / "out"
    if what == "model folder":
        shutil.copytree(fts[0], out)
    elif what == "file":
        out.write_text("my thesis")
    else:  # a record of an older mergelab lists no files: what it wrote is known by name
        assert_ok(run_cli(write_config(tmp_path, _ties(base, fts)), out, "--max-shard-size", "20KB"))
        record = json.loads((out / "mergelab.json").read_text())
        del record["files"]
        (out / "mergelab.json").write_text(json.dumps(record))
        (out / "train.log").write_text("mine")
    before = _snapshot(out) if out.is_dir() else out.read_bytes()
    text = assert_clean_message(run_cli(write_config(tmp_path, _linear(fts)), out, "--overwrite"))
    expected = {"model folder": "is not the output of a merge", "file": "is a file, not the output folder",
                "old record": "holds files no merge wrote there: train.log"}[what]
    assert expected in text and str(out) in text
    assert (_snapshot(out) if out.is_dir() else out.read_bytes()) == before and leftovers(out) == []
    if what == "old record":  # without the user's file, the older merge is replaced
        (out / "train.log").unlink()
        assert_ok(run_cli(write_config(tmp_path, _linear(fts)), out, "--overwrite"))
        assert sorted(p.name for p in out.iterdir()) == json.loads((out / "mergelab.json").read_text())["files"]


def test_a_file_put_into_the_old_output_during_the_merge_stops_the_swap(families: Families,
                                                                         tmp_path: Path) -> None:
    """The check runs again just before the swap: a merge may take an hour, and OUT is the user's meanwhile."""
    from mergelab.errors import OutputError
    from mergelab.merge.engine import run_merge
    from mergelab.merge.install import install

    base, fts = families["llama"]
    out = tmp_path / "out"
    run_merge(_ties(base, fts), out, progress=False)
    tmp = tmp_path / ".out.tmp-1"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"new merge")
    (out / "notes.txt").write_text("written while the merge ran")
    before = _snapshot(out)
    with pytest.raises(OutputError, match=r"notes\.txt"):
        install(tmp, out, overwrite=True)
    assert _snapshot(out) == before and (tmp / "model.safetensors").read_bytes() == b"new merge"


def test_a_folder_of_the_old_output_that_cannot_be_listed_counts_as_the_users(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What an unreadable folder holds is unknown: --overwrite must not replace it (root reads every folder, so
    the refusal to list it is simulated)."""
    import os

    from mergelab.errors import OutputError
    from mergelab.merge.install import check_replaceable

    out = tmp_path / "out"
    (out / "locked").mkdir(parents=True)
    (out / "locked" / "model.safetensors").write_bytes(b"x")
    (out / "mergelab.json").write_text(json.dumps({"files": ["mergelab.json", "locked/model.safetensors"]}))
    check_replaceable(out, overwrite=True)  # listed: every file is the merge's
    scandir = os.scandir

    def refusing(path: Any = ".") -> Any:
        if Path(path) == out / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(OutputError, match="holds files no merge wrote there: locked/"):
        check_replaceable(out, overwrite=True)


def test_an_empty_output_folder_is_replaced_with_overwrite(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    out.mkdir()
    assert_ok(run_cli(write_config(tmp_path, _ties(base, fts)), out, "--overwrite"))
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


# -- linear's base_model ---------------------------------------------------------------------------------------
def test_linear_copies_config_and_tokenizer_from_its_base_model(families: Families, tmp_path: Path) -> None:
    base_src, fts = families["llama"]
    base = tmp_path / "base"
    shutil.copytree(base_src, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "marker": "from the base"}))
    (base / "tokenizer.json").write_text('{"from": "base"}')
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, {**_linear(fts), "base_model": str(base)}), out))
    assert json.loads((out / "config.json").read_text())["marker"] == "from the base"
    assert (out / "tokenizer.json").read_text() == '{"from": "base"}'
    merged, first = load_output(out), load_folder(fts[0])
    assert set(merged) == set(first)  # the base is not merged: linear ignores it for the weights


def test_linear_with_a_missing_base_model_is_refused(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    _refuse(tmp_path, {**_linear(fts), "base_model": str(tmp_path / "no-base")}, "base_model", "no-base",
            "no such file or folder")


# -- layer counts that disagree with the tensors ----------------------------------------------------------------
def test_num_layers_smaller_than_the_tensors_is_refused(families: Families, tmp_path: Path) -> None:
    base_src, fts = families["llama"]
    base = save_model_folder(tmp_path / "base", load_folder(base_src), base_src)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    config = _ties(base, fts, parameters={"lambda": [0.5, 1.0]})
    _refuse(tmp_path, config, "num_hidden_layers", "model.layers.2")


# -- devices ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["meta", "cuda:99", "[bold]x:smile:", "mps"])
def test_unusable_devices_are_refused_with_a_usage_error(families: Families, tmp_path: Path, device: str) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    result = run_cli(write_config(tmp_path, _ties(base, fts)), out, "--device", device)
    text = assert_refused(result, out, f"--device {device}")
    assert result.exit_code == 2, text


# -- non-finite inputs let through to a method that cannot take them ---------------------------------------------
def test_nonfinite_input_allowed_into_an_svd_is_a_clean_error_naming_the_tensor(families: Families,
                                                                                  tmp_path: Path) -> None:
    base, fts = families["llama"]
    state = load_folder(fts[0])
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    nan = save_model_folder(tmp_path / "nan", state, fts[0])
    config = {"merge_method": "cart", "base_model": str(base), "models": [{"model": str(p)} for p in [nan, *fts[1:]]]}
    out = tmp_path / "out"
    result = run_cli(write_config(tmp_path, config), out, "--allow-nonfinite")
    assert_refused(result, out, "method 'cart' cannot merge tensor 'model.layers.0.mlp.up_proj.weight'")
    assert result.exit_code == 1


# -- odd pickles and paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [3, "__metadata__", ("a", "b")])
def test_pickled_state_dict_keys_that_cannot_be_tensor_names_are_refused(families: Families, tmp_path: Path,
                                                                         key: object) -> None:
    _, fts = families["llama"]
    odd = tmp_path / "odd.pt"
    torch.save({**load_folder(fts[0]), key: torch.ones(2)}, odd)
    _refuse(tmp_path, _linear([odd, fts[1]]), str(odd), "not tensor names")


def test_sparse_tensor_in_a_pickle_is_refused(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    odd = tmp_path / "sparse.pt"
    torch.save({**load_folder(fts[0]), "model.norm.weight": torch.ones(32).to_sparse()}, odd)
    _refuse(tmp_path, _linear([odd, fts[1]]), str(odd), "model.norm.weight", "dense")


def test_a_nul_byte_in_a_model_path_is_a_clean_error(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    config = tmp_path / "nul.yml"
    config.write_text(f'merge_method: linear\nmodels:\n  - model: "{fts[0]}\\0x"\n  - model: {fts[1]}\n')
    out = tmp_path / "out"
    assert_refused(run_cli(config, out), out, "llama-ft0", "no such file or folder")


# -- files copied beside the weights ------------------------------------------------------------------------------
def test_links_out_of_the_model_folder_are_not_copied_into_the_merge(families: Families, tmp_path: Path) -> None:
    """A model folder whose tokenizer.json (or any extra file) links to a private file must not smuggle that
    file into the merged model the user will share."""
    base_src, fts = families["llama"]
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY")
    base = tmp_path / "base"
    shutil.copytree(base_src, base)
    (base / "tokenizer.json").symlink_to(secret)
    (base / "notes.txt").symlink_to(secret)
    (base / "inside.txt").write_text("fine")
    (base / "alias.txt").symlink_to(base / "inside.txt")  # a link inside the folder is fine
    out = tmp_path / "out"
    result = run_cli(write_config(tmp_path, _ties(base, fts)), out)
    assert_ok(result)
    assert "outside the model folder" in result.output
    assert not any("PRIVATE KEY" in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert (out / "inside.txt").read_text() == "fine" and (out / "alias.txt").read_text() == "fine"


def test_hugging_face_cache_links_into_blobs_are_copied(families: Families, tmp_path: Path) -> None:
    base_src, fts = families["llama"]
    entry = tmp_path / "hub" / "models--org--base"
    snapshot = entry / "snapshots" / "abc123"
    (entry / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in base_src.iterdir():
        shutil.copy2(f, entry / "blobs" / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    (entry / "blobs" / "tok").write_text('{"tokenizer": 1}')
    (snapshot / "tokenizer.json").symlink_to(Path("../../blobs/tok"))
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, _ties(snapshot, fts)), out))
    assert (out / "tokenizer.json").read_text() == '{"tokenizer": 1}'


@pytest.mark.parametrize("where", ["folder", "direct", "shard"])
def test_a_fifo_or_device_as_checkpoint_is_refused_promptly_and_the_process_exits(
        families: Families, tmp_path: Path, where: str) -> None:
    # opening a FIFO for reading waits for a writer: the reader (and the digests started before torch is
    # imported) must never open one, or the merge, and then the interpreter's exit, would wait forever
    import os
    import subprocess
    import sys

    base, fts = families["llama"]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    model = tmp_path / "model"
    model.mkdir()
    if where == "folder":
        (model / "model.safetensors").symlink_to(fifo)
    elif where == "shard":
        (model / "model-00001-of-00001.safetensors").symlink_to(fifo)
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    spec = str(fifo) if where == "direct" else str(model)
    config = write_config(tmp_path, _linear([base, fts[0]]) | {"models": [{"model": str(base)}, {"model": spec}]})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    done = subprocess.run([sys.executable, "-m", "mergelab.cli", "merge", str(config), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "not a regular file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
