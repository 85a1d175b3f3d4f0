"""Study 3 — weights as templates (the paper's Fig. 1 and Fig. 2), plus first-layer conv kernels.

A linear classifier's weight row for class k, reshaped to 28×28, resembles class k's mean image (Fig. 1).
Averaging the templates of class i and class i+5 superimposes two patterns (Fig. 2): averaging weights
averages the patterns they detect. First-layer kernels of CNNs fine-tuned from a shared start stay alike,
so their average keeps the pattern; kernels of independently trained CNNs differ and partly cancel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.analysis.templates import class_means, cosine_matrix, first_conv_kernels, linear_templates, template_match
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import image_grid
from mergelab.soups import uniform_soup
from mergelab.studies.common import StudyResult, explain, study_runner, zoo_spec
from mergelab.zoo.data import load_dataset
from mergelab.zoo.models import ZooModel
from mergelab.zoo.train import TrainConfig, Zoo, ZooSpec, train_zoos


@dataclass(frozen=True)
class Config:
    datasets: tuple[str, ...] = ("mnist5k", "animal-mnist")
    linear_epochs: int = 6
    cnn_arch: str = "vgg6"
    cnn_dataset: str = "mnist5k"
    # CNN recipe: the magnitude study's defaults, so the CNN zoos come from the same cache
    epochs: int = 3
    pretrain_epochs: int = 3
    n_train: int | None = None
    width: int = 16
    kernels_shown: int = 16
    split_seed: int = 0
    seed: int = 0
    workers: int | None = None
    executor: str | None = None  # train the zoos as executor jobs: local, local:N, ray, ray:ADDRESS


QUICK = Config(datasets=("mnist5k",), linear_epochs=2, cnn_arch="vgg6bn", epochs=1, pretrain_epochs=2,
               n_train=1000, kernels_shown=8)


@dataclass
class Result(StudyResult):
    rows: list[dict[str, Any]] = field(default_factory=list)
    table: Table | None = None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _linear_spec(cfg: Config, ds: str) -> ZooSpec:
    # a linear model has no shared-init question (convex loss): one member trained from scratch, no augmentation,
    # so the templates are not blurred by random shifts
    return ZooSpec(TrainConfig(arch="linear", dataset=ds, init="independent", epochs=cfg.linear_epochs,
                               pretrain_epochs=0, augment=False, n_train=cfg.n_train, split_seed=cfg.split_seed,
                               seed=cfg.seed), 1)


def _cnn_spec(cfg: Config, init: str) -> ZooSpec:
    return zoo_spec(cfg, cfg.cnn_arch, cfg.cnn_dataset, init, 2)


def _kernel_rows(zoo: Zoo, label: str, k: int) -> tuple[list[tuple[str, list[np.ndarray]]], dict[str, float]]:
    a, b = zoo.models[0], zoo.models[1]
    soup = _soup_of(zoo)
    ka, kb, ks = first_conv_kernels(a)[:k], first_conv_kernels(b)[:k], first_conv_kernels(soup)[:k]
    full_a, full_b, full_s = first_conv_kernels(a), first_conv_kernels(b), first_conv_kernels(soup)
    cos = float(torch.diag(cosine_matrix(full_a, full_b)).mean())
    shrink = float(full_s.flatten(1).norm(dim=1).mean() / (0.5 * (full_a.flatten(1).norm(dim=1)
                                                                  + full_b.flatten(1).norm(dim=1))).mean())
    rows = [(f"{label}\nmodel A", [_np(x) for x in ka]), (f"{label}\nmodel B", [_np(x) for x in kb]),
            (f"{label}\nsoup (A+B)/2", [_np(x) for x in ks])]
    return rows, {"kernel_cosine_AB": cos, "soup_norm_ratio": shrink}


def _soup_of(zoo: Zoo) -> ZooModel:
    import copy

    model = copy.deepcopy(zoo.models[0])
    model.load_state_dict(uniform_soup(zoo.state_dicts()))
    return model


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> Result:
    specs = [_linear_spec(cfg, ds) for ds in cfg.datasets] + [_cnn_spec(cfg, "shared"), _cnn_spec(cfg, "independent")]
    zoos = train_zoos(specs, workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    lin_zoos, cnn_shared, cnn_indep = zoos[:len(cfg.datasets)], zoos[-2], zoos[-1]
    figs: list[FigureRef] = []
    rows: list[dict[str, Any]] = []
    verdicts: list[Verdict] = []
    pair_hits = pair_total = 0
    for ds, zoo in zip(cfg.datasets, lin_zoos, strict=True):
        train = load_dataset(ds, "train", cfg.split_seed)
        if train.kind != "image":
            raise ValueError(f"templates need an image dataset, got '{ds}' ({train.kind})")
        shape = train.input_shape
        means = class_means(train)
        temps = linear_templates(zoo.models[0].head, shape)
        sims, matched = template_match(temps, means)
        names = list(train.class_names)
        figs.append(FigureRef(image_grid(
            [("class mean", [_np(m[0]) for m in means]), ("template\n(weights)", [_np(t[0]) for t in temps])],
            out / f"fig1_templates_{ds}.png", col_labels=names, diverging=[False, True],
            cbar_labels=["pixel intensity (0–1)", "weight"],
            title=f"{ds}: class means (top) and the linear classifier's weight rows (bottom)"),
            f"Fig. 1 style ({ds}): each class's mean image beside its weight vector reshaped to 28×28 "
            f"(red = positive weight). The template is closest (cosine) to its own centred class mean for "
            f"{matched * 100:.0f}% of the classes."))
        half = len(names) // 2
        centred = means - means.mean(0, keepdim=True)
        avg = [(temps[i] + temps[i + half]) / 2 for i in range(half)]
        figs.append(FigureRef(image_grid(
            [("template i", [_np(temps[i][0]) for i in range(half)]),
             (f"template i+{half}", [_np(temps[i + half][0]) for i in range(half)]),
             ("average", [_np(a[0]) for a in avg])],
            out / f"fig2_avg_templates_{ds}.png",
            col_labels=[f"{names[i]} + {names[i + half]}" for i in range(half)], diverging=[True, True, True],
            cbar_labels=["weight", "weight", "weight"], share_scale=True,
            title=f"{ds}: averaging the templates of class i and class i+{half}"),
            f"Fig. 2 style ({ds}): the average of two class templates keeps a blend of both patterns — what "
            "averaging weights that detect different things does."))
        for i in range(half):
            ci = float(cosine_matrix(avg[i][None], centred[i][None])[0, 0])
            cj = float(cosine_matrix(avg[i][None], centred[i + half][None])[0, 0])
            pair_hits += int(ci > 0 and cj > 0)
            pair_total += 1
            rows.append({"dataset": ds, "kind": "average template", "class": f"{names[i]}+{names[i + half]}",
                         "cos_own_mean": ci, "cos_other_mean": cj})
        diag = torch.diag(sims)
        off = (sims.sum() - diag.sum()) / (sims.numel() - len(diag))
        for k, name in enumerate(names):
            rows.append({"dataset": ds, "kind": "template", "class": name, "cos_own_mean": float(diag[k]),
                         "cos_other_mean": float((sims[k].sum() - diag[k]) / (len(names) - 1))})
        verdicts.append(Verdict(f"Linear-classifier weights are class templates ({ds})", matched >= 0.8,
                                f"{matched * 100:.0f}% of templates are most similar to their own class mean; "
                                f"mean cosine {float(diag.mean()):.2f} with the own class vs {float(off):.2f} "
                                "with the others."))
    verdicts.append(Verdict("Averaging the templates of classes i and i+5 keeps both patterns",
                            pair_hits == pair_total,
                            f"the averaged template correlates positively with both classes' centred means in "
                            f"{pair_hits}/{pair_total} pairs."))
    krows_s, kstat_s = _kernel_rows(cnn_shared, "shared init", cfg.kernels_shown)
    krows_i, kstat_i = _kernel_rows(cnn_indep, "independent", cfg.kernels_shown)
    figs.append(FigureRef(image_grid(
        krows_s + krows_i, out / "fig_conv_kernels.png",
        col_labels=[f"k{j}" for j in range(cfg.kernels_shown)], diverging=[True] * 6,
        cbar_labels=["weight"] * 6, cell=0.7, share_scale=True,
        title=f"First-layer 3×3 kernels of {cfg.cnn_arch} on {cfg.cnn_dataset}: two models and their average"),
        f"First-layer kernels of two {cfg.cnn_arch} models and of their uniform soup, fine-tuned from a shared "
        f"start (top three rows) or trained from independent inits (bottom three). Matching kernels have mean "
        f"cosine {kstat_s['kernel_cosine_AB']:.2f} (shared) vs {kstat_i['kernel_cosine_AB']:.2f} (independent); "
        f"the soup keeps {kstat_s['soup_norm_ratio'] * 100:.0f}% vs {kstat_i['soup_norm_ratio'] * 100:.0f}% of "
        "the members' kernel norm."))
    verdicts.append(Verdict(
        "Models from a shared start keep aligned kernels, so averaging preserves them (independent ones cancel)",
        kstat_s["kernel_cosine_AB"] > kstat_i["kernel_cosine_AB"]
        and kstat_s["soup_norm_ratio"] > kstat_i["soup_norm_ratio"],
        f"kernel cosine A·B {kstat_s['kernel_cosine_AB']:.2f} vs {kstat_i['kernel_cosine_AB']:.2f}; soup keeps "
        f"{kstat_s['soup_norm_ratio'] * 100:.0f}% vs {kstat_i['soup_norm_ratio'] * 100:.0f}% of the kernel norm."))
    explain(figs, {
        "fig1_templates": "top row: each class's mean training image (grey scale); bottom row: the linear "
                          "classifier's weight row for that class reshaped to the image (red = positive weight, "
                          "blue = negative, white = 0). A template that looks like its class mean is a template.",
        "fig2_avg_templates": "each column pairs class i with class i+5: rows 1 and 2 are their templates, row 3 "
                              "their average, all on one colour scale (red positive, blue negative). The average "
                              "shows both shapes at once, faded: what averaging unrelated weights does.",
        "fig_conv_kernels": "each small square is one 3×3 first-layer kernel (red positive, blue negative, one "
                            "scale for all rows); columns are the same kernel index in every row. Compare model A, "
                            "model B and their soup: shared-start kernels match and survive averaging, "
                            "independent ones differ and fade.",
    })
    # each figure's caption ends with the verdict on the claim it illustrates
    for f in figs:
        if f.path.name.startswith("fig1_templates_"):
            ds = f.path.stem.removeprefix("fig1_templates_")
            f.caption += " " + next(v for v in verdicts if v.claim.endswith(f"({ds})")).sentence()
        elif f.path.name.startswith("fig2_"):
            f.caption += " " + next(v for v in verdicts if v.claim.startswith("Averaging the templates")).sentence()
        elif f.path.name == "fig_conv_kernels.png":
            f.caption += " " + verdicts[-1].sentence()
    rows += [{"dataset": cfg.cnn_dataset, "kind": f"{cfg.cnn_arch} first-layer kernels ({init})", "class": "",
              "cos_own_mean": st["kernel_cosine_AB"], "cos_other_mean": st["soup_norm_ratio"]}
             for init, st in (("shared", kstat_s), ("independent", kstat_i))]
    trows = [r for r in rows if r["kind"] == "template"]
    table = Table("Cosine of each template with its own centred class mean vs the mean over the other classes",
                  trows, columns=["dataset", "class", "cos_own_mean", "cos_other_mean"],
                  headers={"dataset": "Dataset", "class": "Class", "cos_own_mean": "own class",
                           "cos_other_mean": "other classes (mean)"})
    section = Section(
        "Weights as templates (Fig. 1, Fig. 2) and first-layer kernels",
        text=["Linear classifiers (softmax regression, no augmentation) trained on "
              f"{', '.join(cfg.datasets)}. A weight row is compared with the centred class mean "
              "(μ_k − μ): centring removes what all classes share, which the bias absorbs.",
              "Fig. 1 puts each class mean beside its template; Fig. 2 averages the templates of class i and "
              "i+5 — the same operation a weight average applies to every unit of two models. The kernel figure "
              "does the same for a CNN's first layer, with and without a shared starting point."],
        verdicts=verdicts, tables=[table], figures=figs)
    report = Report("Weights as templates", meta={"seed": cfg.seed}).add(section)
    return Result(report, {"templates.csv": rows, "templates.md": table}, zoos,
                  {"kernels": {"shared": kstat_s, "independent": kstat_i}}, rows=rows, table=table)


run = study_runner("templates", build, Config(), QUICK)
