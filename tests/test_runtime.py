"""The runtime policies every long-running entry point shares: the output-folder rule and plain progress lines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mergelab.errors import OutputExistsError
from mergelab.runtime import make_progress, prepare_output
from mergelab.search.run import run_search
from mergelab.studies import run_study
from mergelab.studies.demo import run_demo
from search_toy import make_problem


def _occupied(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("the user's file")
    return folder


def test_prepare_output_creates_refuses_and_overwrites_on_request(tmp_path: Path) -> None:
    assert prepare_output(tmp_path / "new" / "deep").is_dir()
    assert prepare_output(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"  # empty: fine
    busy = _occupied(tmp_path / "busy")
    with pytest.raises(OutputExistsError, match=r"not empty.*--overwrite"):
        prepare_output(busy)
    assert prepare_output(busy, overwrite=True) == busy and (busy / "mine.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_output(tmp_path / "file", overwrite=True)


def test_study_demo_and_search_refuse_an_existing_output_themselves(tmp_path: Path) -> None:
    busy = _occupied(tmp_path / "busy")
    with pytest.raises(OutputExistsError):
        run_study("templates", busy, quick=True)
    with pytest.raises(OutputExistsError):
        run_study("task-vectors", busy, quick=True, suite="text")
    with pytest.raises(OutputExistsError):
        run_demo(busy)
    with pytest.raises(OutputExistsError):
        run_search(make_problem(tmp_path / "problem"), busy, executor="local:0", show_progress=False)
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]  # nothing was written, nothing lost


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with make_progress(plain_interval=0.05) as bar:
        task = bar.add_task("train things", total=4)
        bar.advance(task)
        time.sleep(0.3)
        bar.advance(task, 3)
    err = capsys.readouterr().err
    assert "train things: 1/4" in err  # printed while the work ran, not only at the end
    assert "train things: 4/4 done" in err


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with make_progress(disable=True, plain_interval=0.01) as bar:
        bar.add_task("quiet", total=1)
        time.sleep(0.05)
    assert "quiet" not in capsys.readouterr().err
