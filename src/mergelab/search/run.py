"""Evolutionary merge search: CMA-ES (Hansen's ``cma`` package) over per-group merge coefficients.

Generation 0 scores the initial config (the merge section as written, e.g. hand-tuned task arithmetic);
each later generation asks CMA-ES for ``population`` candidates in the normalised box [0, 1]^d, scores them
through the executor (independent jobs) and tells CMA-ES the negated scores. The best candidate over all
generations, the initial one included, is saved as ``best_config.yaml`` and merged again from that file
into ``best_model/`` with ``mergelab.merge``; its tensors must equal, bit for bit, those of the candidate
the search scored (``reproduced_bitwise`` in ``search.json``; otherwise the search fails loudly).

Outputs in OUT: ``best_config.yaml``, ``best_model/``, ``history.csv`` (every candidate), ``scores.png``
(score per generation), ``search.json`` (seeds, versions, scores on validation and, with ``test_kwargs``,
on test).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mergelab.executor import get_executor
from mergelab.report.plots import line_panels
from mergelab.report.tables import write_csv
from mergelab.runtime import prepare_output
from mergelab.search.config import load_search_config
from mergelab.search.evaluate import (
    CandidateJob,
    evaluate_candidate,
    load_state_dict,
    merge_to_state_dict,
    resolve_callable,
    score_of,
)
from mergelab.search.space import SearchSpace, build_space


def dump_config(merge: dict[str, Any], header: str) -> str:
    """YAML text of a merge config; refuses to write one that would not load back to the same values."""
    text = yaml.safe_dump(merge, sort_keys=False, default_flow_style=None, width=120)
    if yaml.safe_load(text) != merge:  # floats are written with repr(): they must round-trip exactly
        raise RuntimeError("internal error: the best config does not round-trip through YAML")
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + text


def _cma_strategy(x0: list[float], sigma0: float, population: int | None, seed: int) -> Any:
    try:
        import cma
    except ImportError:
        raise ImportError("the merge search needs the 'cma' package: pip install 'mergelab[search]' "
                          "(or pip install cma)") from None
    # cma reads seed 0 as "seed from the clock": shift by one so that every seed, 0 included, is reproducible
    opts: dict[str, Any] = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9, "tolfun": 0.0, "tolx": 0.0,
                            "tolflatfitness": 10**9, "tolstagnation": 10**9}
    if population is not None:
        opts["popsize"] = population
    return cma.CMAEvolutionStrategy(x0, sigma0, opts)


#: the line under ``scores.png`` wherever a report shows it
SCORES_HOW_TO_READ = ("x = CMA-ES generation, y = validation score: the best candidate so far, the best and the "
                      "mean of each generation; the dashed line is the starting config. A best-so-far line above "
                      "the dashed line means the search found a better merge on validation (test is reported "
                      "separately).")


def _plot(history: list[dict[str, Any]], path: Path, initial: float, ylabel: str) -> Path:
    gens = sorted({int(h["generation"]) for h in history if h["generation"] > 0})
    best_so_far, gen_best, gen_mean = [], [], []
    running = initial
    for g in gens:
        scores = [h["score"] for h in history if h["generation"] == g and math.isfinite(h["score"])]
        running = max([running, *scores])
        best_so_far.append(running)
        gen_best.append(max(scores) if scores else float("nan"))
        gen_mean.append(float(np.mean(scores)) if scores else float("nan"))
    panels = {"CMA-ES merge search": ([float(g) for g in gens],
                                      {"best so far": best_so_far, "generation best": gen_best,
                                       "generation mean": gen_mean})}
    return line_panels(panels, path, xlabel="generation", ylabel=ylabel,
                       title="Score per generation (dashed: initial config)", hline=initial)


def run_search(config_path: Path | str, out: Path | str, *, generations: int | None = None,
               population: int | None = None, seed: int | None = None, executor: str = "local",
               overwrite: bool = False, show_progress: bool = True) -> Path:
    """Search, save the best config and merge; returns the path of ``best_config.yaml``.

    ``generations``, ``population`` and ``seed`` override the YAML's ``search`` section when given. A
    non-empty ``out`` is refused (:class:`~mergelab.errors.OutputExistsError`) unless ``overwrite``.
    """
    from mergelab.merge.engine import run_merge

    started = time.perf_counter()
    cfg, merge_cfg, folder = load_search_config(config_path)
    settings = cfg.search
    gens = generations if generations is not None else settings.generations
    pop = population if population is not None else settings.population
    seed_ = seed if seed is not None else settings.seed
    space, x0 = build_space(cfg, merge_cfg)
    folder_s = str(folder.resolve()) if folder is not None else None
    resolve_callable(cfg.evaluator.callable, folder_s)  # fail now, not in a worker after minutes
    out_dir = prepare_output(out, overwrite)

    def job(x: list[float], kwargs: dict[str, Any] | None = None) -> CandidateJob:
        return CandidateJob(space.merge_config(x), cfg.evaluator.callable,
                            dict(cfg.evaluator.kwargs if kwargs is None else kwargs), folder_s)

    history: list[dict[str, Any]] = []

    def record(generation: int, xs: list[list[float]], metrics: list[dict[str, float]]) -> None:
        for i, (x, m) in enumerate(zip(xs, metrics, strict=True)):
            history.append({"generation": generation, "candidate": i, **m,
                            **dict(zip([d.label for d in space.dims], space.to_values(x), strict=True))})

    es = _cma_strategy(x0, settings.sigma0, pop, seed_)
    with get_executor(executor, show_progress=show_progress) as ex:
        initial_metrics = ex.map(evaluate_candidate, [job(x0)], desc="search: initial config")
        record(0, [x0], initial_metrics)
        best_x, best_metrics, best_gen = list(x0), initial_metrics[0], 0
        for g in range(1, gens + 1):
            xs = [list(map(float, x)) for x in es.ask()]
            metrics = ex.map(evaluate_candidate, [job(x) for x in xs], desc=f"search: generation {g}/{gens}")
            es.tell(xs, [-m["score"] if math.isfinite(m["score"]) else 1e300 for m in metrics])
            record(g, xs, metrics)
            for x, m in zip(xs, metrics, strict=True):
                if m["score"] > best_metrics["score"]:  # strict: ties keep the earlier (simpler) candidate
                    best_x, best_metrics, best_gen = x, m, g
        test: dict[str, dict[str, float]] = {}
        if cfg.evaluator.test_kwargs is not None:
            test_runs = ex.map(evaluate_candidate, [job(x0, cfg.evaluator.test_kwargs),
                                                    job(best_x, cfg.evaluator.test_kwargs)], desc="search: test")
            test = {"initial": test_runs[0], "best": test_runs[1]}

    best_merge = space.merge_config(best_x)
    header = (f"Best merge found by `mergelab search` (CMA-ES, seed {seed_}): validation score "
              f"{best_metrics['score']!r} in generation {best_gen} (initial config: {initial_metrics[0]['score']!r}).\n"
              "Reproduce with: mergelab merge best_config.yaml -o OUT")
    best_yaml = out_dir / "best_config.yaml"
    best_yaml.write_text(dump_config(best_merge, header), encoding="utf-8")
    # Merge again from the saved file, as a user would, and check the score is the one the search saw.
    run_merge(best_yaml, out_dir / "best_model", overwrite=True, progress=False)
    reproduced = load_state_dict(out_dir / "best_model")
    searched = merge_to_state_dict(best_merge)
    identical = reproduced.keys() == searched.keys() and all(
        reproduced[k].dtype == searched[k].dtype and torch.equal(reproduced[k], searched[k]) for k in searched)
    fn = resolve_callable(cfg.evaluator.callable, folder_s)
    rescored, _ = score_of(fn(reproduced, **cfg.evaluator.kwargs))
    write_csv(history, out_dir / "history.csv")
    _plot(history, out_dir / "scores.png", initial_metrics[0]["score"], cfg.evaluator.label)
    record_ = {
        "method": merge_cfg.merge_method, "dimensions": [d.label for d in space.dims],
        "groups": [g.model_dump() for g in space.groups] if space.groups else "model",
        "generations": gens, "population": int(es.popsize), "sigma0": settings.sigma0, "seed": seed_,
        "cma_seed": seed_ + 1, "cma_version": _cma_version(), "executor": executor,
        "evaluations": len(history), "initial": {"values": space.to_values(x0), **initial_metrics[0]},
        "best": {"generation": best_gen, "values": space.to_values(best_x), **best_metrics},
        "reproduced_bitwise": identical, "rescored": rescored, "test": test,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "search.json").write_text(json.dumps(record_, indent=2, default=str) + "\n")
    if not identical:
        raise RuntimeError(f"merging {best_yaml} did not give the tensors the search scored: the merge is not "
                           "reproducible (please report this)")
    return best_yaml


def _cma_version() -> str:
    import cma

    return str(cma.__version__)


__all__ = ["SCORES_HOW_TO_READ", "SearchSpace", "dump_config", "run_search"]
