"""Faults: a merge killed mid-write, a full disk, an interrupted merge; and byte-for-byte determinism."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import mergelab
from cli_helpers import assert_ok, assert_refused, leftovers, load_output, run_cli, write_config
from mergelab.io.writer import StreamingSafetensorsWriter
from mergelab.signals import Terminated
from mergelab.terminal import describe

Families = dict[str, tuple[Path, list[Path]]]


def _ties(base: Path, models: list[Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in models], **extra}


def _big_family(root: Path, n_models: int = 3, hidden: int = 256, layers: int = 4, vocab: int = 4096,
                inter: int = 768) -> tuple[Path, list[Path]]:
    """A Llama-shaped family of ~5M parameters (21 MB a model): big enough that a merge takes a while."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 2, hidden),
            p + "self_attn.v_proj.weight": (hidden // 2, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_size": hidden, "intermediate_size": inter, "vocab_size": vocab}
    folders = []
    for j in range(n_models + 1):
        folder = root / ("base" if j == 0 else f"ft{j}")
        folder.mkdir(parents=True)
        state = base if j == 0 else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders[0], folders[1:]


def _merge_caught_writing(tmp_path: Path, delay: float, n_models: int = 3) -> tuple[subprocess.Popen[bytes], Path,
                                                                                    Path, Path]:
    """(process, its temporary folder, OUT, config) of the real CLI in a child process, returned once it is
    writing shards (one complete, the next under way). Each tensor write is held back ``delay`` seconds so
    that, however fast the machine, the merge is still writing when the test's signal lands."""
    base, fts = _big_family(tmp_path / "family", n_models=n_models)
    config = write_config(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                                     "models": [{"model": str(p), "parameters": {"weight": 0.4}} for p in fts]})
    out = tmp_path / "merged"
    throttled_cli = ("import sys, time; from mergelab.io.writer import StreamingSafetensorsWriter as W; "
                     f"write = W.write; W.write = lambda self, n, t: (time.sleep({delay}), write(self, n, t))[1]; "
                     "from mergelab.cli import app; sys.argv[0] = 'mergelab'; app()")
    args = [sys.executable, "-c", throttled_cli, "merge", str(config), "-o", str(out), "-q",
            "--max-shard-size", "2MB"]
    # a suite started in the background (bash `... &`, nohup) hands its children SIGINT ignored, and the
    # merge then (rightly) ignores Ctrl-C: a terminal's merge gets the default, so the child starts with it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tmp = tmp_path / f".merged.tmp-{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp.glob("*.safetensors"))) < 2:
            assert proc.poll() is None, f"merge ended before the signal: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.005)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, tmp, out, config


# -- SIGKILL ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_merge_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    proc, tmp, out, config = _merge_caught_writing(tmp_path, delay=0.01)
    try:
        time.sleep(random.uniform(0.0, 0.1))  # >= 0.3 s of throttled writes are still to come
        assert proc.poll() is None, "merge finished before the kill; make the family bigger"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir(), "the killed merge's temporary folder should still be there"
    assert not out.exists(), "a killed merge must not leave OUT_DIR"
    assert not list(tmp_path.glob("merged*.safetensors"))
    # A killed process cannot clean up: only its hidden temporary folder may remain...
    assert set(leftovers(out)) <= {tmp.name}

    # ...and the next run removes it and completes normally.
    result = mergelab.merge(config, out, progress=False, max_shard_size="2MB")
    assert leftovers(out) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = load_output(out)
    assert set(index["weight_map"]) == set(merged) and len(merged) == result.tensors == 39
    assert all(torch.isfinite(t).all() for t in merged.values())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_sigterm_sighup_and_sigint_clean_up_and_exit_128_plus_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """Timeouts, batch schedulers and container stops send SIGTERM, a closed terminal SIGHUP: the merge stops
    as for Ctrl-C, removes its temporary folder, installs nothing and exits like a killed job (128 + N)."""
    proc, tmp, out, _ = _merge_caught_writing(tmp_path, delay=0.02, n_models=2)
    assert tmp.is_dir()
    try:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    message = stderr.decode()
    assert proc.returncode == 128 + sig, (proc.returncode, message)
    assert message.startswith("error:") and "Traceback" not in message, message
    assert not out.exists() and leftovers(out) == [], leftovers(out)


