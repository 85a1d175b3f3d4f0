"""The compiled loops (mergelab/kernels) give the torch formulas' bits, on every input they take, and are
used only where they do; the engine's output is the same byte for byte with them and without them."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cli_helpers import STREAM_PIECE, assert_same_safetensors, method_config, weighted_config
from mergelab.kernels import dispatch, row_reductions
from mergelab.kernels.masked import key_histogram, masked_task_arithmetic
from mergelab.kernels.nonfinite import nonfinite_count
from mergelab.kernels.random_drops import dropped_consensus, rescaled_drop
from mergelab.kernels.row_ranks import argsort_ranks, stable_ranks
from mergelab.kernels.weighted_sums import linear_sum, task_arithmetic_sum
from mergelab.merge import engine
from mergelab.merge.core import one_thread
from mergelab.merge.plan import count_nonfinite
from mergelab.methods import get_method, model_stock, row_sums, slerp
from mergelab.methods.dare import _rescaled_drop, dare_merge
from mergelab.methods.della import _dropped_then_merged, della_merge
from mergelab.methods.linear import _linear_torch, linear_merge
from mergelab.methods.registry import FlatSource
from mergelab.methods.sparsify import TopK, band_of_keys, magnitude_keys, topk_of_keys
from mergelab.methods.task_arithmetic import task_arithmetic_merge
from mergelab.methods.task_vectors import (
    _masked_by_rules_torch,
    _probe_rules,
    _weighted_task_vectors,
    checked_task_vector_keys,
    generalized_task_arithmetic,
    masked_by_rules,
    rounded,
    task_vector,
    task_vector_keys,
)

Families = dict[str, tuple[Path, list[Path]]]


@pytest.fixture(autouse=True, scope="module")
def loaded() -> None:
    assert dispatch.warm_up(), "numba is a dependency: the loops must load (MERGELAB_KERNELS=0 in the environment?)"


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if the loops were not loaded: every call runs the torch formula."""
    monkeypatch.setattr(dispatch, "_loaded", [None])
    yield


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}[t.dtype])


def _bf16(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bfloat16)


# -- golden values ----------------------------------------------------------------------------------------------

def test_a_bfloat16_mean_halfway_between_two_bfloat16_numbers_rounds_to_the_even_one() -> None:
    # bfloat16 has 8 significant bits: between 1 and 2 its numbers are 1 + k/128. The mean of 1 and 1 + 1/128 is
    # 1 + 1/256, halfway: ties go to the even significand, 1. The mean of 1 + 1/128 and 1 + 2/128 is halfway
    # between an odd and an even one: 1 + 2/128.
    merged = linear_merge([_bf16(1.0, 1 + 1 / 128, 3.0), _bf16(1 + 1 / 128, 1 + 2 / 128, 5.0)], [1.0, 1.0])
    assert merged.tolist() == [1.0, 1 + 2 / 128, 4.0]
    assert dispatch.verdicts()[("linear", torch.bfloat16)]


def test_linear_multiplies_and_adds_with_one_rounding_as_torch_does() -> None:
    # float32 holds 24 significant bits. −1 first, then (1 + 2^-23)·(1 + 2^-22) = 1 + 2^-22 + 2^-23 + 2^-45 added:
    # rounded once after the addition (a fused multiply-add) the sum is 2^-22 + 2^-23 + 2^-45, exactly; with the
    # product rounded first (to 1 + 3·2^-23) it would be 2^-22 + 2^-23.
    x = torch.full((4096,), 1 + 2.0 ** -23, dtype=torch.float32)
    minus_one = torch.full((4096,), -1.0, dtype=torch.float32)
    merged = linear_merge([minus_one, x], [1.0, 1 + 2.0 ** -22], normalize=False)
    assert merged[0].item() == 2.0 ** -22 + 2.0 ** -23 + 2.0 ** -45
    assert torch.equal(_bits(merged), _bits(_linear_torch([minus_one, x], [1.0, 1 + 2.0 ** -22], False)))


def test_task_arithmetic_in_bfloat16_rounds_each_step_to_bfloat16() -> None:
    # base 1, model 1 + 3/128, weight 0.5: δ = 3/128, w·δ = 1.5/128, base + 1.5/128 is halfway between 1 + 1/128
    # (odd) and 1 + 2/128 (even): 1 + 2/128. In float32 steps the sum is exact (1.01171875) and rounds to the same
    # bfloat16 once; with weight 0.25, w·δ = 0.75/128, base + it = 1.005859375 → 1 + 1/128 either way.
    base, model = _bf16(1.0, 1.0), _bf16(1 + 3 / 128, 1 + 3 / 128)
    assert generalized_task_arithmetic(base, [model], [0.5], dtype=torch.bfloat16).tolist() == [1 + 2 / 128] * 2
    assert generalized_task_arithmetic(base, [model], [0.25], dtype=torch.bfloat16).tolist() == [1 + 1 / 128] * 2
    assert dispatch.verdicts()[("task_arithmetic in torch.bfloat16", torch.bfloat16)]


# -- the torch formulas' bits -----------------------------------------------------------------------------------

def _inputs(count: int, n: int, dtype: torch.dtype, seed: int, special: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=generator) * (0.02 if i % 2 else 3.0) for i in range(count)]
    if special and n >= 16:
        big = torch.finfo(dtype).max
        for i, t in enumerate(tensors):  # overflow, Inf, subnormals, signed zeros, rolled so that they meet
            t[:10] = torch.tensor([big, -big, big / 3, float("inf"), -float("inf"), 1e-40, -1e-40, 0.0, -0.0,
                                   2e-38]).roll(i)
    return [t.to(dtype) for t in tensors]


CASES = [(count, n, dtype, special) for count in (1, 2, 3, 5) for n in (1, 7, 4099)
         for dtype in (torch.bfloat16, torch.float32) for special in (False, True)]


@pytest.mark.parametrize(("count", "n", "dtype", "special"), CASES)
def test_linear_gives_the_bits_of_the_torch_formula(count: int, n: int, dtype: torch.dtype, special: bool) -> None:
    tensors = _inputs(count, n, dtype, seed=count * 100 + n, special=special)
    for weights, normalize in (([0.3 + 0.2 * i for i in range(count)], True), ([1.0] * count, True),
                               ([0.7 - 0.9 * i for i in range(count)], False)):
        fused = linear_sum(tensors, weights, normalize, _linear_torch)
        reference = _linear_torch(tensors, weights, normalize)
        if fused is None:  # only where the result holds a NaN (Inf − Inf): then the formula runs
            assert reference.isnan().any()
        else:
            assert torch.equal(_bits(fused), _bits(reference))
        assert torch.equal(_bits(linear_merge(tensors, weights, normalize=normalize)), _bits(reference))


@pytest.mark.parametrize(("count", "n", "dtype", "special"), CASES)
@pytest.mark.parametrize("arithmetic", [torch.float32, torch.bfloat16])
def test_task_arithmetic_gives_the_bits_of_the_torch_formula(count: int, n: int, dtype: torch.dtype, special: bool,
                                                             arithmetic: torch.dtype) -> None:
    base, *tensors = _inputs(count + 1, n, dtype, seed=count * 100 + n + 1, special=special)
    cases = (([0.3 + 0.2 * i for i in range(count)], False, 1.0), ([0.5] * count, True, 0.7),
             ([1.0 - 0.6 * i for i in range(count)], False, 1.3))
    for weights, normalize, lambda_ in cases:
        ws = [rounded(w, arithmetic) for w in weights]
        divisor = rounded(math.fsum(ws), arithmetic) if normalize else None
        reference = _weighted_task_vectors(base, tensors, ws, divisor, lambda_, arithmetic)
        fused = task_arithmetic_sum(base, tensors, ws, divisor, lambda_, arithmetic,
                                    lambda b, xs, w, d, lam: _weighted_task_vectors(b, xs, w, d, lam, arithmetic))
        if arithmetic == torch.bfloat16 and dtype == torch.float32:
            assert fused is None  # bfloat16 steps on float32 inputs: the loop does not cover it
        elif fused is None:
            assert reference.isnan().any()
        else:
            assert torch.equal(_bits(fused), _bits(reference))
        merged = task_arithmetic_merge(base, tensors, weights, lambda_=lambda_, normalize=normalize, dtype=arithmetic)
        assert torch.equal(_bits(merged), _bits(reference))


