"""mergekit's own example configs and basic-merge test configs, rewritten only to point at tiny local models,
run unchanged through ``mergelab merge`` and through mergekit 0.1.5, compared tensor by tensor in the config's
dtype. Run with ``-s`` to print the table rows (``EXAMPLE name dtype max-abs-diff status``).

Sources (read, not copied): mergekit's ``examples/{linear,ties,bio-merge,gradient-slerp,
orcamini-platy-44layer,gpt2-small,arcee_fusion}.yml`` and ``tests/test_basic_merges.py`` (two models with
``weight`` 0.6 / 0.4, ``dtype: bfloat16``, a third model as base where the method takes one). The models:
Llama-style folders of 40 layers (the examples' layer ranges run as written) and a GPT-2 of 12 layers. The
example ties.yml is the classic one of mergekit's history (its current one names ``ranked_ties``, a method
mergekit 0.1.5 does not have).

DARE and DELLA draw random coins: both tools' coins are replaced by one deterministic rule (as in
tests/test_mergekit_conformance.py), so that the rest of the arithmetic is compared. Unchanged, their configs
differ by design: mergelab rescales kept entries by 1/p (the papers), mergekit to the L1 norm; the same config
with ``rescale_mode: l1`` gives mergekit's bits (checked too).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cli_helpers import load_output
from test_mergekit_conformance import _hash_coin
from tiny_models import make_family

# -- mergekit's examples, as they are but for the model names -------------------------------------------------
EXAMPLES = {
    "linear.yml": """
        models:
          - model: {A}
            parameters:
              weight: 1.0
          - model: {B}
            parameters:
              weight: 0.3
          - model: {C}
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
    """,
    "ties.yml": """
        models:
          - model: {A}
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: {B}
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: {C}
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: {BASE}
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """,
    "bio-merge.yml": """
        models:
          - model: {A}
            parameters:
              density: 0.5
              weight: 0.5
          - model: {B}
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: {BASE}
        parameters:
          normalize: false
          int8_mask: true
        dtype: float16
    """,
    "gradient-slerp.yml": """
        slices:
          - sources:
              - model: {A}
                layer_range: [0, 40]
              - model: {B}
                layer_range: [0, 40]
        merge_method: slerp
        base_model: {A}
        parameters:
          t:
            - pattern: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - pattern: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float16
    """,
    "orcamini-platy-44layer.yml": """
        slices:
          - sources:
            - model: {A}
              layer_range: [0, 24]
          - sources:
            - model: {B}
              layer_range: [20, 40]
        merge_method: passthrough
        dtype: float16
    """,
    "gpt2-small.yml": """
        slices:
          - sources:
            - model: {GPT2}
              layer_range: [0, 8]
        merge_method: passthrough
        dtype: float16
    """,
    "arcee_fusion.yml": """
        models:
          - model: {A}
          - model: {B}
        merge_method: arcee_fusion
        base_model: {A}
        dtype: bfloat16
    """,
}


def _basic(method: str, base: str | None, params: dict[str, Any] | None = None, a: str = "{X}",
           b: str = "{Y}", weights: tuple[float, float] = (0.6, 0.4)) -> dict[str, Any]:
    """tests/test_basic_merges.py's ``two_model_config``."""
    config: dict[str, Any] = {"merge_method": method, "base_model": base,
                              "models": [{"model": a, "parameters": {"weight": weights[0]}},
                                         {"model": b, "parameters": {"weight": weights[1]}}],
                              "dtype": "bfloat16", "parameters": params}
    return {k: v for k, v in config.items() if v is not None}


