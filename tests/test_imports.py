"""Heavy imports run with the cyclic garbage collector paused, and leave it as they found it."""

from __future__ import annotations

import gc
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