def test_a_nan_in_the_inputs_gives_the_nan_torch_gives() -> None:
    # which NaN Inf + NaN gives depends on the operands' order in the instruction: the formula runs instead
    x = _inputs(3, 5000, torch.float32, seed=0, special=False)
    x[0][17], x[1][17], x[2][17] = -float("inf"), float("inf"), float("nan")
    x[1][99] = float("nan")
    assert task_arithmetic_sum(x[0], x[1:], [0.3, 0.45], None, 1.0, torch.float32,
                               lambda b, xs, w, d, lam: _weighted_task_vectors(b, xs, w, d, lam, torch.float32)) is None
    merged = task_arithmetic_merge(x[0], x[1:], [0.3, 0.45])
    assert torch.equal(_bits(merged), _bits(_weighted_task_vectors(x[0], x[1:], [0.3, 0.45], None, 1.0, torch.float32)))
    assert linear_sum(x, [1.0, 1.0, 1.0], True, _linear_torch) is None


@pytest.mark.parametrize("case", ["strided", "float16", "float64", "mixed dtypes", "shapes differ", "requires grad",
                                  "empty", "sparse"])
def test_inputs_the_loops_do_not_take_run_the_torch_formula(case: str) -> None:
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    tensors = {"strided": [a.t(), b.t()], "float16": [a.half(), b.half()], "float64": [a.double(), b.double()],
               "mixed dtypes": [a, b.bfloat16()], "shapes differ": [a, b[:1]],
               "requires grad": [a.requires_grad_(), b], "empty": [a[:0], b[:0]],
               "sparse": [a.to_sparse(), b.to_sparse()]}[case]
    assert linear_sum(tensors, [0.5, 0.5], True, _linear_torch) is None
    if case not in ("shapes differ", "sparse"):  # the formula decides what those mean
        with torch.no_grad():
            assert torch.equal(linear_merge(tensors, [0.5, 0.5]), _linear_torch(tensors, [0.5, 0.5], True))


def test_merges_on_two_threads_at_once_give_the_one_thread_bits() -> None:
    tensors = _inputs(3, 1 << 18, torch.bfloat16, seed=5, special=False)
    expected = _linear_torch(tensors, [0.2, 0.3, 0.5], True)
    results: list[torch.Tensor] = []

    def work() -> None:
        results.extend(linear_merge(tensors, [0.2, 0.3, 0.5]) for _ in range(20))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(torch.equal(_bits(r), _bits(expected)) for r in results)


# -- masks from top-k rules (TIES, Breadcrumbs) ---------------------------------------------------------------

def _family(dtype: torch.dtype, n: int, count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes close to it: in bfloat16 their task vectors' magnitudes tie by the thousand."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator) * 0.02
    return base.to(dtype), [(base + torch.randn(n, generator=generator) * 0.002).to(dtype) for _ in range(count)]


def _rules(base: torch.Tensor, tensors: list[torch.Tensor], arithmetic: torch.dtype, band: bool) -> list[TopK]:
    keys = [magnitude_keys(task_vector(x, base, arithmetic)) for x in tensors]
    rules = [band_of_keys(k, d, 0.05) if band else topk_of_keys(k, d)  # type: ignore[arg-type]
             for k, d in zip(keys, (0.3, 0.6, 0.05), strict=False)]
    assert all(r is not None for r in rules)
    return rules  # type: ignore[return-value]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arithmetic", [None, "inputs"], ids=["float32 steps", "input dtype steps"])
@pytest.mark.parametrize(("band", "consensus", "normalize", "lambda_"), [
    (False, "sum", True, 1.0), (False, "count", False, 0.7), (False, "sum", False, 1.3),
    (True, None, False, 1.0), (True, None, True, 0.5), (True, "sum", True, 1.0)])
def test_masked_task_arithmetic_gives_the_bits_of_the_torch_formula(
        dtype: torch.dtype, arithmetic: str | None, band: bool, consensus: str | None, normalize: bool,
        lambda_: float) -> None:
    arith = dtype if arithmetic == "inputs" else None
    base, tensors = _family(dtype, 30_011, 3, seed=7)
    rules = _rules(base, tensors, arith or torch.float32, band)
    assert rules[0].ties is not None or rules[0].ceiling_ties is not None or dtype == torch.float32
    weights = [0.5, 0.75, -0.3]
    for start, stop in ((0, 30_011), (0, 10_000), (10_000, 20_000), (29_000, 30_011)):  # pieces, as streamed
        piece, piece_base = [t[start:stop] for t in tensors], base[start:stop]
        fused = masked_by_rules(piece_base, piece, weights, rules, start, consensus=consensus,  # type: ignore[arg-type]
                                normalize=normalize, lambda_=lambda_, dtype=arith)
        reference = _masked_by_rules_torch(piece_base, piece, weights, rules, start, consensus,  # type: ignore[arg-type]
                                           normalize, lambda_, arith)
        assert torch.equal(_bits(fused), _bits(reference)), (start, stop)
    assert dispatch.verdicts()[(f"masked task arithmetic in {arith or torch.float32}", dtype)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arithmetic", [None, "inputs"], ids=["float32 steps", "input dtype steps"])
@pytest.mark.parametrize(("consensus", "normalize", "lambda_"), [("sum", True, 1.0), ("count", False, 0.6)])
def test_dare_ties_with_random_masks_gives_the_bits_of_the_torch_formula(
        dtype: torch.dtype, arithmetic: str | None, consensus: str, normalize: bool, lambda_: float,
        monkeypatch: pytest.MonkeyPatch) -> None:
    arith = dtype if arithmetic == "inputs" else None
    base, tensors = _family(dtype, 30_011, 3, seed=11)
    kwargs = {"seed": 5, "consensus": consensus, "normalize": normalize, "lambda_": lambda_, "dtype": arith}
    fused = dare_merge(base, tensors, [0.5, 0.75, -0.3], [0.3, 0.9, 0.5], **kwargs)  # type: ignore[arg-type]
    assert dispatch.verdicts()[(f"masked task arithmetic with masks in {arith or torch.float32}", dtype)]
    monkeypatch.setattr(dispatch, "_loaded", [None])
    reference = dare_merge(base, tensors, [0.5, 0.75, -0.3], [0.3, 0.9, 0.5], **kwargs)  # type: ignore[arg-type]
    assert torch.equal(_bits(fused), _bits(reference))


def test_a_rescaled_drop_divides_the_entries_whose_coin_falls_below_their_probability() -> None:
    # coins 0.1 < 0.5 and 0.2 < 0.5: kept, 2 / 0.5 and -8 / 0.5; 0.25 = 0.25: dropped. 3 / 0.75 = 4 rounds in
    # bfloat16 from float32's 4.0 exactly; 1 / 0.375 = 2.6667 rounds to 2.671875 (8 significant bits)
    delta = _bf16(2.0, 4.0, -8.0, 3.0, 1.0)
    probabilities = _bf16(0.5, 0.25, 0.5, 0.75, 0.375)
    coins = torch.tensor([0.1, 0.25, 0.2, 0.74, 0.3])
    dropped = rescaled_drop(delta, probabilities, coins, _rescaled_drop)
    assert dropped is not None and dropped.tolist() == [4.0, 0.0, -16.0, 4.0, 2.671875]
    assert delta.tolist() == [2.0, 4.0, -8.0, 3.0, 1.0]  # a new tensor: the formula can still run on delta
    assert dispatch.verdicts()[("rescaled drop", torch.bfloat16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rescaled_drop_gives_the_bits_of_the_torch_formula_and_leaves_nan_to_it(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    delta = (torch.randn(30_011, generator=generator) * 0.002).to(dtype)
    delta[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    probabilities = (0.2 + 0.2 * torch.rand(30_011, generator=generator)).to(dtype)
    coins = torch.rand(30_011, generator=generator)
    coins[:4] = 0.0  # every special value kept
    fused = rescaled_drop(delta, probabilities, coins, _rescaled_drop)
    assert fused is not None and torch.equal(_bits(fused), _bits(_rescaled_drop(delta.clone(), probabilities, coins)))
    delta[9], coins[9] = float("nan"), 0.0
    assert rescaled_drop(delta, probabilities, coins, _rescaled_drop) is None
    assert rescaled_drop(delta.half(), probabilities.half(), coins, _rescaled_drop) is None  # no float16 loops
    assert rescaled_drop(delta, probabilities, coins.double(), _rescaled_drop) is None


def test_a_dropped_consensus_drops_rescales_and_merges_in_one_pass() -> None:
    # by hand: δ0 = (0.5, −1), δ1 = (0.25, 1), every p = 0.5; coins keep δ0's first entry and both of δ1's, so the
    # rescaled task vectors are (1, 0) and (0.5, 2). TIES (sum, normalized): entry 0 elects + and averages
    # (1 + 0.5) / 2, entry 1 only δ1 agrees: 2 / 1; onto the base (1, 2): (1.75, 4). Summed without a
    # consensus: (2.5, 4).
    base = torch.tensor([1.0, 2.0])
    deltas = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.0])]
    probabilities = [torch.tensor([0.5, 0.5])] * 2
    coins = [torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.3])]
    merged = dropped_consensus(base, deltas, probabilities, coins, [1.0, 1.0], "sum", True, 1.0, torch.float32,
                               _dropped_then_merged)
    assert merged is not None and merged.merged.tolist() == [1.75, 4.0] and merged.deltas_finite
    summed = dropped_consensus(base, deltas, probabilities, coins, [1.0, 1.0], None, False, 1.0, torch.float32,
                               _dropped_then_merged)
    assert summed is not None and summed.merged.tolist() == [2.5, 4.0] and summed.deltas_finite
    assert deltas[0].tolist() == [0.5, -1.0]  # the task vectors are only read
    assert dispatch.verdicts()[("dropped consensus in torch.float32", torch.float32)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_dropped_consensus_tells_of_a_nonfinite_delta_its_coin_dropped(bad: float, dtype: torch.dtype) -> None:
    # δ0's second entry, dropped above too (coin 0.9 ≥ p 0.5), made NaN or ±Inf: the merge is the same (1.75, 4)
    # and only the flag shows the bad entry
    base = torch.tensor([1.0, 2.0], dtype=dtype)
    deltas = [torch.tensor([0.5, bad], dtype=dtype), torch.tensor([0.25, 1.0], dtype=dtype)]
    probabilities = [torch.tensor([0.5, 0.5], dtype=dtype)] * 2
    coins = [torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.3])]
    merged = dropped_consensus(base, deltas, probabilities, coins, [1.0, 1.0], "sum", True, 1.0, dtype,
                               _dropped_then_merged)
    assert merged is not None and merged.merged.float().tolist() == [1.75, 4.0] and not merged.deltas_finite


