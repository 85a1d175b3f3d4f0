"""Task arithmetic of task vectors masked by top-k rules (TIES, Breadcrumbs, with or without a sign election)
in compiled passes, or None where the torch formula must run.

A piece of a streamed tensor is merged from each model's rule (:class:`~mergelab.methods.sparsify.TopK`,
found by the engine over the whole tensor): one pass per model finds the kept entries from the task vector's
magnitude keys, the rule's tied entries are set from its list, and one pass over the models elects the sign
and sums. Eager torch took ~19 ms per 1 Mi-entry bfloat16 TIES piece of two models (15 calls per 64 Ki-entry
chunk, 2026-12-02); see ``benchmarks/compiled_loops.py`` for the loop's time measured beside it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mergelab.kernels.dispatch import as_array, eligible, loops, probe, same_bits, verified

# "keep nothing above it" / "everything is below it": above every number's key (bfloat16 keys reach 0x7F80,
# float32 ones 0x7F800000 at Inf; only a NaN's may reach it, and a NaN makes the rule not apply) and within
# the int32 the loop compares keys in
_NEVER = np.iinfo(np.int32).max
ELECTIONS = {None: 0, "sum": 1, "count": 2}

Formula = Callable[..., torch.Tensor]
"""``formula(base, tensors, weights, rules, offset, consensus, normalize, lambda_, dtype)``."""
ProbeRules = Callable[[torch.Tensor, Sequence[torch.Tensor], torch.dtype], Sequence[Sequence[object]]]
"""``probe_rules(base, tensors, dtype)``: rule sets for the probe's task vectors, each one rule per model (one
set with ceilings, one without), as the methods make them."""


def _rule_row(rule: object) -> tuple[int, bool, int, bool]:
    """A rule (:class:`~mergelab.methods.sparsify.TopK` without a whole mask) as the loop's row: threshold, every
    entry tied at it kept, ceiling, every entry tied at it kept; the listed ties are the caller's."""
    threshold = _NEVER if rule.threshold is None else rule.threshold  # type: ignore[attr-defined]
    ceiling = _NEVER if rule.ceiling is None else rule.ceiling  # type: ignore[attr-defined]
    return threshold, rule.ties is None, ceiling, rule.ceiling_ties is None  # type: ignore[attr-defined]


def _listed_by_name(rules: Sequence[object], rows: np.ndarray, offset: int, n: int) -> np.ndarray | bool | None:
    """Where each rule keeps an entry of the piece (``n`` entries from ``offset``) by name (tied at its threshold or
    ceiling, listed by the sort order), one row of booleans per rule; None where no rule lists one here; False
    where a rule lists ties and its band is a single key (threshold = ceiling): an entry listed on one side must
    pass the other by its key, which only a band wider than one key ensures."""
    listed = None
    for i, rule in enumerate(rules):
        for positions in (rule.ties, rule.ceiling_ties):  # type: ignore[attr-defined]
            if positions is None or not positions.numel():
                continue
            flat = positions.numpy()
            lo, hi = np.searchsorted(flat, [offset, offset + n])
            if lo == hi:
                continue
            if rows[i, 0] >= rows[i, 2]:
                return False
            if listed is None:
                listed = np.zeros((len(rules), n), np.bool_)
            listed[i, flat[lo:hi] - offset] = True
    return listed


