"""No traceback ever reaches the terminal: one ``error:`` paragraph, exit 2 for usage/config, 1 at run time.

``--debug`` (or ``MERGELAB_DEBUG=1``) adds the traceback. User text in messages prints literally: rich
markup (``[red]``, ``[/]``) and emoji codes (``:smile:``) in paths and names are not interpreted.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli_helpers import assert_clean_message, assert_ok, load_output, run_cli, write_config
from mergelab.cli import app
from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge import engine

Families = dict[str, tuple[Path, list[Path]]]


def _boom(exc: BaseException):  # type: ignore[no-untyped-def]
    def run_merge(*args: object, **kwargs: object) -> None:
        raise exc
    return run_merge


@pytest.mark.parametrize(("exc", "code", "fragment"), [
    (ConfigError("merge.yml: unknown key 'x'"), 2, "unknown key 'x'"),
    (CheckpointError("a.safetensors: truncated"), 1, "a.safetensors: truncated"),
    (TypeError("unsupported operand"), 1, "unexpected TypeError: unsupported operand"),
    (ZeroDivisionError("division by zero"), 1, "unexpected ZeroDivisionError"),
    (MemoryError(), 1, "out of memory"),
    (PermissionError(13, "Permission denied", "/x/out"), 1, "/x/out: Permission denied"),
    (BrokenPipeError(32, "Broken pipe", "/x/fifo"), 1, "/x/fifo: Broken pipe"),
    (RecursionError("maximum recursion depth exceeded"), 1, "unexpected RecursionError"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_any_exception_becomes_one_paragraph_with_its_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                exc: BaseException, code: int, fragment: str) -> None:
    monkeypatch.setattr(engine, "run_merge", _boom(exc))
    result = run_cli(write_config(tmp_path, {"merge_method": "linear"}), tmp_path / "out")
    text = assert_clean_message(result)
    assert result.exit_code == code and fragment in text, (result.exit_code, text)
    if code == 1 and not isinstance(exc, (CheckpointError, MemoryError, OSError)):
        assert "--debug" in text  # an unexpected error says how to get the traceback


@pytest.mark.parametrize("how", ["--debug", "MERGELAB_DEBUG"])
def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr(engine, "run_merge", _boom(TypeError("unsupported operand")))
    config = write_config(tmp_path, {"merge_method": "linear"})
    args = ["merge", str(config), "-o", str(tmp_path / "out"), "-q"]
    if how == "--debug":
        result = CliRunner().invoke(app, ["--debug", *args])
    else:
        result = CliRunner().invoke(app, args, env={"MERGELAB_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output and "error: unexpected TypeError" in result.output


def test_usage_errors_exit_2(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in fts]})
    assert run_cli(config, tmp_path / "out", "--device", "potato").exit_code == 2
    assert run_cli(config, tmp_path / "out", "--max-shard-size", "lots").exit_code == 2
    assert CliRunner().invoke(app, ["merge"]).exit_code == 2  # missing argument: typer's own usage error


def test_markup_and_emoji_codes_in_user_text_print_literally(families: Families, tmp_path: Path) -> None:
    folder = tmp_path / "[red]model[/]:smile:"
    result = run_cli(write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(folder)}]}),
                     tmp_path / "out")
    text = assert_clean_message(result)
    assert "[red]model[/]:smile:" in text.replace("\n", ""), text


def test_tensor_names_with_markup_merge_with_the_progress_bar_on(tmp_path: Path) -> None:
    """The progress bar shows tensor names: as markup, "[/]" would raise mid-merge (a traceback)."""
    models = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"[/]": torch.full((4,), float(i)), "[bold]x:smile:": torch.ones(2)}, str(path))
        models.append({"model": str(path)})
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(write_config(tmp_path, {"merge_method": "linear",
                                                                             "models": models})), "-o", str(out)])
    assert_ok(result)
    assert torch.equal(load_output(out)["[/]"], torch.full((4,), 0.5))


def test_warnings_print_as_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def warn_twice(*args: object, **kwargs: object) -> None:
        for _ in range(2):
            warnings.warn("model_stock: t = -3 is outside [0, 1]", UserWarning, stacklevel=1)
        raise ConfigError("stop here")
    monkeypatch.setattr(engine, "run_merge", warn_twice)
    result = run_cli(write_config(tmp_path, {"merge_method": "linear"}), tmp_path / "out")
    assert result.output.count("warning: model_stock: t = -3 is outside [0, 1]") == 1, result.output
    assert "UserWarning" not in result.output and ".py:" not in result.output



def test_a_reader_that_leaves_our_output_stops_the_command_without_a_word(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # `mergelab merge --help | head -40`: head leaves while we print; this said "error: Broken pipe; check the
    # path and its permissions", naming no path of the user's
    monkeypatch.setattr(engine, "run_merge", _boom(BrokenPipeError(32, "Broken pipe")))
    result = run_cli(write_config(tmp_path, {"merge_method": "linear"}), tmp_path / "out")
    assert result.exit_code == 1 and "error" not in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("args", [["merge", "--help"], ["--help"], ["methods"]])
def test_output_into_a_pipe_closed_at_once_ends_without_a_message(args: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mergelab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader left before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)  # 1 where a write hit the closed pipe (click's and typer's code)
    assert "error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


# the console script with an atexit duty of its own, which prints only if the interpreter's teardown runs
_WITH_TEARDOWN_MARK = ("import atexit, sys\n"
                       "atexit.register(lambda: print('teardown ran', file=sys.stderr, flush=True))\n"
                       "from mergelab.cli import run\n"
                       "sys.argv = ['mergelab', *sys.argv[1:]]\n"
                       "run()\n")


def _console_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WITH_TEARDOWN_MARK, *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_a_successful_merge_ends_the_process_at_once_with_everything_written_and_said(
        families: Families, tmp_path: Path) -> None:
    import json
    import os

    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                                     "models": [{"model": str(p)} for p in fts]})
    cache = tmp_path / "digests"
    done = _console_script("merge", str(config), "-o", str(tmp_path / "out"),
                           env={**os.environ, "MERGELAB_HASH_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert "teardown ran" not in done.stderr  # ended without the interpreter's teardown
    assert "wrote" in done.stdout and str(tmp_path / "out") in done.stdout  # the last line was flushed
    assert len(json.loads((tmp_path / "out" / "mergelab.json").read_text())["input_digests"]["files"]) == 1 + len(fts)
    in_process = tmp_path / "in-process"
    assert_ok(run_cli(config, in_process))
    assert load_output(tmp_path / "out").keys() == load_output(in_process).keys()
    assert all(load_output(tmp_path / "out")[k].equal(v) for k, v in load_output(in_process).items())
    assert sorted(p.suffix for p in cache.iterdir()) == [".json"] * (1 + len(fts))  # every entry whole, no .tmp


def test_a_failed_merge_and_other_commands_exit_through_the_teardown(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "ties", "base_model": str(base),
                                     "models": [{"model": str(p), "parameters": {"density": 7}} for p in fts]})
    failed = _console_script("merge", str(config), "-o", str(tmp_path / "out"))
    assert failed.returncode == 1 and "density" in failed.stderr + failed.stdout
    assert "teardown ran" in failed.stderr
    listed = _console_script("methods")
    assert listed.returncode == 0 and "ties" in listed.stdout and "teardown ran" in listed.stderr


def test_the_fast_exit_keeps_what_python_and_c_left_in_their_buffers() -> None:
    import os

    code = ("import ctypes, logging, sys\n"
            "from mergelab.imports import run_command, skip_teardown\n"
            "def main():\n"
            "    print('from python')\n"
            "    ctypes.CDLL(None).printf(b'from C\\n')\n"
            "    skip_teardown()\n"
            "    raise SystemExit(0)\n"
            "run_command(main)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # both streams buffered into the pipe
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["from C", "from python"]