def test_a_dropped_consensus_leaves_nan_float16_and_odd_inputs_to_the_formula() -> None:
    base, one = torch.zeros(3), [torch.ones(3)] * 2
    opposed = [torch.tensor([float("inf"), 1.0, 1.0]), torch.tensor([float("-inf"), 1.0, 1.0])]  # ∞ − ∞: NaN
    coins = [torch.zeros(3)] * 2
    args = ([1.0, 1.0], None, False, 1.0)
    assert dropped_consensus(base, opposed, one, coins, *args, torch.float32, _dropped_then_merged) is None
    assert dropped_consensus(base.half(), [t.half() for t in one], [t.half() for t in one], coins, *args,
                             torch.float16, _dropped_then_merged) is None  # no float16 loops
    assert dropped_consensus(base, one, one, [c.double() for c in coins], *args, torch.float32,
                             _dropped_then_merged) is None  # coins are float32
    assert dropped_consensus(base, one, one, coins, *args, torch.bfloat16, _dropped_then_merged) is None  # not base's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("consensus", "normalize", "lambda_"), [("sum", True, 1.0), (None, False, 0.6),
                                                                  ("count", False, -0.8)])
@pytest.mark.parametrize("tie_order", ["sort", "stable"])
def test_della_with_the_loops_gives_the_bits_of_the_torch_formula(
        dtype: torch.dtype, consensus: str | None, normalize: bool, lambda_: float, tie_order: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # rows of 1009 entries: ranks above 256 round in bfloat16, so several ranks share one keep probability
    base, tensors = _family(dtype, 30 * 1009, 3, seed=12)
    base, tensors = base.reshape(30, 1009), [t.reshape(30, 1009) for t in tensors]
    kwargs = {"seed": 5, "consensus": consensus, "normalize": normalize, "lambda_": lambda_, "dtype": dtype,
              "tie_orders": [tie_order] * 3}
    fused = della_merge(base, tensors, [0.5, 0.75, -0.3], [0.3, 0.6, 0.5], [0.1, 0.2, 0.05], **kwargs)  # type: ignore[arg-type]
    assert dispatch.verdicts()[(f"dropped consensus in {dtype}", dtype)]
    ranks = "row ranks" if tie_order == "sort" else "stable row ranks"
    assert (dtype == torch.float32 and tie_order == "stable") or dispatch.verdicts()[(ranks, dtype)]
    monkeypatch.setattr(dispatch, "_loaded", [None])
    reference = della_merge(base, tensors, [0.5, 0.75, -0.3], [0.3, 0.6, 0.5], [0.1, 0.2, 0.05], **kwargs)  # type: ignore[arg-type]
    assert torch.equal(_bits(fused), _bits(reference))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rule_without_a_threshold_keeps_no_infinite_entry_and_one_without_a_ceiling_keeps_it(
        dtype: torch.dtype) -> None:
    # the loop compares keys as int32 against int32's largest for "no threshold" / "no ceiling": above the key
    # of ±Inf (0x7F80 in bfloat16, 0x7F800000 in float32), so an infinite task-vector entry is not kept by a
    # rule that keeps nothing, and is kept by one with no ceiling
    base, tensors = _family(dtype, 4096, 2, seed=5)
    tensors[0][10], tensors[1][20], tensors[1][30] = float("inf"), float("-inf"), float("inf")
    for rules in ([TopK(None), TopK(0)], [TopK(0), TopK(None)], [TopK(0, ceiling=None), TopK(0)]):
        for consensus in ("sum", None):
            fused = masked_by_rules(base, tensors, [0.5, 0.5], rules, 0, consensus=consensus, normalize=False)
            reference = _masked_by_rules_torch(base, tensors, [0.5, 0.5], rules, 0, consensus, False, 1.0, None)
            assert torch.equal(_bits(fused), _bits(reference)), (rules, consensus)
            kept_inf = [bool(torch.isinf(fused[j])) for j in (10, 20, 30)]
            assert kept_inf == [rules[0].threshold is not None, rules[1].threshold is not None,
                                rules[1].threshold is not None], (rules, consensus)
    assert dispatch.verdicts()[("masked task arithmetic in torch.float32", dtype)]


def test_ties_kept_by_name_are_kept_and_the_other_ties_are_not() -> None:
    # worked by hand: model 0's task vector (1, 1, 1, 2) with its threshold at the key of 1 and, of the three
    # tied at it, only flat index 1 kept; model 1 keeps nothing. Without an election, weights 1, the merge of a
    # zero base is what model 0 keeps: (0, 1, 0, 2); the piece [1, 3) of it, (1, 0)
    key_of_one = int(torch.tensor(1.0, dtype=torch.bfloat16).view(torch.int16))
    base = torch.zeros(4, dtype=torch.bfloat16)
    tensors = [torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)]
    rules = [TopK(key_of_one, ties=torch.tensor([1])), TopK(None)]
    whole = masked_by_rules(base, tensors, [1.0, 1.0], rules, 0, consensus=None, normalize=False,
                            dtype=torch.bfloat16)
    assert whole.tolist() == [0.0, 1.0, 0.0, 2.0]
    piece = masked_by_rules(base[1:3], [t[1:3] for t in tensors], [1.0, 1.0], rules, 1, consensus=None,
                            normalize=False, dtype=torch.bfloat16)
    assert piece.tolist() == [1.0, 0.0]
    assert dispatch.verdicts()[("masked task arithmetic in torch.bfloat16", torch.bfloat16)]


