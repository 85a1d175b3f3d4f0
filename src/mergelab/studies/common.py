"""The study skeleton and what studies share.

Every study has quick and full settings (a frozen ``Config`` dataclass with a ``seed`` field, its ``QUICK``
variant, bad values refused in ``__post_init__``), a ``build(out, cfg, show_progress=...)`` that computes and
draws into ``out`` and returns a :class:`StudyResult`, and one writer, :func:`write_outputs`, that lays every
study's folder out the same way::

    OUT/report.html      self-contained report (figures embedded)
    OUT/report.md        the same report as Markdown
    OUT/mergelab.json    the run record (schema: :func:`study_record`)
    OUT/<table>.csv|.md  each table: full-precision CSV, and Markdown for Table objects
    OUT/*.png            figures (150 dpi), referenced by both reports

:func:`run_config` is the whole ``run`` of a study: apply options (bad ones fail here), refuse an existing
output, build, write (:func:`write_study`, which the demo runs per section); :func:`study_runner` makes a
study's public ``run`` from its ``build`` and its full and quick settings. Every study goes through it; the
task-vectors study calls :func:`run_config` itself, its settings depending on the suite.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from mergelab._version import __version__
from mergelab.align.bn_reset import reset_bn_stats
from mergelab.ensemble import EvalMode, Outputs, model_outputs
from mergelab.report import FigureRef, Report, Table, write_csv
from mergelab.runtime import prepare_output
from mergelab.soups import uniform_soup
from mergelab.zoo.data import Dataset, load_dataset
from mergelab.zoo.models import ZooModel
from mergelab.zoo.primitives import accuracy_pct
from mergelab.zoo.train import TrainConfig, Zoo, ZooSpec

C = TypeVar("C")


class TrainingRecipe(Protocol):
    """The training fields a study's Config shares with the others (same values → same cached zoos)."""

    @property
    def epochs(self) -> int: ...
    @property
    def pretrain_epochs(self) -> int: ...
    @property
    def n_train(self) -> int | None: ...
    @property
    def width(self) -> int: ...
    @property
    def split_seed(self) -> int: ...
    @property
    def seed(self) -> int: ...


@dataclass(frozen=True)
class ZooRecipe:
    """The fields of a study that trains shared-start zoos over several zoo seeds (the weights-vs-features
    recipe: 2,000 training images, a 3-epoch start, 2 fine-tuning epochs, half-width convs, 3 seeds), so the
    studies built on it share cached models."""

    epochs: int = 2
    pretrain_epochs: int = 3
    n_train: int | None = 2000
    width: int = 8
    n_seeds: int = 3
    split_seed: int = 0
    seed: int = 0
    workers: int | None = None
    executor: str | None = None  # local, local:N, ray, ray:ADDRESS

    def zoo_seeds(self) -> list[int]:
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be at least 1, got {self.n_seeds}")
        return list(range(self.seed, self.seed + self.n_seeds))


def zoo_spec(cfg: TrainingRecipe, arch: str, dataset: str, init: str, n_models: int) -> ZooSpec:
    """``n_models`` members of ``arch`` on ``dataset`` trained with the study's recipe."""
    return ZooSpec(TrainConfig(arch=arch, dataset=dataset, init=init,  # type: ignore[arg-type]
                               epochs=cfg.epochs, pretrain_epochs=cfg.pretrain_epochs, n_train=cfg.n_train,
                               width=cfg.width, split_seed=cfg.split_seed, seed=cfg.seed), n_models)


def apply_options(config: C, options: Mapping[str, Any]) -> C:
    """``dataclasses.replace`` that names the unknown key and the allowed ones (CLI-friendly errors);
    lists become tuples and comma-separated strings are split for tuple fields."""
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted(fields)}")
    clean: dict[str, Any] = {}
    for k, v in options.items():
        current = getattr(config, k)
        if isinstance(current, tuple):
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
            items = list(v)
            if current and isinstance(current[0], int | float) and not isinstance(current[0], bool):
                items = [type(current[0])(s) for s in items]
            v = tuple(items)
        clean[k] = v
    return dataclasses.replace(config, **clean)  # type: ignore[type-var]


