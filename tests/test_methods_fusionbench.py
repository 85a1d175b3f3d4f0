"""Side-by-side checks of TSV-M, Iso-C and Iso-CTS against FusionBench 0.2.33 (a dev dependency, never a
runtime one), whose implementations follow the authors' code, on random full-rank task vectors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import iso_c_merge, iso_cts_merge, tsv_merge

pytestmark = pytest.mark.slow
iso_utils = pytest.importorskip("fusion_bench.method.isotropic_merging.iso_utils")
tsvm_utils = pytest.importorskip("fusion_bench.method.task_singular_vector.utils.TSVM_utils")

SHAPES = {"attn.weight": (24, 16), "mlp.weight": (10, 30), "norm.weight": (16,), "conv.weight": (4, 3, 2, 2)}


def _models(tasks: int, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
           for _ in range(tasks)]
    return base, fts


def _task_vectors(base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: f[k] - base[k] for k in base} for f in fts]


@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1), (8, 2)])
def test_tsv_matches_fusionbench(tasks: int, seed: int) -> None:
    base, fts = _models(tasks, seed)
    ref = tsvm_utils.compute_and_sum_svd_mem_reduction(_task_vectors(base, fts), accelerator="cpu")
    for k in base:
        assert_close(tsv_merge(base[k], [f[k] for f in fts]) - base[k], ref[k])


@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1), (8, 2)])
def test_iso_c_matches_fusionbench(tasks: int, seed: int) -> None:
    base, fts = _models(tasks, seed)
    ref = iso_utils.iso_c(_task_vectors(base, fts), accelerator="cpu")
    for k in base:
        assert_close(iso_c_merge(base[k], [f[k] for f in fts]) - base[k], ref[k])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1), (8, 2)])
def test_iso_cts_matches_fusionbench(tasks: int, seed: int, fraction: float) -> None:
    base, fts = _models(tasks, seed)
    ref = iso_utils.iso_cts(_task_vectors(base, fts), fraction, accelerator="cpu")
    for k in base:
        got = iso_cts_merge(base[k], [f[k] for f in fts], common_space_fraction=fraction) - base[k]
        assert_close(got, ref[k])
