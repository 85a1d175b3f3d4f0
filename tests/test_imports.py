"""Heavy imports run with the cyclic garbage collector paused, and leave it as they found it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.imports import collector_paused


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_off_inside_and_as_it_was_after(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with collector_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_the_collector_is_restored_when_the_import_fails() -> None:
    assert gc.isenabled()
    with pytest.raises(ImportError), collector_paused():
        import mergelab._no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert gc.isenabled()


@pytest.mark.parametrize("disabled_before", [False, True])
def test_loading_the_compiled_loops_leaves_the_collector_as_it_was(disabled_before: bool) -> None:
    code = ("import gc\n" + ("gc.disable()\n" if disabled_before else "")
            + "from mergelab.kernels.dispatch import warm_up\nassert warm_up()\nprint(gc.isenabled())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(not disabled_before)


def test_exit_skips_the_collection_of_live_objects_and_still_flushes_open_files(tmp_path: Path) -> None:
    # a check registered before runs after (atexit is last in, first out): it sees the collector frozen
    code = ("import atexit, gc\nfrom mergelab.imports import no_collection_at_exit\n"
            "atexit.register(lambda: print(gc.isenabled(), gc.get_freeze_count() > 0))\n"
            "no_collection_at_exit()\nno_collection_at_exit()\n"
            f"f = open({str(tmp_path / 'left-open.txt')!r}, 'w')\nf.write('written')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
    assert (tmp_path / "left-open.txt").read_text() == "written"


@pytest.mark.parametrize("preset", [None, "3"])
def test_a_cli_merge_has_openblas_start_no_workers_unless_the_user_set_a_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str | None) -> None:
    from cli_helpers import assert_ok, run_cli, weighted_config, write_config
    from tiny_models import make_family

    if preset is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", preset)
    base, fts = make_family(tmp_path / "models", "llama", seed=0)
    assert_ok(run_cli(write_config(tmp_path, weighted_config("linear", base, fts)), tmp_path / "out"))
    assert os.environ["OPENBLAS_NUM_THREADS"] == (preset or "1")


@pytest.mark.parametrize("preset", [None, "2"])
def test_scipys_openblas_loaded_after_no_blas_workers_runs_one_thread_unless_told_otherwise(
        preset: str | None) -> None:
    pytest.importorskip("threadpoolctl")
    if preset is not None and (os.cpu_count() or 1) < int(preset):
        pytest.skip("fewer cores than the count asked for: OpenBLAS may start fewer threads")
    # scipy's own OpenBLAS, in scipy.libs (numpy's is in numpy.libs)
    code = ("from mergelab.imports import no_blas_workers; no_blas_workers(); import scipy.linalg; "
            "from threadpoolctl import threadpool_info; "
            "print(*[i['num_threads'] for i in threadpool_info() if 'scipy.libs' in i['filepath']])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.split() == [preset or "1"]