@dataclass
class ZooEval:
    """Evaluates one zoo: member outputs once per split, soups memoised by the set of members averaged.

    ``transform`` maps each member's state dict before anything is computed (the magnitude study scales
    weights there); soups average the transformed state dicts. ``bn_reset_x`` (training inputs) lets soups be
    evaluated after re-estimating their BatchNorm statistics on it (``bn_reset=True``), as REPAIR does.
    """

    zoo: Zoo
    val: Dataset
    test: Dataset
    mode: EvalMode = "eval"
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    bn_reset_x: torch.Tensor | None = None
    bn_reset_seed: int = 0
    bn_reset_batches: int = 10
    _state_dicts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    _members: list[ZooModel] = field(default_factory=list)
    _outputs: dict[tuple[str, int], Outputs] = field(default_factory=dict)
    _soups: dict[tuple[str, frozenset[int], bool], Outputs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sds = self.zoo.state_dicts()
        self._state_dicts = [self.transform(sd) for sd in sds] if self.transform else sds
        self._members = []
        for model, sd in zip(self.zoo.models, self._state_dicts, strict=True):
            if self.transform:
                model = copy.deepcopy(model)
                model.load_state_dict(sd)
            self._members.append(model)

    @property
    def members(self) -> list[ZooModel]:
        return self._members

    @property
    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return self._state_dicts

    def data(self, split: str) -> Dataset:
        return self.val if split == "val" else self.test

    def outputs(self, i: int, split: str) -> Outputs:
        key = (split, i)
        if key not in self._outputs:
            self._outputs[key] = model_outputs(self._members[i], self.data(split).x, mode=self.mode)
        return self._outputs[key]

    def member_acc(self, i: int, split: str) -> float:
        return accuracy_pct(self.outputs(i, split).logits, self.data(split).y)

    def soup_model(self, members: Sequence[int], *, bn_reset: bool = False) -> ZooModel:
        model = copy.deepcopy(self._members[0])
        model.load_state_dict(uniform_soup([self._state_dicts[i] for i in members]))
        if bn_reset:
            if self.bn_reset_x is None:
                raise ValueError("a BN reset needs training inputs: pass bn_reset_x to ZooEval")
            reset_bn_stats(model, self.bn_reset_x, num_batches=self.bn_reset_batches,
                           seed=self.bn_reset_seed)
        return model

    def soup_outputs(self, members: Sequence[int], split: str, *, bn_reset: bool = False) -> Outputs:
        key = (split, frozenset(members), bn_reset)
        if key not in self._soups:
            model = self.soup_model(sorted(members), bn_reset=bn_reset)
            self._soups[key] = model_outputs(model, self.data(split).x, mode=self.mode)
        return self._soups[key]

    def soup_acc(self, members: Sequence[int], split: str, *, bn_reset: bool = False) -> float:
        return accuracy_pct(self.soup_outputs(members, split, bn_reset=bn_reset).logits, self.data(split).y)


def splits(dataset: str, split_seed: int) -> tuple[Dataset, Dataset]:
    return load_dataset(dataset, "val", split_seed), load_dataset(dataset, "test", split_seed)


def _val_acc_pct(history: Mapping[str, Any]) -> float | None:
    if "val_acc_pct" in history:
        return float(history["val_acc_pct"])
    # cache entries written before the accuracy scale was unified hold a fraction (same models: no retraining)
    return 100.0 * float(history["val_acc"]) if "val_acc" in history else None


def zoo_record(zoo: Zoo) -> dict[str, Any]:
    """What made a zoo (for mergelab.json): recipe, seeds, cache keys, per-member validation accuracy."""
    return {"recipe": dataclasses.asdict(zoo.config), "member_seeds": zoo.member_seeds,
            "base_seed": zoo.base_seed, "cache_keys": zoo.cache_keys,
            "val_acc_pct_at_training": [_val_acc_pct(h) for h in zoo.histories], "trained_now": zoo.trained}


#: a table to write under a file name: ``stem`` (a Table: CSV + Markdown), ``stem.md`` (one or several Tables,
#: one Markdown file) or ``stem.csv`` (a Table or raw rows: full-precision CSV)
TableOutput = Table | Sequence[Table] | Sequence[Mapping[str, Any]]


@dataclass
class StudyResult:
    """What a study's ``build`` returns: the report, the tables to write by file stem, the zoos it used
    (recorded with their recipes) and extra fields for ``mergelab.json``."""

    report: Report
    tables: dict[str, TableOutput] = field(default_factory=dict)
    zoos: list[Zoo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def explain(figures: Sequence[FigureRef], how_to_read: Mapping[str, str]) -> list[FigureRef]:
    """Give every figure its "how to read this figure" line, looked up by the start of its file name."""
    for f in figures:
        f.how_to_read = next(text for prefix, text in how_to_read.items() if f.path.name.startswith(prefix))
    return list(figures)


def study_record(study: str, config: Any, *, quick: bool, seed: int, started: float,
                 zoos: Sequence[Zoo] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one schema of a study's ``mergelab.json``: study, versions, quick, seed, options, zoo recipes,
    wall time, then the study's own fields."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)  # type: ignore[arg-type]
    return {"study": study, "mergelab_version": __version__, "torch": torch.__version__, "quick": quick,
            "seed": seed, "config": cfg, "zoos": [zoo_record(z) for z in zoos],
            "wall_seconds": round(time.perf_counter() - started, 2), **(extra or {})}


def write_outputs(out: Path, report: Report, tables: Mapping[str, TableOutput], record: Mapping[str, Any]
                  ) -> Path:
    """Write every study's outputs the same way (layout in the module docstring); returns report.html."""
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        stem, _, ext = name.rpartition(".") if name.endswith((".csv", ".md")) else (name, "", "")
        tabs = [table] if isinstance(table, Table) else list(table)
        if ext in ("", "csv"):
            if isinstance(table, Table):
                table.write_csv(out / f"{stem}.csv")
            elif not all(isinstance(t, Table) for t in tabs) or not tabs:
                write_csv(tabs, out / f"{stem}.csv")  # type: ignore[arg-type]
        if ext in ("", "md") and tabs and all(isinstance(t, Table) for t in tabs):
            (out / f"{stem}.md").write_text("\n\n".join(t.to_markdown() for t in tabs) + "\n")  # type: ignore[union-attr]
    if record.get("quick"):
        report.quick = True
    missing = [f.path.name for f in report.figures if not f.how_to_read.strip()]
    if missing:  # every study's figures say how to read them (issue 15); a new figure without it is a bug
        raise ValueError(f"figure(s) without a 'how to read this figure' line: {', '.join(missing)}")
    (out / "report.md").write_text(report.to_markdown(out))
    (out / "mergelab.json").write_text(json.dumps(record, indent=2, default=str))
    return report.write(out / "report.html")


def run_config(study: str, out: Path | str, build: Callable[..., StudyResult], config: C, *, quick: bool,
               seed: int, overwrite: bool = False, show_progress: bool = True,
               options: Mapping[str, Any] | None = None) -> Path:
    """A study's whole ``run``: refuse an existing output, apply ``options`` to ``config`` (the quick or full
    settings), build, write; returns the path of report.html."""
    cfg = apply_options(config, {"seed": seed, **(options or {})})  # bad options fail before anything is written
    return write_study(study, prepare_output(out, overwrite), build, cfg, quick=quick, show_progress=show_progress)[0]


def write_study(study: str, folder: Path, build: Callable[..., StudyResult], cfg: Any, *, quick: bool,
                show_progress: bool = True) -> tuple[Path, StudyResult]:
    """Build one study into ``folder`` (already prepared) and write it; (report.html, the result). The part of
    :func:`run_config` that the demo runs once per section."""
    started = time.perf_counter()
    result = build(folder, cfg, show_progress=show_progress)
    record = study_record(study, cfg, quick=quick, seed=cfg.seed, started=started, zoos=result.zoos,
                          extra=result.extra)
    return write_outputs(folder, result.report, result.tables, record), result


def study_runner(study: str, build: Callable[..., StudyResult], full: Any, quick: Any) -> Callable[..., Path]:
    """The ``run`` of a study whose settings are one Config dataclass (``full`` and its ``quick`` variant)::

        run(out, *, quick=False, seed=0, config=None, overwrite=False, show_progress=True, **options) -> Path

    runs :func:`run_config` on ``config`` (default: the quick or full settings) with ``options`` (Config fields,
    unknown ones refused by name) applied; returns the path of ``out/report.html``."""
    settings = (full, quick)

    def run(out: Path | str, *, quick: bool = False, seed: int = 0, config: Any = None, overwrite: bool = False,
            show_progress: bool = True, **options: Any) -> Path:
        chosen = config if config is not None else settings[quick]
        return run_config(study, out, build, chosen, quick=quick, seed=seed, overwrite=overwrite,
                          show_progress=show_progress, options=options)

    run.__doc__ = (f"Run the ``{study}`` study into ``out``; returns ``out/report.html``. ``options`` are "
                   f":class:`{type(full).__name__}` fields applied on top of ``config`` or the quick/full settings.")
    return run
