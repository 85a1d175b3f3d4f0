"""sorted_ranks gives exactly the entries torch's CPU sort puts at ranks [start, stop), ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.methods.std_sort import sorted_ranks


def _torch_ranks(values: np.ndarray, start: int, stop: int, descending: bool) -> set[int]:
    t = torch.from_numpy(values)
    order = torch.argsort(t, descending=True) if descending else torch.sort(t).indices
    return set(order[start:stop].tolist())


def _check(values: np.ndarray, start: int, stop: int, descending: bool) -> None:
    got = sorted_ranks(values, start, stop, descending=descending)
    assert got is not None
    assert len(got) == max(0, stop - max(start, 0))
    assert set(got.tolist()) == _torch_ranks(values, start, stop, descending)


def _bf16_magnitudes(n: int, seed: int) -> np.ndarray:
    # bfloat16 task-vector magnitudes: a few hundred distinct values, so ties straddle every rank
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.002).bfloat16().abs().float().numpy()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("descending", [True, False])
def test_top_k_of_tied_bfloat16_magnitudes_as_torch_sorts_them(seed: int, descending: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(17, 200_000))
    values = _bf16_magnitudes(n, seed)
    k = int(rng.integers(1, n))
    _check(values, 0, k, descending)


@pytest.mark.parametrize("seed", range(6))
def test_a_middle_range_of_ranks_as_torch_sorts_them(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(17, 100_000))
    values = _bf16_magnitudes(n, seed)
    a, b = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
    _check(values, a, b, descending=False)
    _check(values, a, b, descending=True)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 1000])
def test_small_and_degenerate_inputs(n: int) -> None:
    rng = np.random.default_rng(n)
    few_values = rng.integers(0, 3, size=n).astype(np.float32)  # almost all tied
    equal = np.full(n, 0.5, dtype=np.float32)
    ascending = np.arange(n, dtype=np.float32)
    for values in (few_values, equal, ascending, ascending[::-1].copy()):
        for k in {0, 1, n // 2, n - 1, n}:
            _check(values, 0, k, descending=True)
            _check(values, k, n, descending=False)


def test_distinct_float32_and_signed_zeros() -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal(50_000).astype(np.float32)
    values[::97] = 0.0
    values[::89] = -0.0  # equal to +0.0 for the sort: ties among zeros of both signs
    _check(values, 0, 12_345, descending=True)
    _check(values, 1_000, 40_000, descending=False)


def test_nan_is_left_to_the_real_sort() -> None:
    values = np.array([1.0, np.nan, 0.5] * 10, dtype=np.float32)
    assert sorted_ranks(values, 0, 3, descending=True) is None


def test_input_is_left_untouched() -> None:
    values = _bf16_magnitudes(5_000, 1)
    before = values.copy()
    sorted_ranks(values, 0, 1_234, descending=True)
    sorted_ranks(values, 0, 1_234, descending=False)
    assert np.array_equal(values, before)


def test_this_torch_sorts_as_simulated() -> None:
    # if this fails, torch's CPU sort changed: the masks stay right (sparsify sorts for real), only slower
    from mergelab.methods.std_sort import matches_torch_sort

    assert matches_torch_sort()


def test_masks_fall_back_to_the_real_sort_where_the_simulation_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.methods import sparsify

    delta = torch.from_numpy(_bf16_magnitudes(20_000, 3)) * torch.sign(torch.randn(20_000))
    fast = sparsify.magnitude_mask(delta.bfloat16(), 0.3)
    monkeypatch.setattr(sparsify, "sorted_ranks", lambda *a, **k: None)
    assert torch.equal(sparsify.magnitude_mask(delta.bfloat16(), 0.3), fast)


@pytest.mark.parametrize("seed", range(4))
def test_stop_positions_produced_in_many_blocks(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    from mergelab.methods import std_sort

    monkeypatch.setattr(std_sort, "_BLOCK", 61)  # a prime: blocks end everywhere relative to the swaps
    rng = np.random.default_rng(200 + seed)
    values = _bf16_magnitudes(int(rng.integers(1_000, 30_000)), seed)
    k = int(rng.integers(1, values.size))
    _check(values, 0, k, descending=True)
    _check(values, k // 2, k, descending=False)


@pytest.mark.parametrize("descending", [True, False])
def test_values_are_left_untouched_when_the_simulation_declines(monkeypatch: pytest.MonkeyPatch,
                                                                descending: bool) -> None:
    from mergelab.methods import std_sort

    values = _bf16_magnitudes(50_000, 5)
    before = values.copy()
    real = std_sort._partition
    calls = []

    def partition_then_give_up(*args: object) -> int | None:  # stands in for the heapsort fallback
        calls.append(1)
        return real(*args) if len(calls) < 3 else None  # type: ignore[arg-type]

    monkeypatch.setattr(std_sort, "_partition", partition_then_give_up)
    monkeypatch.setattr(std_sort, "loops", lambda: None)  # the numpy replay, even where the compiled one is loaded
    assert sorted_ranks(values, 0, 20_000, descending=descending) is None
    assert np.array_equal(values, before) and len(calls) == 3


@pytest.mark.parametrize("seed", range(3))
def test_kept_and_band_ties_are_the_same_with_a_dirty_positions_scratch(seed: int) -> None:
    # the engine hands the replay one scratch for every tensor (merge/rank_workspace.py): what it held before
    # must not matter, and one too small is not used
    from mergelab.methods.std_sort import band_ties, kept_ties

    rng = np.random.default_rng(300 + seed)
    keys = (_bf16_magnitudes(int(rng.integers(1_000, 60_000)), seed) * 2**20).astype(np.int16)
    n = keys.size
    k = int(rng.integers(1, n))
    threshold = int(np.sort(keys)[::-1][k - 1])
    low, high = (int(x) for x in np.sort(keys)[[n // 4, n // 2 - 1]])
    expected = kept_ties(keys, k, threshold), band_ties(keys, n // 4, n // 2, low, high)
    for scratch in (np.full(4 * n, 0x5A, np.uint8), np.full(n, -7, np.int64), np.zeros(4 * n - 1, np.uint8)):
        got = kept_ties(keys, k, threshold, positions=scratch), band_ties(keys, n // 4, n // 2, low, high,
                                                                          positions=scratch)
        assert expected[0] is not None and got[0] is not None and expected[1] is not None and got[1] is not None
        assert np.array_equal(np.sort(got[0]), np.sort(expected[0]))
        assert all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(got[1], expected[1], strict=True))


def _in_room(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (int16) copied into the first half of a buffer of 4 bytes per entry, as the engine's work space
    lays them out, and that buffer."""
    room = np.full(4 * keys.size, 0xA5, np.uint8)  # dirty: what the buffer held before must not matter
    held = room[:2 * keys.size].view(np.int16)
    held[:] = keys
    return held, room