BASIC = {
    "gpt2_copy": {"merge_method": "passthrough", "models": [{"model": "{GPT2}"}], "dtype": "bfloat16"},
    "gpt2_stack": {"merge_method": "passthrough", "dtype": "bfloat16",
                   "slices": [{"sources": [{"model": "{GPT2}", "layer_range": [0, 12]}]}] * 2},
    "passthrough_scale": {"merge_method": "passthrough", "models": [
        {"model": "{X}", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
    "linear": _basic("linear", None),
    "slerp": {**_basic("slerp", "{X}"), "parameters": {"t": 0.35}},
    **{f"nuslerp_base{bool(base)}_row{row}_flat{flat}": _basic(
        "nuslerp", base, {"nuslerp_row_wise": row, "nuslerp_flatten": flat})
       for base in (None, "{Z}") for row in (False, True) for flat in (False, True)},
    "nuslerp_weights_sum_to_zero": _basic("nuslerp", "{Z}", {"nuslerp_row_wise": False, "nuslerp_flatten": False},
                                          weights=(-0.5, 0.5)),
    "task_arithmetic": _basic("task_arithmetic", "{Z}"),
    "breadcrumbs": _basic("breadcrumbs", "{Z}"),
    "ties": _basic("ties", "{Z}", {"density": 0.3}),
    "sce": _basic("sce", "{Z}", {"select_topk": 0.5}),
    "multislerp": _basic("multislerp", "{Z}"),
    "dare_ties": _basic("dare_ties", "{Z}", {"density": 0.66}),
    "model_stock": _basic("model_stock", "{X}", a="{Y}", b="{Z}"),
    "model_stock_filterwise": _basic("model_stock", "{X}", {"filter_wise": True}, a="{Y}", b="{Z}"),
    "arcee_fusion": _basic("arcee_fusion", "{X}"),
    "nearswap": _basic("nearswap", "{X}", {"t": 0.0001}),
    "della": _basic("della", "{Z}", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    "karcher": _basic("karcher", "{Z}", {"max_iter": 5, "tol": 1e-5}),
}
# Unchanged, these differ from mergekit by design (see the module docstring); with rescale_mode: l1 they do not.
RESCALED_BY_DENSITY = {"dare_ties", "della"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mergekit-examples")
    base, fts = make_family(root / "llama40", "llama", seed=11, layers=40)
    gpt2, _ = make_family(root / "gpt2", "gpt2", n_models=0, seed=12, layers=12)
    # test_basic_merges.py's model_a/b/c: three independently initialised tiny Llamas
    xyz = [make_family(root / name, "llama", n_models=0, seed=13 + i)[0] for i, name in enumerate("xyz")]
    return {"BASE": str(base), "A": str(fts[0]), "B": str(fts[1]), "C": str(fts[2]), "GPT2": str(gpt2),
            "X": str(xyz[0]), "Y": str(xyz[1]), "Z": str(xyz[2])}


def _fill(config: Any, names: dict[str, str]) -> Any:
    if isinstance(config, str):
        return config.format(**names) if config.startswith("{") and config.endswith("}") else config
    if isinstance(config, list):
        return [_fill(v, names) for v in config]
    if isinstance(config, dict):
        return {k: _fill(v, names) for k, v in config.items()}
    return config


def _compare(config_path: Path, tmp: Path) -> tuple[float, str]:
    """Run the YAML file through ``mergelab merge`` (the CLI) and mergekit; (max abs diff, note)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from cli_helpers import assert_ok, run_cli

    assert_ok(run_cli(config_path, tmp / "mergelab"))
    config = yaml.safe_load(config_path.read_text())
    run_merge(MergeConfiguration.model_validate(config), str(tmp / "mergekit"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    ours, theirs = load_output(tmp / "mergelab"), load_output(tmp / "mergekit")
    assert set(ours) == set(theirs)
    note = ""
    worst = 0.0
    for name, x in ours.items():
        y = theirs[name]
        assert x.shape == y.shape, name
        if x.dtype != y.dtype:
            note = f"mergekit wrote {y.dtype}; compared after rounding it to {x.dtype}"
            y = y.to(x.dtype)
        worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst, note


def _write(tmp: Path, config: dict[str, Any] | str, names: dict[str, str]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yml"
    if isinstance(config, str):  # an example's text: only the model names change
        path.write_text(textwrap.dedent(config).format(**names))
    else:
        path.write_text(yaml.safe_dump(_fill(config, names), sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_mergekit_examples_run_unchanged_with_mergekits_tensors(models: dict[str, str], tmp_path: Path,
                                                                example: str) -> None:
    path = _write(tmp_path, EXAMPLES[example], models)
    dtype = yaml.safe_load(path.read_text())["dtype"]
    diff, note = _compare(path, tmp_path)
    print(f"EXAMPLE examples/{example} {dtype} {diff:.3g} {'same' if diff == 0 else 'DIFFERS'} {note}")
    assert diff == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BASIC))
def test_mergekit_basic_merge_tests_run_unchanged(models: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    import mergelab.methods.dare as dare

    monkeypatch.setattr(torch, "bernoulli", lambda p: _hash_coin(p.shape, p).to(p.dtype))
    config = BASIC[case]
    # mergekit's DARE keep probability is the density held in a bfloat16 tensor (0.66 -> 0.66015625); ours is
    # exact. Random draws never match anyway; for the coin rule, round it the same way.
    work = torch.bfloat16 if config.get("dtype") == "bfloat16" else torch.float32
    monkeypatch.setattr(dare, "bernoulli_mask",
                        lambda shape, p, generator, device="cpu": _hash_coin(shape, torch.tensor(p).to(work)))
    diff, note = _compare(_write(tmp_path, config, models), tmp_path)
    dtype = config.get("dtype", "(inputs' float32)")
    if case in RESCALED_BY_DENSITY:
        print(f"EXAMPLE basic/{case} {dtype} {diff:.3g} differs-by-design(1/p rescale) {note}")
        assert diff > 0.0
        l1 = {**config, "parameters": {**config["parameters"], "rescale_mode": "l1"}}
        diff, note = _compare(_write(tmp_path / "l1", l1, models), tmp_path / "l1")
        case += "+rescale_mode:l1"
    print(f"EXAMPLE basic/{case} {dtype} {diff:.3g} {'same' if diff == 0 else 'DIFFERS'} {note}")
    assert diff == 0.0


def test_examples_are_written_as_mergekit_has_them() -> None:
    """Only model names were rewritten: every example parses to mergekit's config model with our names."""
    from mergekit.config import MergeConfiguration

    names = {k: f"/models/{k.lower()}" for k in ("A", "B", "C", "BASE", "GPT2")}
    for example in EXAMPLES.values():
        MergeConfiguration.model_validate(yaml.safe_load(textwrap.dedent(example).format(**names)))


# -- beyond the examples: options mergekit accepts -------------------------------------------------------------
MORE = {
    # rescale and int8_mask are accepted by every generalized-task-arithmetic method of mergekit; on
    # task_arithmetic nothing is sparsified, so they change nothing (in either tool)
    "task_arithmetic_rescale_int8_mask": _basic("task_arithmetic", "{Z}", {"rescale": True, "int8_mask": True}),
    # slices with different sources, and different numbers of them, per slice
    "slices_2_then_1_linear": {"merge_method": "linear", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": "{A}", "layer_range": [0, 24], "parameters": {"weight": 0.3}},
                     {"model": "{B}", "layer_range": [0, 24], "parameters": {"weight": 0.7}}]},
        {"sources": [{"model": "{C}", "layer_range": [20, 40], "parameters": {"weight": 1.0}}]}]},
    "slices_3_then_2_ties": {"merge_method": "ties", "base_model": "{BASE}", "dtype": "bfloat16",
                             "parameters": {"density": 0.5, "weight": 1.0}, "slices": [
        {"sources": [{"model": "{BASE}", "layer_range": [0, 30]}, {"model": "{A}", "layer_range": [0, 30]},
                     {"model": "{B}", "layer_range": [0, 30]}]},
        {"sources": [{"model": "{BASE}", "layer_range": [30, 40]}, {"model": "{C}", "layer_range": [30, 40]}]}]},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MORE))
def test_more_mergekit_options_same_tensors(models: dict[str, str], tmp_path: Path, case: str) -> None:
    config = MORE[case]
    diff, note = _compare(_write(tmp_path, config, models), tmp_path)
    print(f"EXAMPLE more/{case} {config['dtype']} {diff:.3g} {'same' if diff == 0 else 'DIFFERS'} {note}")
    assert diff == 0.0


@pytest.mark.slow
def test_last_slice_with_more_sources_merges_all_of_them(models: dict[str, str], tmp_path: Path) -> None:
    """mergekit 0.1.5 pairs the post-stack tensors (final norm, LM head) of the last slice's sources with the
    first slice's source count, dropping the last slice's extra sources there (plan.py: ``[weight_info] *
    len(slices[0].sources)`` zipped with ``slices[-1].sources``). mergelab merges every source of the last
    slice: the same tensors everywhere else, and there the task arithmetic over all three."""
    config = {"merge_method": "task_arithmetic", "base_model": "{BASE}", "dtype": "float16", "slices": [
        {"sources": [{"model": "{BASE}", "layer_range": [0, 20]},
                     {"model": "{A}", "layer_range": [0, 20], "parameters": {"weight": 0.5}}]},
        {"sources": [{"model": "{BASE}", "layer_range": [20, 40]},
                     {"model": "{B}", "layer_range": [20, 40], "parameters": {"weight": 0.4}},
                     {"model": "{C}", "layer_range": [20, 40], "parameters": {"weight": 0.8}}]}]}
    _compare(_write(tmp_path, config, models), tmp_path)
    ours, theirs = load_output(tmp_path / "mergelab"), load_output(tmp_path / "mergekit")
    post = {"model.norm.weight", "lm_head.weight"}
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if n not in post)
    base, b, c = (load_output(Path(models[k])) for k in ("BASE", "B", "C"))
    h = torch.float16
    for name in post:
        x0, xb, xc = base[name].to(h), b[name].to(h), c[name].to(h)
        # mergekit: base + 0.4 (B − base), C left out; mergelab: base + 0.4 (B − base) + 0.8 (C − base)
        assert torch.equal(theirs[name], x0 + torch.tensor(0.4, dtype=h) * (xb - x0))
        assert not torch.equal(ours[name], theirs[name])
        expected = x0 + (torch.tensor(0.4, dtype=h) * (xb - x0) + torch.tensor(0.8, dtype=h) * (xc - x0))
        assert (ours[name].float() - expected.float()).abs().max() <= 2e-3  # float16 sums in a different order
