"""The replay of torch's one-thread CPU row sum and 2-norm (methods/row_sums.py) gives torch's bits, fed in pieces."""

from __future__ import annotations

import platform

import pytest
import torch

from mergelab.merge.core import one_thread
from mergelab.methods import row_sums
from mergelab.methods.row_sums import RowNorms, RowSums


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


@pytest.fixture
def lanes(request: pytest.FixtureRequest) -> int:
    found = row_sums.lanes_for(request.param)
    if found is None:
        pytest.skip(f"this torch build's {request.param} sums are not replayed here")
    return found


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the widths were read on x86-64 builds")
@pytest.mark.parametrize("dtype", row_sums.SUPPORTED)
def test_torch_2_13_on_x86_is_replayed_8_lanes_wide(dtype: torch.dtype) -> None:
    # measured here: 8 float32 lanes (AVX2's width) even where torch reports AVX-512
    assert row_sums.lanes_for(dtype) == 8


# lengths crossing every boundary: one vector, a step of four, level-0 blocks (16 steps), the flushes of
# levels 1 and 2, leftover vectors and scalar tails; 2,097,185 entries reach the last level at 8 lanes
SIZES = [16, 31, 32, 33, 47, 63, 64, 65, 511, 512, 513, 8191, 8192 + 5, 131_072 + 37, 2_097_152 + 33]


@pytest.mark.parametrize(("lanes", "dtype"), [(d, d) for d in row_sums.SUPPORTED], indirect=["lanes"],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("piece", [7, 1000, 1 << 20])
def test_row_sum_and_norm_fed_in_pieces_equal_torch_bit_for_bit(lanes: int, dtype: torch.dtype, piece: int) -> None:
    g = torch.Generator().manual_seed(piece)
    for n in SIZES:
        if piece == 7 and n > 10_000:
            continue  # 7-entry pieces: the short rows are enough, the long ones would take seconds
        x = (torch.randn(n, generator=g) * 0.02).to(dtype)
        product = x * (torch.randn(n, generator=g) * 0.02).to(dtype)  # a dot product's terms, rounded to dtype
        sums, norms = RowSums(2, n, dtype, lanes), RowNorms(2, n, dtype, lanes)  # two rows side by side
        for a in range(0, n, piece):
            sums.add([x[a:a + piece], product[a:a + piece]])
            norms.add([x[a:a + piece], product[a:a + piece]])
        with one_thread():
            expected = [x.reshape(1, -1).sum(dim=-1), product.reshape(1, -1).sum(dim=-1),
                        x.reshape(1, -1).norm(dim=-1), product.reshape(1, -1).norm(dim=-1)]
        for got, want in zip([*sums.results(), *norms.results()], expected, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(_bits(got), _bits(want)), (n, piece, got.item(), want.item())


@pytest.mark.parametrize("lanes", [torch.float32], indirect=True)
def test_a_row_longer_than_16_mi_entries_sums_with_the_wider_cascade(lanes: int) -> None:
    # beyond 2^19 steps (16.8 M entries at 8 lanes) each cascade level adds 32 sums instead of 16
    n = (1 << 24) + (1 << 20) + 3
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    total, norm = RowSums(1, n, torch.float32, lanes), RowNorms(1, n, torch.float32, lanes)
    for a in range(0, n, 1 << 20):
        total.add([x[a:a + (1 << 20)]])
        norm.add([x[a:a + (1 << 20)]])
    with one_thread():
        assert torch.equal(total.results()[0], x.reshape(1, -1).sum(dim=-1))
        assert torch.equal(norm.results()[0], x.reshape(1, -1).norm(dim=-1))


def test_rows_shorter_than_two_vectors_and_other_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="not replayed"):
        RowSums(1, 15, torch.float32, 8)
    with pytest.raises(ValueError, match="not replayed"):
        RowNorms(1, 100, torch.float16, 8)
    assert row_sums.lanes_for(torch.float64) is None


def test_result_before_every_entry_was_fed_is_refused() -> None:
    total = RowSums(1, 100, torch.float32, 8)
    total.add([torch.ones(60)])
    with pytest.raises(ValueError, match="fed 60 of 100"):
        total.results()