def _torch_ties(keys: np.ndarray, start: int, stop: int, edge: int, descending: bool) -> np.ndarray:
    # floats, as mergekit sorts them (torch may sort integer tensors by another algorithm)
    values = torch.from_numpy(keys.astype(np.float32))
    order = torch.argsort(values, descending=True) if descending else torch.sort(values).indices
    chosen = order[start:stop].numpy()
    return np.sort(chosen[keys[chosen] == edge])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("compiled", [True, False], ids=["tagged replay", "numpy replay"])
def test_keys_widened_in_their_own_room_give_torch_sorts_tied_entries(seed: int, compiled: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine's bfloat16 keys sit in the first half of a room of 4 bytes per entry and the replay may widen
    # them in place, each tied entry carrying its flat index (no positions array); without the compiled loop
    # the room is not used as positions (it holds the keys) and the numpy replay gives the same entries
    from mergelab.kernels import dispatch
    from mergelab.methods import std_sort

    if compiled and not dispatch.warm_up():
        pytest.skip("numba is not installed")
    if compiled:  # its check runs once per process, through the same function: before counting the calls
        assert dispatch.verified("tagged sort replay", None, std_sort._check_tagged)
    if not compiled:
        monkeypatch.setattr(std_sort, "loops", lambda: None)
    tagged_calls: list[int] = []
    tagged = std_sort._tagged_ties
    monkeypatch.setattr(std_sort, "_tagged_ties", lambda *a, **kw: tagged_calls.append(1) or tagged(*a, **kw))
    rng = np.random.default_rng(500 + seed)
    keys = (_bf16_magnitudes(int(rng.integers(1_000, 80_000)), seed) * 2**20).astype(np.int16)
    n = keys.size
    ordered = np.sort(keys)
    k = int(rng.integers(1, n))
    threshold = int(ordered[::-1][k - 1])
    held, room = _in_room(keys)
    kept = std_sort.kept_ties(held, k, threshold, overwrite=True, positions=room)
    assert kept is not None and np.array_equal(np.sort(kept), _torch_ties(keys, 0, k, threshold, True))
    start = int(rng.integers(0, n // 2))
    stop = int(rng.integers(start + 1, n + 1))
    for low, high in ((int(ordered[start]), int(ordered[stop - 1])), (int(ordered[start]), int(ordered[start]))):
        held, room = _in_room(keys)
        ties = std_sort.band_ties(held, start, stop, low, high, overwrite=True, positions=room)
        assert ties is not None
        assert np.array_equal(np.sort(ties[0]), _torch_ties(keys, start, stop, low, False))
        assert np.array_equal(np.sort(ties[1]), _torch_ties(keys, start, stop, high, False))
    assert len(tagged_calls) == (3 if compiled else 0)