def masked_task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                           rules: Sequence[object], offset: int, consensus: str | None, normalize: bool,
                           lambda_: float, arithmetic: torch.dtype, formula: Formula,
                           probe_rules: ProbeRules) -> torch.Tensor | None:
    """``formula(...)`` (the same arguments): ``base + λ Σ_i w_i m_i δ_i``, ``m_i`` rule ``i`` applied to the
    piece of the flat task vector that starts at ``offset``, with ``consensus`` TIES' election and disjoint
    mean, else ``/ Σ_i w_i`` when ``normalize``; every step rounded to ``arithmetic`` as the formula rounds
    it. ``weights`` are ``arithmetic`` numbers already. None where the loops do not apply. ``probe_rules``:
    rules for the check's probe inputs."""
    module = loops() if tensors else None
    if module is None or not eligible([base, *tensors]) or any(r.kept is not None for r in rules):  # type: ignore[attr-defined]
        return None
    dtype = base.dtype
    if arithmetic not in (torch.float32, dtype):
        return None
    like = np.uint16(0) if arithmetic == torch.bfloat16 else np.float32(0)

    def run(b: torch.Tensor, xs: Sequence[torch.Tensor], ws: Sequence[float], rs: Sequence[object], start: int,
            election: str | None, norm: bool, lam: float) -> tuple[torch.Tensor, int] | None:
        """The merged piece and how many of its entries are NaN; None where a task-vector entry is NaN.

        The loop applies each rule's threshold and ceiling to the entries' keys as it merges them, with the
        entries a rule keeps by name (ties at its threshold or ceiling that the sort order keeps) marked in a
        row of booleans (:func:`_listed_by_name`). Until 2026-12-05 a pass of its own made two rows of booleans for
        every entry and the merge read them back: TIES' masked sums at 3 × 0.5 GB took 0.46-0.56 CPU s that way,
        0.40-0.43 now (``tie_order: stable`` and mergekit's; benchmarks/merge_stages.py, alternated)."""
        divisor = float(torch.tensor(math.fsum(ws), dtype=arithmetic))  # as generalized_task_arithmetic rounds it
        base_array = as_array(b)
        arrays = tuple(as_array(x) for x in xs)
        out = torch.empty(b.shape, dtype=dtype)
        out_array = as_array(out, writable=True)
        weights_array = np.asarray(ws, np.float32)
        rows = np.array([_rule_row(r) for r in rs], np.int32).reshape(len(rs), 4)
        listed = _listed_by_name(rs, rows, start, b.numel())
        if listed is False:
            return None
        nans, nan_delta = module.masked_consensus_loop(
            base_array, arrays, rows, None if listed is None else tuple(listed), weights_array, None,
            ELECTIONS[election], norm, np.float32(divisor), np.float32(lam), like, out_array)
        if nan_delta:
            return None
        return out, nans

    def check() -> bool:
        big = torch.finfo(dtype).max
        b, xs = probe(dtype, 3)
        b, xs = b.nan_to_num(0.0, big, -big), [x.nan_to_num(0.0, big, -big) for x in xs]  # no NaN task vector
        rule_sets = probe_rules(b, xs, arithmetic)
        if not rule_sets or any(r is None for rules in rule_sets for r in rules):
            return False
        ws = [float(torch.tensor(w, dtype=arithmetic)) for w in (0.5, 0.75, -0.3)]
        cases = [("sum", True, 1.0), ("count", False, 0.7), (None, False, 1.0), (None, True, 1.0), ("sum", True, 1.3)]
        for rs in rule_sets:
            for (election, norm, lam), (start, stop) in itertools.product(cases, ((0, b.numel()), (1000, 3001))):
                piece = [x[start:stop] for x in xs]
                fused = run(b[start:stop], piece, ws, rs, start, election, norm, lam)
                expected = formula(b[start:stop], piece, ws, rs, start, election, norm, lam, arithmetic)
                if fused is None or not same_bits(fused[0], expected):
                    return False
        return True

    if not verified(f"masked task arithmetic in {arithmetic}", dtype, check):
        return None
    merged = run(base, tensors, weights, rules, offset, consensus, normalize, lambda_)
    return merged[0] if merged is not None and not merged[1] else None


MasksFormula = Callable[..., torch.Tensor]
"""``formula(base, tensors, weights, masks, divide_kept, consensus, normalize, lambda_, dtype)``."""


def masked_consensus_with_masks(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                                masks: Sequence[torch.Tensor], divide_kept: Sequence[float], consensus: str,
                                normalize: bool, lambda_: float, arithmetic: torch.dtype,
                                formula: MasksFormula) -> torch.Tensor | None:
    """``formula(...)``: TIES' election and disjoint sum of task vectors masked by ``masks`` (flat booleans,
    true where kept: DARE's random drops), model ``i``'s kept entries divided by ``divide_kept[i]``, every step
    rounded to ``arithmetic``; ``weights`` already ``arithmetic`` numbers. None where the loop does not apply."""
    module = loops() if tensors else None
    if module is None or not eligible([base, *tensors]) or arithmetic not in (torch.float32, base.dtype):
        return None
    if any(m.dtype != torch.bool or not m.is_contiguous() or m.numel() != base.numel() for m in masks):
        return None
    dtype = base.dtype
    like = np.uint16(0) if arithmetic == torch.bfloat16 else np.float32(0)

    def run(b: torch.Tensor, xs: Sequence[torch.Tensor], ws: Sequence[float], ms: Sequence[torch.Tensor],
            divs: Sequence[float], election: str, norm: bool, lam: float) -> tuple[torch.Tensor, int]:
        out = torch.empty(b.shape, dtype=dtype)
        # booleans, viewed as they are: tested as int8 the selects became branches (24 against 3 ms per 1 Mi-entry
        # piece), and making booleans of int8 masks took as long as the loop (2 ms per piece of two models)
        kept = tuple(m.reshape(-1).numpy() for m in ms)
        # none where every divisor is 1, which changes no bit (DELLA's task vectors come already rescaled)
        divisors = None if all(d == 1.0 for d in divs) else np.asarray(divs, np.float32)
        nans, _ = module.masked_consensus_loop(
            as_array(b), tuple(as_array(x) for x in xs), kept, kept, np.asarray(ws, np.float32),
            divisors, ELECTIONS[election], norm, np.float32(1.0), np.float32(lam), like,
            as_array(out, writable=True))
        return out, nans

    def check() -> bool:
        big = torch.finfo(dtype).max
        b, xs = probe(dtype, 3)
        b, xs = b.nan_to_num(0.0, big, -big), [x.nan_to_num(0.0, big, -big) for x in xs]
        generator = torch.Generator().manual_seed(1)
        ms = [torch.rand(b.numel(), generator=generator) < p for p in (0.3, 0.9, 0.5)]
        ws = [float(torch.tensor(w, dtype=arithmetic)) for w in (0.5, 0.75, -0.3)]
        cases = (([0.3, 0.9, 0.5], "sum", True, 1.0), ([1.0, 0.9, 1.0], "count", False, 0.7),
                 ([0.3, 0.9, 0.5], "sum", False, 1.3), ([1.0, 1.0, 1.0], "sum", True, 1.0))
        return all(same_bits(run(b, xs, ws, ms, divs, election, norm, lam)[0],
                             formula(b, xs, ws, ms, divs, election, norm, lam, arithmetic))
                   for divs, election, norm, lam in cases)

    if not verified(f"masked task arithmetic with masks in {arithmetic}", dtype, check):
        return None
    merged, nans = run(base, tensors, weights, masks, divide_kept, consensus, normalize, lambda_)
    return None if nans else merged


