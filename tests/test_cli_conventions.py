"""The command line behaves as people expect: --version, python -m, -v/-q everywhere, flags without type
labels, defaults shown, --dry-run prints the plan and writes nothing."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import assert_refused, load_output, write_config
from mergelab.cli import app

COMMANDS = ["merge", "extract-lora", "eval", "example-models", "methods", "study", "search", "demo"]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "160"})
    return result.exit_code, result.output


def test_version_is_the_installed_distributions() -> None:
    code, out = _invoke("--version")
    assert code == 0 and out.strip() == f"mergelab {importlib.metadata.version('mergelab')}"


def test_python_dash_m_runs_the_same_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    done = subprocess.run([sys.executable, "-m", "mergelab", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("mergelab "), done.stderr


def test_shell_completion_is_offered() -> None:
    code, out = _invoke("--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_verbose_quiet_and_no_bool_labels(command: str) -> None:
    code, out = _invoke(command, "--help")
    assert code == 0, out
    assert "--verbose" in out and "-v" in out and "--quiet" in out and "-q" in out
    assert "<bool>" not in out
    assert "-h" in out  # -h works as --help


def test_defaults_are_shown() -> None:
    _, out = _invoke("merge", "--help")
    assert "[default: 5GB]" in out and "[default: cpu]" in out
    _, out = _invoke("study", "--help")
    assert "(default: vision)" in out
    _, out = _invoke("extract-lora", "--help")
    assert "[default: 16]" in out


def test_dry_run_prints_the_plan_and_writes_nothing(families: dict[str, tuple[Path, list[Path]]],
                                                    tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "ties", "base_model": str(base),
                                     "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in fts]})
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out = _invoke("merge", str(config), "--dry-run", "--max-shard-size", "30KB")
    assert code == 0, out
    n = len(load_output(base))
    assert f"{n} ({n} merged" in out and "shard(s)" in out and "peak memory" in out and "time on 2 CPU" in out
    shards = int(out.split(" shard(s)")[0].rsplit(" ", 1)[-1])
    assert shards > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # the same checks as a real merge: a bad input is refused
    bad = write_config(tmp_path, {"merge_method": "ties", "base_model": str(base),
                                  "models": [{"model": str(tmp_path / "nope")}]}, "bad.yml")
    result = CliRunner().invoke(app, ["merge", str(bad), "--dry-run"])
    assert_refused(result, tmp_path / "never", "nope")


def test_merge_without_out_is_a_usage_error(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path) -> None:
    _, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in fts]})
    code, out = _invoke("merge", str(config))
    assert code != 0 and "--out" in out


def test_verbosity_controls_log_messages(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                                     "models": [{"model": str(p)} for p in fts]})
    runner = CliRunner()
    loud = runner.invoke(app, ["merge", str(config), "-o", str(tmp_path / "a"), "-v"])
    assert loud.exit_code == 0 and "task_arithmetic: " in loud.output and "tensors from 4 input(s)" in loud.output
    quiet = runner.invoke(app, ["merge", str(config), "-o", str(tmp_path / "b"), "-q"])
    assert quiet.exit_code == 0 and "tensors from" not in quiet.output