@pytest.mark.parametrize(("stop", "code"), [(Terminated(signal.SIGHUP), 129), (KeyboardInterrupt(), 130)])
def test_an_error_raised_while_a_signals_stop_unwinds_reports_the_stop(stop: BaseException, code: int) -> None:
    # the handler's exception can land inside a lock's code: the lock's __exit__ then raises in its place
    def unwinding() -> None:
        try:
            raise stop
        finally:
            raise RuntimeError("cannot release un-acquired lock")

    with pytest.raises(RuntimeError) as caught:
        unwinding()
    message, exit_code = describe(caught.value)
    assert exit_code == code and "no output was installed" in message and "bug" not in message
    assert describe(RuntimeError("cannot release un-acquired lock"))[1] == 1  # no stop behind it: a bug


def test_stale_temp_folders_of_dead_merges_are_removed(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-99999999"  # above Linux's pid_max: no such process
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a running merge of someone else: leave it alone
    other = tmp_path / ".other.tmp-99999999"  # not ours
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    assert_ok(run_cli(write_config(tmp_path, _ties(base, fts)), out))
    assert not dead.exists() and alive.exists() and other.exists()


# -- disk full and other I/O errors ---------------------------------------------------------------------------
def _failing_write(monkeypatch: pytest.MonkeyPatch, exc: BaseException, after: int = 3) -> list[str]:
    """Make the output writer raise ``exc`` once ``after`` tensors have been written."""
    written: list[str] = []
    original = StreamingSafetensorsWriter.write

    def write(self: StreamingSafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        if len(written) >= after:
            raise exc
        original(self, name, tensor)
        written.append(name)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", write)
    return written


def test_disk_full_is_a_clear_error_and_cleans_up(families: Families, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    written = _failing_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, _ties(base, fts)), out, "--max-shard-size", "20KB"), out,
                   "No space left on device", "disk is full", "temporary files were removed")
    assert len(written) == 3  # it did fail in the middle of writing


def test_failed_merge_removes_the_folders_it_created(families: Families, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    _failing_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    out = tmp_path / "new" / "deeper" / "out"
    assert_refused(run_cli(write_config(tmp_path, _ties(base, fts)), out), out, "No space left on device")
    assert not (tmp_path / "new").exists()


def test_disk_full_keeps_the_previous_output(families: Families, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    config = write_config(tmp_path, _ties(base, fts))
    assert run_cli(config, out).exit_code == 0  # the previous merge
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _failing_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), after=10)
    result = run_cli(config, out, "--overwrite")
    assert result.exit_code != 0 and "No space left on device" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []


def test_not_enough_free_space_is_refused_before_merging(families: Families, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    written = _failing_write(monkeypatch, AssertionError("nothing should be written"), after=0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, _ties(base, fts)), out), out, "not enough disk space",
                   "MB are free")
    assert written == []


def test_permission_error_on_install(families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.merge import engine

    def refuse(tmp: Path, out_dir: Path, overwrite: bool) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out_dir))

    monkeypatch.setattr(engine, "_install", refuse)
    base, fts = families["llama"]
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, _ties(base, fts)), out), out, "Permission denied",
                   "may write to that folder")


def test_interrupted_merge_cleans_up(families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    _failing_write(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mergelab.merge(_ties(base, fts), out, progress=False)
    assert not out.exists() and leftovers(out) == []


# -- determinism ---------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_tensors(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]

    def config(seed: int) -> dict[str, Any]:
        return {"merge_method": "dare_ties", "base_model": str(base), "seed": seed,
                "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 0.7}} for p in fts]}

    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        runs[name] = tmp_path / name
        assert_ok(run_cli(write_config(tmp_path, config(seed), f"{name}.yml"), runs[name], "--max-shard-size",
                          "40KB"))
    files_a = sorted(p.name for p in runs["a"].iterdir())
    assert files_a == sorted(p.name for p in runs["b"].iterdir())
    assert any(name.endswith(".safetensors") for name in files_a)
    for name in files_a:
        assert (runs["a"] / name).read_bytes() == (runs["b"] / name).read_bytes(), name
    a, c = load_output(runs["a"]), load_output(runs["c"])
    differ = [n for n in a if not torch.equal(a[n], c[n])]
    assert len(differ) > len(a) // 2, "another seed should drop other entries in most tensors"