KeysFormula = Callable[[torch.Tensor, torch.Tensor, torch.dtype], "torch.Tensor | None"]
"""``formula(base, x, arithmetic)``: the flat magnitude keys of the task vector ``x − base`` computed in
``arithmetic`` (None where one is NaN), as the methods make them."""
KEY_SPECS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000)}  # (same-width integer, bits of +inf) of a magnitude's keys
# the arithmetics whose keys this module's loops compute
KEY_DTYPES = {dtype: KEY_SPECS[dtype][0] for dtype in (torch.bfloat16, torch.float32)}


def magnitude_keys_into(base: torch.Tensor, x: torch.Tensor, arithmetic: torch.dtype, out: torch.Tensor,
                        formula: KeysFormula) -> int | None:
    """Write the magnitude keys of the task vector ``x − base`` (computed in ``arithmetic``) into the flat
    ``out`` (:data:`KEY_DTYPES`) in one compiled pass, where torch takes a subtraction, a mask and a copy
    (1 Mi bf16 entries: 0.18 against 0.35 ms, benchmarks/compiled_loops.py; a fresh 11.3 M-entry tensor: 2.2 against
    20 ms). Returns the largest key (above +Inf's bits where an entry is NaN), or None where the loop does not
    apply (``out`` left untouched)."""
    module = loops()
    key_dtype = KEY_DTYPES.get(arithmetic)
    if (module is None or key_dtype is None or not eligible([base, x]) or arithmetic not in (torch.float32, base.dtype)
            or out.dtype != key_dtype or out.numel() != base.numel() or not out.is_contiguous()):
        return None
    like = np.uint16(0) if arithmetic == torch.bfloat16 else np.float32(0)

    def run(b: torch.Tensor, y: torch.Tensor, keys: torch.Tensor) -> int:
        return int(module.magnitude_keys_loop(as_array(b), as_array(y), like, keys.reshape(-1).numpy()))

    inf_bits = int(torch.tensor(float("inf"), dtype=arithmetic).view(key_dtype))  # a key above it: NaN

    def check() -> bool:
        b, xs = probe(base.dtype, 2)
        finite = [y.nan_to_num(0.0) for y in xs]
        for y in (*finite, *xs):
            keys = torch.empty(b.numel(), dtype=key_dtype)
            top = run(b, y, keys)
            expected = formula(b, y, arithmetic)
            if (expected is None) != (top > inf_bits):
                return False
            if expected is not None and not torch.equal(keys, expected.reshape(-1)):
                return False
        return True

    if not verified(f"magnitude keys in {arithmetic}", base.dtype, check):
        return None
    return run(base, x, out)


def key_histogram(keys: torch.Tensor) -> torch.Tensor | None:
    """How many of the 1-D int16 magnitude ``keys`` are each of the 2^15 values (int64, as ``torch.bincount``
    with ``minlength=2**15`` gives it), in one compiled pass; None where the loop does not apply (not
    loaded, not contiguous int16 keys on the CPU, 2^31 entries or more) or a key is negative."""
    module = loops()
    if (module is None or keys.dtype != torch.int16 or keys.dim() != 1 or not keys.is_contiguous()
            or keys.device.type != "cpu" or keys.numel() >= 1 << 31):
        return None

    def run(k: torch.Tensor) -> torch.Tensor | None:
        counts = np.zeros((4, 1 << 15), np.int32)
        if not module.key_histogram_loop(k.numpy().view(np.uint16), counts):
            return None
        return torch.from_numpy(counts[0].astype(np.int64))

    def check() -> bool:
        generator = torch.Generator().manual_seed(0)
        for n in (1, 3, 4, 4099):
            k = torch.randint(0, 1 << 15, (n,), generator=generator, dtype=torch.int16)
            k[: n // 2] = k[0]  # runs of one key
            got = run(k)
            if got is None or not torch.equal(got, torch.bincount(k, minlength=1 << 15)):
                return False
        return run(torch.tensor([5, -1, 7], dtype=torch.int16)) is None

    if not verified("key histogram", torch.int16, check):
        return None
    return run(keys.detach())
