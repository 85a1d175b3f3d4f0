"""Compiled loops (numba) for the hottest steps of merging, each a drop-in for a torch or numpy formula.

Eager torch runs a weighted sum of three bfloat16 pieces as about six passes over a float32 accumulator
(convert, multiply-add per model, divide, round): 0.55 CPU s per GB of input, the largest stage of a linear
merge (benchmarks/engine_threads.py, 2026-12-02). A loop does the same arithmetic per entry in registers, in
one pass. The loops here: weighted sums (linear, task arithmetic, SLERP's and Model Stock's element-wise steps:
:mod:`.weighted_sums`), task arithmetic of task vectors masked by top-k rules with or without TIES' sign
election (:mod:`.masked`), torch's one-thread sum and 2-norm of long rows replayed while their entries are
computed (SLERP's and Model Stock's scalar passes: :mod:`.row_reductions`), the replay of torch's
``std::sort`` that decides which tied magnitudes a top-k keeps (methods/std_sort.py) or ranks every entry of a
row (DELLA's keep probabilities: :mod:`.row_ranks`), and DELLA's drop with its per-entry rescale
(:mod:`.random_drops`). Their times beside the code they replace: ``benchmarks/compiled_loops.py``.

A loop is used only where it gives the same bits: on first use in a process each runs beside the formula it
replaces on probe inputs chosen to tell roundings apart (fused multiply-add or not, rounding of each step,
subnormals, overflow, ties at the top-k threshold), and a loop that differs is not used there. A result with
a NaN is always left to the formula. ``MERGELAB_KERNELS=0`` turns them all off; so does a numba that is
missing or fails to load. Loading is never implicit (see :mod:`.dispatch`).
"""