def test_a_band_of_one_key_with_ties_kept_by_name_is_left_to_the_formula() -> None:
    # threshold = ceiling: an entry listed at one edge must also be listed at the other, which the loop's one row
    # of names per rule cannot say; the loop declines and the formula decides
    base, tensors = _family(torch.bfloat16, 4096, 2, seed=9)
    keys = magnitude_keys(task_vector(tensors[0], base, torch.float32))
    assert keys is not None
    tied = int(keys.mode().values)
    at_key = torch.nonzero(keys == tied).flatten()
    band = TopK(tied, ties=at_key[::2], ceiling=tied, ceiling_ties=at_key[::3])
    rules = [band, TopK(0)]
    merged = masked_by_rules(base, tensors, [0.5, 0.5], rules, 0, consensus="sum", normalize=True)
    reference = _masked_by_rules_torch(base, tensors, [0.5, 0.5], rules, 0, "sum", True, 1.0, None)
    assert torch.equal(_bits(merged), _bits(reference))
    assert dispatch.verdicts()[("masked task arithmetic in torch.float32", torch.bfloat16)]  # the loop is in use...
    assert masked_task_arithmetic(base, tensors, [0.5, 0.5], rules, 0, "sum", True, 1.0, torch.float32,
                                  _masked_by_rules_torch, _probe_rules) is None  # ...and declines this one
    kept = band.mask(keys)  # the formula's mask: only the entries listed at both edges
    assert int(kept.sum()) == len(set(at_key[::2].tolist()) & set(at_key[::3].tolist())) > 0


def test_a_nan_in_a_masked_task_vector_gets_the_formula_and_its_error() -> None:
    base, tensors = _family(torch.bfloat16, 5000, 2, seed=3)
    rules = _rules(base, tensors, torch.float32, band=False)
    tensors[1][77] = float("nan")
    with pytest.raises(ValueError, match="without keys"):
        _masked_by_rules_torch(base, tensors, [0.5, 0.5], rules, 0, "sum", True, 1.0, None)
    with pytest.raises(ValueError, match="without keys"):
        masked_by_rules(base, tensors, [0.5, 0.5], rules, 0, consensus="sum", normalize=True)


def test_masked_weights_summing_to_zero_are_refused_as_by_the_formula() -> None:
    base, tensors = _family(torch.bfloat16, 5000, 2, seed=3)
    rules = _rules(base, tensors, torch.float32, band=True)
    with pytest.raises(ValueError, match="sum to zero"):
        masked_by_rules(base, tensors, [0.5, -0.5], rules, 0, consensus=None, normalize=True)


