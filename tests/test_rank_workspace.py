"""RankWorkspace: the top-k passes' keys and positions, one buffer shared by the models found side by side."""

from __future__ import annotations

import numpy as np
import torch

from mergelab.merge.rank_workspace import RankWorkspace


def _span(a: np.ndarray | torch.Tensor) -> tuple[int, int]:
    address = a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]
    nbytes = a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes
    return address, address + nbytes


def test_16_bit_keys_come_first_in_a_room_of_4_bytes_per_entry_and_two_slots_do_not_overlap() -> None:
    space = RankWorkspace(1000)
    first = space.take(2, 500, torch.int16)
    second = space.take(2, 500, torch.int16)
    assert first is not None and second is not None and {first[0], second[0]} == {0, 1}
    for _, keys, room in (first, second):
        # the sort replay widens the keys in place into their room (std_sort._room): no other buffer is touched
        assert keys.numel() == 500 and keys.dtype == torch.int16 and room.nbytes == 500 * 4
        assert _span(room)[0] == _span(keys)[0]
    r0, r1 = sorted([_span(first[2]), _span(second[2])])
    assert r0[1] <= r1[0]  # disjoint
    space.give_back(first[0])
    space.give_back(second[0])
    whole = space.take(1, 1000, torch.int16)
    assert whole is not None
    # a bfloat16 merge's rooms fill the same first bytes whether one or two models run
    assert _span(whole[2]) == (r0[0], r1[1])


def test_32_bit_keys_and_their_positions_of_two_slots_do_not_overlap_and_fill_what_one_full_slot_fills() -> None:
    space = RankWorkspace(1000)
    first = space.take(2, 500, torch.int32)
    second = space.take(2, 500, torch.int32)
    assert first is not None and second is not None
    (k0, k1), (p0, p1) = sorted([_span(first[1]), _span(second[1])]), sorted([_span(first[2]), _span(second[2])])
    assert k0[1] <= k1[0] and p0[1] <= p1[0] and first[2].nbytes == 500 * 4
    assert not (k0[0] < p1[1] and p0[0] < k1[1])  # keys and positions in buffers of their own
    space.give_back(first[0])
    space.give_back(second[0])
    whole = space.take(1, 1000, torch.int32)
    assert whole is not None and _span(whole[1]) == (k0[0], k1[1]) and _span(whole[2]) == (p0[0], p1[1])


def test_no_slot_for_a_tensor_larger_than_its_share_or_when_every_slot_is_taken() -> None:
    space = RankWorkspace(1000)
    assert space.take(2, 501, torch.int16) is None
    assert space.take(1, 1001, torch.int32) is None
    taken = space.take(1, 1000, torch.int32)
    assert taken is not None and taken[1].numel() == 1000
    assert space.take(1, 10, torch.int16) is None  # the only slot is in use
    space.give_back(taken[0])
    assert space.take(1, 10, torch.int16) is not None


def test_keys_and_positions_are_reused_not_reallocated() -> None:
    space = RankWorkspace(64)
    a = space.take(1, 64, torch.int32)
    assert a is not None
    space.give_back(a[0])
    b = space.take(1, 32, torch.int32)
    assert b is not None and _span(a[1])[0] == _span(b[1])[0] and _span(a[2])[0] == _span(b[2])[0]
    space.give_back(b[0])
    c = space.take(1, 32, torch.int16)
    assert c is not None and _span(a[1])[0] == _span(c[1])[0]


def test_shrinking_lets_the_buffers_go_only_when_free_and_at_most_half_the_size() -> None:
    space = RankWorkspace(1000)
    taken = space.take(1, 1000, torch.int16)
    assert taken is not None
    space.shrink_to(100)
    assert space.capacity == 1000  # a slot is in use: nothing changes
    space.give_back(taken[0])
    space.shrink_to(600)
    assert space.capacity == 1000  # not worth making again
    space.shrink_to(400)
    assert space.capacity == 400 and space.take(1, 401, torch.int16) is None
    small = space.take(2, 200, torch.int16)
    assert small is not None and small[1].numel() == 200 and small[2].nbytes == 200 * 4