@pytest.mark.parametrize("loaded", [True, False], ids=["loops", "torch"])
def test_della_linear_weights_summing_to_zero_are_refused_with_the_loops_and_without(
        loaded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not loaded:
        monkeypatch.setattr(dispatch, "_loaded", [None])
    base, tensors = _family(torch.bfloat16, 40 * 50, 2, seed=3)
    base, tensors = base.reshape(40, 50), [t.reshape(40, 50) for t in tensors]
    with pytest.raises(ValueError, match="sum to zero"):
        della_merge(base, tensors, [0.5, -0.5], [0.3, 0.3], [0.1, 0.1], seed=1, consensus=None, normalize=True,
                    dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arithmetic", [torch.float32, torch.bfloat16])
def test_task_vector_keys_in_one_pass_are_the_keys_of_torchs_task_vector(dtype: torch.dtype,
                                                                         arithmetic: torch.dtype) -> None:
    base, (x, *_) = dispatch.probe(dtype, 2)
    base, x = base.nan_to_num(0.0), x.nan_to_num(0.0)  # ±Inf, ±0, subnormals, the largest values stay
    expected = magnitude_keys(task_vector(x, base, arithmetic)).reshape(-1)  # type: ignore[union-attr]
    out = torch.full((base.numel() + 10,), -1, dtype=expected.dtype)
    got = task_vector_keys(x, base, arithmetic, out=out[5:-5])
    assert got is not None and got.data_ptr() == out[5:].data_ptr()  # written where asked, not a copy
    assert torch.equal(got, expected)
    assert (out[:5] == -1).all() and (out[-5:] == -1).all()
    # float32 inputs with bfloat16 steps are left to torch (the loops take float32 steps or the inputs' dtype)
    compiled = dtype == arithmetic or arithmetic == torch.float32
    assert dispatch.verdicts().get((f"magnitude keys in {arithmetic}", dtype)) is (True if compiled else None)


def test_a_nan_task_vector_has_no_keys_with_the_loop_or_without(monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.zeros(100, dtype=torch.bfloat16)
    x = torch.ones(100, dtype=torch.bfloat16)
    x[37] = float("nan")
    assert task_vector_keys(x, base, torch.bfloat16) is None
    # -0.0 and +0.0 are one key, and +Inf is a key (not a NaN)
    x[37], x[0], x[1] = float("inf"), -0.0, 0.0
    keys = task_vector_keys(x, base, torch.bfloat16)
    assert keys is not None and keys[0] == keys[1] == 0 and keys[37] == 0x7F80
    monkeypatch.setattr(dispatch, "_loaded", [None])
    assert torch.equal(task_vector_keys(x, base, torch.bfloat16), keys)  # type: ignore[arg-type]


@pytest.mark.parametrize("loaded", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("arithmetic", [torch.bfloat16, torch.float32])
def test_keys_below_infinitys_prove_the_model_and_the_base_finite(
        monkeypatch: pytest.MonkeyPatch, loaded: bool, arithmetic: torch.dtype) -> None:
    if loaded:
        assert dispatch.warm_up()
    else:
        monkeypatch.setattr(dispatch, "_loaded", [None])
    base, x = torch.zeros(100, dtype=arithmetic), torch.linspace(-1, 1, 100, dtype=arithmetic)
    found = checked_task_vector_keys(x, base, arithmetic)
    assert found is not None and found[1] is True
    assert torch.equal(found[0], magnitude_keys(task_vector(x, base, arithmetic)).reshape(-1))  # type: ignore[union-attr]
    for where, value in (("model", float("inf")), ("model", -float("inf")), ("base", float("inf"))):
        y, b = x.clone(), base.clone()
        (y if where == "model" else b)[41] = value
        found = checked_task_vector_keys(y, b, arithmetic)
        assert found is not None and found[1] is False, (where, value)  # an Inf: keys, but no proof
    y, b = x.clone(), base.clone()
    y[41], b[41] = float("inf"), float("inf")
    assert checked_task_vector_keys(y, b, arithmetic) is None  # Inf - Inf: a NaN, no keys
    y, b = x.clone(), base.clone()
    y[41], b[41] = 3e38, -3e38  # finite inputs whose difference overflows: no proof, the scan decides
    found = checked_task_vector_keys(y, b, arithmetic)
    assert found is not None and found[1] is False


@pytest.mark.parametrize("n", [17, 1000, 100_003])
def test_the_compiled_sort_replay_keeps_the_tied_entries_torchs_argsort_keeps(n: int) -> None:
    # few distinct magnitudes (multiples of 0.002 up to ~0.02), so that ties straddle the k-th entry at every n:
    # only then does the replay run (with n = 17 drawn continuously, no tie did, and no verdict was recorded)
    values = ((torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).round().abs() * 0.002).bfloat16()
    keys = magnitude_keys(values)
    k = n // 3
    descending = values.float().sort(descending=True).values
    assert descending[k - 1] == descending[k]  # the premise: a tie straddles the boundary
    rule = topk_of_keys(keys.clone(), k / n)  # type: ignore[union-attr]
    order = torch.argsort(values.float(), descending=True)[:k]
    assert rule is not None and rule.threshold is not None
    kept = set(rule.mask(keys).nonzero().flatten().tolist())  # type: ignore[arg-type]
    assert kept == set(order.tolist())
    assert dispatch.verdicts()[("sort replay", None)]


def test_the_compiled_sort_replay_declines_where_introsort_would_fall_back_to_heapsort() -> None:
    keys = (np.abs(np.random.default_rng(0).normal(size=1000)) * 40).astype(np.int16)
    v, idx = keys.copy(), np.arange(1000, dtype=np.int32)
    module = dispatch.loops()
    assert module is not None
    assert not module.sort_replay_loop(v, idx, np.asarray([300], np.int64), 0)  # depth limit reached at once
    assert module.sort_replay_loop(v, idx, np.asarray([300], np.int64), 2 * (1000).bit_length())


def test_the_key_histogram_counts_each_key_as_bincount_does() -> None:
    # by hand: keys 3, 3, 0, 32767, 3 (five: one past the loop's groups of four) -> counts 1 at 0, 3 at 3, 1 at 32767
    counts = key_histogram(torch.tensor([3, 3, 0, 32767, 3], dtype=torch.int16))
    assert counts is not None and counts.dtype == torch.int64 and counts.numel() == 1 << 15
    assert (counts[0], counts[3], counts[32767], int(counts.sum())) == (1, 3, 1, 5)
    keys = magnitude_keys((torch.randn(100_003, generator=torch.Generator().manual_seed(1)) * 0.002).bfloat16())
    assert torch.equal(key_histogram(keys), torch.bincount(keys, minlength=1 << 15))  # type: ignore[arg-type]
    assert dispatch.verdicts()[("key histogram", torch.int16)]


def test_the_key_histogram_declines_negative_keys_and_other_dtypes() -> None:
    assert key_histogram(torch.tensor([1, -2, 3], dtype=torch.int16)) is None
    assert key_histogram(torch.tensor([1, 2, 3], dtype=torch.int32)) is None
    assert key_histogram(torch.tensor([1, 2, 3, 4], dtype=torch.int16)[::2]) is None  # not contiguous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_ranks_are_where_torchs_argsort_puts_each_entry_ties_included(dtype: torch.dtype) -> None:
    # by hand: row [0.5, 0.25, 0.5] ascending is 0.25, then the two 0.5s in the order std::sort leaves them
    ranks = argsort_ranks(torch.tensor([[0.5, 0.25, 0.5]], dtype=dtype))
    assert ranks is not None and ranks[0, 1] == 0 and sorted(ranks[0].tolist()) == [0, 1, 2]
    values = (torch.randn(40, 2048, generator=torch.Generator().manual_seed(2)) * 0.002).to(dtype).abs()
    values[3] = values[3, 0]  # a whole row of one magnitude
    order = torch.argsort(values, dim=1)
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(2048).expand_as(order))
    got = argsort_ranks(values)
    assert got is not None and torch.equal(got.long(), expected)
    assert dispatch.verdicts()[("row ranks", dtype)]
    for table_dtype in (torch.bfloat16, torch.float32):  # a value per rank, looked up as the ranks are found
        table = torch.linspace(0.2, 0.4, 2048).to(table_dtype)
        looked_up = argsort_ranks(values, table)
        assert looked_up is not None and looked_up.dtype == table_dtype and torch.equal(looked_up, table[expected])


@pytest.mark.parametrize("n", [1 << 16, (1 << 16) + 1])
def test_row_ranks_of_rows_too_long_to_pack_a_position_beside_a_16_bit_key_are_torchs_too(n: int) -> None:
    # up to 2^16 entries a row's 16-bit keys and positions share one word; one more entry takes two arrays
    values = (torch.randn(2, n, generator=torch.Generator().manual_seed(3)) * 0.002).bfloat16().abs()
    order = torch.argsort(values, dim=1)
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
    got = argsort_ranks(values)
    assert got is not None and torch.equal(got.long(), expected)


def test_row_ranks_leave_nan_other_dtypes_and_other_shapes_to_torch() -> None:
    assert argsort_ranks(torch.tensor([[1.0, float("nan"), 2.0]])) is None  # torch ties every NaN
    assert argsort_ranks(torch.tensor([[1.0, 2.0]], dtype=torch.float64)) is None
    assert argsort_ranks(torch.tensor([1.0, 2.0])) is None  # 1-D: the caller makes it one row
    assert argsort_ranks(torch.tensor([[1.0, -2.0]])) is None  # not magnitudes
    # a table must hold one value per rank, of a dtype the loops write
    assert argsort_ranks(torch.tensor([[1.0, 2.0]]), torch.tensor([0.1, 0.2, 0.3])) is None
    assert argsort_ranks(torch.tensor([[1.0, 2.0]]), torch.tensor([0.1, 0.2], dtype=torch.float16)) is None



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stable_ranks_are_a_stable_sorts_of_the_magnitudes_ties_by_index(dtype: torch.dtype) -> None:
    # by hand: |[-0.5, 0.25, 0.5, -0.0, 0.0]| ascending, ties by index: 0.0 (3), 0.0 (4), 0.25 (1), 0.5 (0), 0.5 (2)
    got = stable_ranks(torch.tensor([[-0.5, 0.25, 0.5, -0.0, 0.0]], dtype=dtype), torch.arange(5.0))
    assert got is not None and got.tolist() == [[3.0, 2.0, 4.0, 0.0, 1.0]]
    values = (torch.randn(40, 2048, generator=torch.Generator().manual_seed(2)) * 0.002).to(dtype)
    values[3] = values[3, 0]  # a whole row of one magnitude, both signs
    values[3, ::2] *= -1
    values[5, ::3] = 0.0  # runs of zeros, either sign
    values[5, 1::3] = -0.0
    values[7] = (values[7] * 100).round() / 100  # a handful of magnitudes, each tied many times
    # rows whose keys span more buckets than twice their length are radix-sorted, the others counted: both here
    values[9] = torch.exp2(torch.randint(-120, 120, (2048,), generator=torch.Generator().manual_seed(5)))
    values[9, ::5] = values[9, 0]
    values[11, :4] = torch.tensor([1e-30, 1e30, 0.0, -1e-30])  # a long span beside ties and zeros
    order = torch.argsort(values.abs().float(), dim=1, stable=True)
    for table_dtype in (torch.bfloat16, torch.float32):
        table = torch.linspace(0.2, 0.4, 2048).to(table_dtype)
        expected = torch.empty(order.shape, dtype=table_dtype).scatter_(1, order, table.expand_as(order))
        got = stable_ranks(values, table)
        assert got is not None and got.dtype == table_dtype and torch.equal(got, expected)
    assert dispatch.verdicts()[("stable row ranks", dtype)]


def test_stable_ranks_of_rows_longer_than_a_16_bit_position_are_a_stable_sorts_too() -> None:
    n = (1 << 16) + 3  # a position of the packed order above 16 bits
    values = ((torch.randn(2, n, generator=torch.Generator().manual_seed(3)) * 50).round() / 1e4).bfloat16()
    order = torch.argsort(values.abs().float(), dim=1, stable=True)
    table = torch.arange(n, dtype=torch.float32)
    got = stable_ranks(values, table)
    assert got is not None and torch.equal(got.long(), torch.empty_like(order).scatter_(1, order, table.long()
                                                                                          .expand_as(order)))


def test_stable_ranks_leave_nan_wide_dtypes_and_other_shapes_to_the_caller() -> None:
    table = torch.tensor([0.1, 0.2, 0.3])
    assert stable_ranks(torch.tensor([[1.0, float("nan"), 2.0]]).bfloat16(), table) is None  # torch puts NaN last
    assert stable_ranks(torch.tensor([[1.0, float("-inf"), 2.0]]).bfloat16(), table) is not None  # Inf is a key
    assert stable_ranks(torch.tensor([[1.0, 2.0, 3.0]]), table) is None  # float32: 32-bit keys, numpy's sort
    assert stable_ranks(torch.tensor([1.0, 2.0, 3.0]).bfloat16(), table) is None  # 1-D: the caller makes a row
    assert stable_ranks(torch.tensor([[1.0, 2.0]]).bfloat16(), table) is None  # one table value per rank
    assert stable_ranks(torch.tensor([[1.0, 2.0, 3.0]]).bfloat16(), table.double()) is None

# -- loading ------------------------------------------------------------------------------------------------------

def test_a_loop_is_checked_once_when_two_threads_need_its_verdict_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_verdicts", {})
    runs: list[str] = []
    started, release, waiting = threading.Event(), threading.Event(), threading.Event()

    class SeenWaiting(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            return super().wait(timeout)

    check_of = dispatch._Check
    monkeypatch.setattr(dispatch, "_Check", lambda thread, _: check_of(thread, SeenWaiting()))

    def check() -> bool:
        runs.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)  # the other thread asks while this check runs
        return True

    verdicts: list[bool] = []
    first = threading.Thread(target=lambda: verdicts.append(dispatch.verified("probe loop", torch.float32, check)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: verdicts.append(dispatch.verified("probe loop", torch.float32, check)))
    second.start()
    assert waiting.wait(10) and len(runs) == 1  # waiting for the verdict, not checking again
    release.set()
    first.join(10)
    second.join(10)
    assert verdicts == [True, True] and len(runs) == 1
    assert dispatch.verdicts()[("probe loop", torch.float32)] is True and not dispatch._checking


def test_a_check_that_needs_its_own_verdict_finds_the_loop_unverified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_verdicts", {})
    inner: list[bool] = []

    def check() -> bool:
        inner.append(dispatch.verified("probe loop", None, check))  # no deadlock: the loop is not used in it
        return True

    assert dispatch.verified("probe loop", None, check) is True and inner == [False]


def test_an_interrupted_check_leaves_no_verdict_and_the_next_caller_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_verdicts", {})

    def interrupted() -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dispatch.verified("probe loop", None, interrupted)
    assert ("probe loop", None) not in dispatch.verdicts() and not dispatch._checking
    assert dispatch.verified("probe loop", None, lambda: False) is False  # a failed check: the formula runs
    assert dispatch.verified("probe loop", None, lambda: True) is False  # found once per process


def _python(code: str, **env: str) -> str:
    import os
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src"), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_nothing_loads_numba_until_asked() -> None:
    out = _python("import sys, torch\n"
                  "from mergelab.methods import linear_merge\n"
                  "import mergelab.merge.engine\n"
                  "x = torch.randn(1 << 20).bfloat16()\n"
                  "linear_merge([x, x], [1.0, 2.0])\n"
                  "print('numba' in sys.modules)")
    assert out == "False"


def test_with_mergelab_kernels_0_nothing_loads_and_merges_still_run() -> None:
    out = _python("import sys, torch\n"
                  "from mergelab.kernels.dispatch import warm_up\n"
                  "from mergelab.methods import linear_merge\n"
                  "print(warm_up(), 'numba' in sys.modules, linear_merge([torch.ones(3), torch.zeros(3)]).tolist())",
                  MERGELAB_KERNELS="0")
    assert out == "False False [0.5, 0.5, 0.5]"


def test_under_a_memory_limit_the_loops_are_not_loaded() -> None:
    # numba's load imports scipy's OpenBLAS, which spins forever in mmap when its buffers do not fit a limit
    out = _python("import resource, sys\n"
                  "limit = 64 << 30\n"
                  "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
                  "from mergelab.kernels.dispatch import warm_up\n"
                  "print(warm_up(), 'numba' in sys.modules)")
    assert out == "False False"


# -- torch's row sums (SLERP, Model Stock) ------------------------------------------------------------------------

LANES = row_sums.lanes_for(torch.float32)


def _offset_sums(base: torch.Tensor, xs: list[torch.Tensor], dtype: torch.dtype,
                 piece: int = 65_536) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    sums = row_reductions.offset_sums(len(xs), base.numel(), dtype, row_sums.lanes_for(dtype))
    assert sums is not None
    for a in range(0, base.numel(), piece):
        assert sums.add(base[a:a + piece], [x[a:a + piece] for x in xs])
    return sums.results()


def test_a_row_is_summed_lane_by_lane_as_torchs_vectors_sum_it_not_in_entry_order() -> None:
    # 16 float32 entries = two vectors of 8 lanes: lane 0 gets 2^24 + (−2^24) = 0, lanes 1 and 2 get 1 each, so the
    # lanes add up to 2; in entry order, 2^24 + 1 rounds back to 2^24 twice and the sum is 0
    row = torch.zeros(16)
    row[0], row[1], row[2], row[8] = 2.0 ** 24, 1.0, 1.0, -(2.0 ** 24)
    assert LANES == 8
    with one_thread():
        assert float(row.reshape(1, -1).sum(dim=-1)) == 2.0
    norms, dots = _offset_sums(torch.zeros(16), [row, torch.ones(16)], torch.float32)
    assert float(dots[0]) == 2.0
    assert float(norms[1]) == 4.0  # √16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [16, 17, 4099, 70_001, 300_007])  # 300 007: past the cascade's third level
def test_model_stock_sums_fed_in_pieces_are_torchs_sums_of_the_whole_rows(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    xs = [(base.float() + torch.randn(n, generator=g) * 0.002).to(dtype) for _ in range(3)]
    norms, dots = _offset_sums(base, xs, dtype)
    offsets = [(x - base).reshape(1, -1) for x in xs]
    with one_thread():
        assert [_bits(x) for x in norms] == [_bits(d.norm(dim=-1)) for d in offsets]
        assert [_bits(x) for x in dots] == [_bits((offsets[i] * offsets[j]).sum(dim=-1))
                                            for i in range(3) for j in range(i + 1, 3)]


def test_model_stock_pieces_off_the_vector_grid_are_declined() -> None:
    n = 4096
    sums = row_reductions.offset_sums(2, n, torch.bfloat16, row_sums.lanes_for(torch.bfloat16))
    assert sums is not None
    x = torch.randn(n).to(torch.bfloat16)
    assert sums.add(x[:100], [x[:100], x[:100]])  # 100 entries: not a whole number of 64-entry steps
    assert not sums.add(x[100:], [x[100:], x[100:]])


def test_model_stock_sums_that_overflow_are_left_to_the_numpy_replay() -> None:
    big = torch.full((4096,), 3e38)
    assert _offset_sums(torch.zeros(4096), [big, -big], torch.float32) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [1 << 20, 4096])
def test_model_stock_ratio_has_the_bits_of_the_numpy_replay(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                             chunk: int) -> None:
    monkeypatch.setattr(model_stock, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(300, 1001, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(300, 1001, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    calls: list[bool] = []
    real = model_stock._compiled_sums
    monkeypatch.setattr(model_stock, "_compiled_sums", lambda *a: calls.append(True) or real(*a))  # type: ignore[func-returns-value]
    with one_thread():
        compiled = model_stock.model_stock_ratio(FlatSource.of(base, xs), dtype=dtype)
        assert calls
        monkeypatch.setattr(model_stock, "_compiled_sums", lambda *a: None)
        replayed = model_stock.model_stock_ratio(FlatSource.of(base, xs), dtype=dtype)
        whole = model_stock.model_stock_merge(base, xs, dtype=dtype)
    assert torch.equal(_bits(compiled), _bits(replayed))
    assert torch.equal(_bits(model_stock.model_stock_merge(base, xs, dtype=dtype, scalars=compiled)), _bits(whole))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [16, 17, 4099, 1 << 20])
def test_slerp_chunk_sums_are_torchs_on_one_thread(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    sums = row_reductions.chunk_sums(dtype, LANES)
    assert sums is not None
    with one_thread():
        a32, b32 = a.reshape(1, -1).float(), b.reshape(1, -1).float()
        na, nb = torch.linalg.vector_norm(a32, dim=1), torch.linalg.vector_norm(b32, dim=1)
        dot = (a32 / na * (b32 / nb)).sum(dim=1)
        assert sums.norms(a, b) == (float(na), float(nb))
        assert sums.normalized_dot(a, b, float(na), float(nb)) == float(dot)


def test_slerp_chunk_sums_are_declined_on_more_than_one_torch_thread() -> None:
    # torch splits a long row's sum between its threads, in an order of their own
    sums = row_reductions.chunk_sums(torch.float32, LANES)
    assert sums is not None
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert sums.norms(torch.ones(1 << 16), torch.ones(1 << 16)) is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_coefficients_have_the_bits_of_torchs_chunk_sums(monkeypatch: pytest.MonkeyPatch,
                                                               dtype: torch.dtype) -> None:
    monkeypatch.setattr(slerp, "_CHUNK", 70_001)  # chunks that end mid-vector
    g = torch.Generator().manual_seed(2)
    v0 = torch.randn(300, 1001, generator=g).to(dtype)
    v1 = (v0.float() + torch.randn(300, 1001, generator=g) * 0.3).to(dtype)
    with one_thread():
        compiled = slerp.slerp_coefficients(0.4, FlatSource.of(v0, [v1]))
        monkeypatch.setattr(slerp, "_compiled_sums", lambda x: None)
        formula = slerp.slerp_coefficients(0.4, FlatSource.of(v0, [v1]))
    assert all(torch.equal(_bits(c), _bits(f)) for c, f in zip(compiled, formula, strict=True))
    assert ("chunk sums 8", dtype) in dispatch.verdicts() and dispatch.verdicts()[("chunk sums 8", dtype)]


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_a_nan_or_inf_in_slerp_and_model_stock_inputs_gets_the_torch_numbers(monkeypatch: pytest.MonkeyPatch,
                                                                              special: float) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=g).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(5000, generator=g) * 0.1).to(torch.bfloat16) for _ in range(2)]
    xs[1][4321] = special
    with one_thread():
        fused = (slerp.slerp_merge(0.4, base, xs[1]), model_stock.model_stock_merge(base, xs, dtype=torch.bfloat16))
        monkeypatch.setattr(dispatch, "_loaded", [None])
        formula = (slerp.slerp_merge(0.4, base, xs[1]), model_stock.model_stock_merge(base, xs, dtype=torch.bfloat16))
    for f, t in zip(fused, formula, strict=True):
        assert torch.equal(f.isnan(), t.isnan()) and torch.equal(_bits(f)[~t.isnan()], _bits(t)[~t.isnan()])


# -- in the engine ----------------------------------------------------------------------------------------------

def _watch_loops(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every later ask of a kernel module for the loops, in order: whether it got them."""
    asks: list[bool] = []
    real = dispatch.loops

    def spy() -> Any:
        module = real()
        asks.append(module is not None)
        return module

    for module in ("weighted_sums", "masked", "row_reductions", "row_ranks", "random_drops"):
        monkeypatch.setattr(f"mergelab.kernels.{module}.loops", spy)
    return asks


@pytest.mark.parametrize(("method", "extra"), [
    ("linear", {}), ("linear", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("task_arithmetic", {}), ("task_arithmetic", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("task_arithmetic", {"parameters": {"normalize": True, "lambda": 0.6}}),
    ("ties", {}), ("ties", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("ties", {"parameters": {"consensus": "count", "lambda": 0.8, "normalize": False}}),
    ("breadcrumbs", {}), ("breadcrumbs", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("breadcrumbs_ties", {"parameters": {"normalize": True}}),
    ("dare_ties", {}), ("dare_ties", {"dtype": "bfloat16", "out_dtype": "bfloat16", "parameters": {"lambda": 0.9}}),
    ("slerp", {}), ("slerp", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("model_stock", {}), ("model_stock", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("della", {}), ("della", {"dtype": "bfloat16", "out_dtype": "bfloat16"}), ("della_linear", {"dtype": "float16"}),
])
@pytest.mark.parametrize("piece_entries", [STREAM_PIECE, 1 << 30], ids=["streamed", "whole"])
def test_a_merge_gives_the_same_bytes_with_the_loops_and_without(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        extra: dict[str, Any], piece_entries: int) -> None:
    base, fts = families["llama"]
    config = method_config(method, base, fts, **extra)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", piece_entries)
    calls = _watch_loops(monkeypatch)
    if method in ("dare_ties", "della", "della_linear"):
        config["seed"] = 3
    fused = engine.run_merge(config, tmp_path / "fused", progress=False, hash_inputs=False).out_dir
    assert calls and all(calls)
    monkeypatch.setattr(dispatch, "_loaded", [None])
    calls.clear()
    formula = engine.run_merge(config, tmp_path / "torch", progress=False, hash_inputs=False).out_dir
    assert not any(calls)  # (a whole TIES tensor does not even ask: its masks are found as before)
    assert_same_safetensors(fused, formula)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                                    "dare_linear", "dare_ties", "della", "della_linear", "slerp", "model_stock",
                                    "nearswap"])
def test_a_method_is_marked_compiled_exactly_when_its_merge_uses_the_loops(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # the mark is what makes the engine load the loops ahead of a large merge: DARE-TIES and DELLA lacked it, so
    # `mergelab merge` ran them with the torch formulas (DELLA 3 × 0.5 GB: 26.8–27.1 s, 12.3–12.4 with the loops)
    base, fts = families["llama"]
    used = _watch_loops(monkeypatch)
    config = method_config(method, base, fts, dtype="bfloat16")
    if get_method(method).randomized:
        config["seed"] = 3
    engine.run_merge(config, tmp_path / "out", progress=False, hash_inputs=False)
    assert get_method(method).compiled == any(used)


@pytest.mark.parametrize(("method", "threshold", "warmed"), [
    ("linear", 0, True), ("task_arithmetic", 0, True), ("ties", 0, True), ("breadcrumbs", 0, True),
    ("slerp", 0, True), ("model_stock", 0, True), ("dare_ties", 0, True), ("della", 0, True),
    ("della_linear", 0, True), ("linear", 1 << 40, False), ("nearswap", 0, False), ("dare_linear", 0, False)])
def test_the_engine_loads_the_loops_ahead_of_large_merges_of_methods_that_have_them(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, threshold: int,
        warmed: bool) -> None:
    base, fts = families["llama"]
    calls: list[int] = []
    monkeypatch.setattr(engine, "_WARM_UP_BYTES", threshold)
    monkeypatch.setattr(engine, "warm_up_in_background", lambda: calls.append(1))
    config = method_config(method, base, fts)
    engine.run_merge(config, tmp_path / "out", progress=False, hash_inputs=False)
    assert bool(calls) is warmed


def test_a_merge_that_starts_before_the_loops_are_loaded_gives_the_same_bytes(
        families: Families, tmp_path: Path) -> None:
    # a fresh process: the engine loads the loops in the background and merges with torch until they are ready
    base, fts = families["llama"]
    code = ("import sys, threading\n"
            "from mergelab.merge import engine\n"
            "from mergelab.kernels import dispatch\n"
            "engine._WARM_UP_BYTES = 0\n"
            "engine._PIECE_ENTRIES = 37\n"
            f"config = {weighted_config('linear', base, fts)!r}\n"
            "engine.run_merge(config, sys.argv[1], progress=False, hash_inputs=False)\n"
            "print(dispatch.warm_up())\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "background")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    reference = engine.run_merge(weighted_config("linear", base, fts), tmp_path / "here", progress=False,
                                 hash_inputs=False).out_dir
    assert_same_safetensors(tmp_path / "background", reference)


# --- the Mersenne Twister's draws ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32 + 7, 2**63 - 2, 2**64 - 1])
def test_compiled_twister_draws_torch_rands_numbers_across_the_states_refills(seed: int) -> None:
    from mergelab.kernels.mersenne_draws import MersenneDraws, mersenne_draws

    reference, draws = torch.Generator().manual_seed(seed), MersenneDraws(seed)
    # 624 words per refill: pieces that end one before, on, and one after a refill, then a long one
    for numel in (623, 1, 1, 1_248, 100_003):
        assert torch.equal(draws.take(numel), torch.rand(numel, generator=reference))
    assert mersenne_draws(torch.Generator().manual_seed(seed)) is not None
    assert dispatch.verdicts()[("mersenne twister draws", None)]


def test_a_generator_that_has_drawn_gets_no_compiled_twin() -> None:
    from mergelab.kernels.mersenne_draws import mersenne_draws

    used = torch.Generator().manual_seed(3)
    torch.rand(1, generator=used)
    assert mersenne_draws(used) is None
    assert mersenne_draws(torch.Generator().manual_seed(3)) is not None


def test_carried_generators_draw_with_the_compiled_twins_and_leave_the_generators_untouched() -> None:
    from mergelab.methods.dare import CarriedGenerators

    generators = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    states = [g.get_state() for g in generators]
    carried = CarriedGenerators(generators, (3_000,), [True, True])
    coins = [carried.for_piece("dare", a, 1_000).take("dare", a, 1_000) for a in (0, 1_000, 2_000)]
    for i, seed in enumerate((11, 12)):
        whole = torch.rand(3_000, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.cat([piece[i]((1_000,)) for piece in coins]), whole)
        assert torch.equal(generators[i].get_state(), states[i])  # the twins drew, not torch's kernel


def test_every_compiled_loop_declines_tensors_off_the_cpu() -> None:
    # a GPU merge loads the loops too (its selections stay on the CPU), so no loop may take a device tensor;
    # meta tensors stand in for CUDA ones here (tests/test_engine_cuda.py runs the real thing)
    from mergelab.kernels.masked import magnitude_keys_into, masked_consensus_with_masks, masked_task_arithmetic
    from mergelab.kernels.weighted_sums import interpolation_sum, model_stock_sum

    def never(*_: object) -> torch.Tensor:
        raise AssertionError("a loop's fallback formula was called for tensors it should have declined")

    off = torch.empty(64, dtype=torch.bfloat16, device="meta")
    scalar = torch.tensor([[0.5]], dtype=torch.float32)
    assert linear_sum([off, off], [0.5, 0.5], True, never) is None
    assert task_arithmetic_sum(off, [off], [0.5], None, 1.0, torch.float32, never) is None
    assert interpolation_sum(off, off, scalar, scalar, never) is None
    assert model_stock_sum(off, [off, off], scalar.reshape(1), never) is None
    assert masked_task_arithmetic(off, [off], [0.5], [TopK(None)], 0, "sum", False, 1.0, torch.float32, never,
                                  never) is None
    assert masked_consensus_with_masks(off, [off], [0.5], [torch.empty(64, dtype=torch.bool, device="meta")],
                                       [1.0], "sum", False, 1.0, torch.float32, never) is None
    assert magnitude_keys_into(off, off, torch.float32, torch.empty(64, dtype=torch.int32), never) is None
    assert key_histogram(torch.empty(64, dtype=torch.int16, device="meta")) is None
    assert rescaled_drop(off, off, torch.rand(64), never) is None
    assert argsort_ranks(off.reshape(8, 8)) is None
    lanes = row_sums.lanes_for(torch.float32)
    sums = row_reductions.chunk_sums(torch.bfloat16, lanes)
    assert sums is not None and sums.norms(off, off) is None and sums.normalized_dot(off, off, 1.0, 1.0) is None
    pairs = row_reductions.offset_sums(2, 64, torch.bfloat16, lanes)
    assert pairs is not None and pairs.add(off, [off, off]) is False
    assert nonfinite_count(off) is None


def test_a_tensor_drawn_whole_takes_its_fresh_generators_numbers_from_the_compiled_twin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.methods import dare
    from mergelab.methods.sparsify import generator_for, uniform_draws

    coins = dare.fresh_coins(11, 1)
    assert not isinstance(coins, torch.Generator)  # the loops are loaded: the twin draws
    assert torch.equal(uniform_draws(torch.Size([37, 29]), coins), torch.rand(37, 29, generator=generator_for(11, 1)))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 96, generator=g).bfloat16()
    tuned = [base + 0.01 * torch.randn(64, 96, generator=g).bfloat16() for _ in range(2)]
    twin = dare_merge(base, tuned, [0.5, 0.7], [0.3, 0.6], seed=5, consensus="sum")
    monkeypatch.setattr(dare, "mersenne_draws", lambda generator: None)  # torch's kernel draws
    assert torch.equal(twin, dare_merge(base, tuned, [0.5, 0.7], [0.3, 0.6], seed=5, consensus="sum"))


# Every class of bit pattern around the exponent's edge, by hand: (bits, whether the number is finite).
_EDGE_PATTERNS = {
    torch.bfloat16: (torch.int16, [(0x7F7F, True), (0x7F80, False), (0x7F81, False), (0x7FC0, False),
                                   (0xFF80, False), (0xFFFF, False), (0x8000, True), (0x0001, True), (0xFF7F, True)]),
    torch.float16: (torch.int16, [(0x7BFF, True), (0x7C00, False), (0x7C01, False), (0x7E00, False),
                                  (0xFC00, False), (0xFFFF, False), (0x8000, True), (0x0001, True), (0xFBFF, True)]),
    torch.float32: (torch.int32, [(0x7F7FFFFF, True), (0x7F800000, False), (0x7F800001, False),
                                  (0x7FC00000, False), (0xFF800000, False), (0xFFFFFFFF, False), (0x80000000, True),
                                  (0x00000001, True), (0xFF7FFFFF, True)]),
    torch.float64: (torch.int64, [(0x7FEFFFFFFFFFFFFF, True), (0x7FF0000000000000, False),
                                  (0x7FF0000000000001, False), (0x7FF8000000000000, False),
                                  (0xFFF0000000000000, False), (0xFFFFFFFFFFFFFFFF, False), (1 << 63, True),
                                  (0x1, True), (0xFFEFFFFFFFFFFFFF, True)]),
}


def _from_bits(patterns: list[int], as_int: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    width = torch.iinfo(as_int).bits
    signed = [p - (1 << width) if p >= 1 << (width - 1) else p for p in patterns]
    return torch.tensor(signed, dtype=as_int).view(dtype)


@pytest.mark.parametrize("dtype", list(_EDGE_PATTERNS))
def test_the_nonfinite_count_loop_counts_every_nan_and_infinity_and_no_finite_number(dtype: torch.dtype) -> None:
    as_int, cases = _EDGE_PATTERNS[dtype]
    for bits, finite in cases:
        one = _from_bits([bits], as_int, dtype)
        assert bool(torch.isfinite(one)) is finite  # the hand-made table agrees with torch
        assert nonfinite_count(one) == (0 if finite else 1), hex(bits)
    mixed = _from_bits([bits for bits, _ in cases] * 1000, as_int, dtype)  # long enough for the vector loop
    assert nonfinite_count(mixed) == 1000 * sum(not finite for _, finite in cases) == count_nonfinite(mixed)


def test_the_nonfinite_count_loop_takes_only_plain_contiguous_cpu_tensors() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    assert nonfinite_count(x) == 2
    assert nonfinite_count(x[::2]) is None and count_nonfinite(x[::2]) == 0  # a strided view: torch counts
    assert nonfinite_count(x[1::2]) is None and count_nonfinite(x[1::2]) == 2
    assert nonfinite_count(torch.empty(0)) is None
    assert nonfinite_count(torch.tensor([float("nan")], dtype=torch.float8_e4m3fn)) is None
    assert nonfinite_count(x.requires_grad_()) is None


def test_count_nonfinite_is_the_same_with_the_loop_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    tensors = []
    for dtype in _EDGE_PATTERNS:
        t = torch.randn(3001, generator=g)
        bad = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(3)[:7]
        t[torch.randperm(3001, generator=g)[:7]] = bad
        tensors.append(t.to(dtype))
    with_loop = [count_nonfinite(t) for t in tensors]
    monkeypatch.setattr(dispatch, "_loaded", [None])
    assert [nonfinite_count(t) for t in tensors] == [None] * 4
    assert [count_nonfinite(t) for t in tensors] == with_loop == [7] * 4
