"""Golden tests for TSV's singular task interference and Iso's subspace alignment ratio, per layer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli_helpers import assert_ok, run_cli, write_config
from mergelab import merge_state_dicts
from mergelab.analysis.svd_diagnostics import (
    captured_rank,
    interference_of_factors,
    layer_diagnostics,
    mean_alignment,
    singular_task_interference,
    subspace_alignment_ratio,
)
from mergelab.errors import UsageError
from mergelab.merge.engine import run_merge
from mergelab.methods.spectral import polar_factor
from mergelab.report.layer_diagnostics import LayerDiagnosticsWriter, plot_layer_diagnostics
from mergelab.report.tables import read_csv

F64 = torch.float64


def _e(i: int, n: int = 4) -> torch.Tensor:
    v = torch.zeros(n, dtype=F64)
    v[i] = 1.0
    return v


def _unit(deg: float, n: int = 4) -> torch.Tensor:
    v = torch.zeros(n, dtype=F64)
    v[0], v[1] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return v


# ---- singular task interference ---------------------------------------------------------------------------
def test_sti_of_orthogonal_tasks_is_zero() -> None:
    taus = [3 * torch.outer(_e(0), _e(0)), 2 * torch.outer(_e(1), _e(1))]
    assert singular_task_interference(taus, rank=1) == pytest.approx(0.0, abs=1e-12)


def test_sti_is_zero_when_one_side_is_orthogonal() -> None:
    # same left vector, orthogonal right vectors: (VᵀV − I) = 0
    taus = [3 * torch.outer(_e(0), _e(0)), 2 * torch.outer(_e(0), _e(1))]
    assert singular_task_interference(taus, rank=1) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("left", "right"), [(60.0, 60.0), (30.0, 90.0 - 45.0), (0.0, 0.0)])
def test_sti_of_two_rank_one_tasks_by_hand(left: float, right: float) -> None:
    # u1·u2 = a, v1·v2 = b: [[0, a], [a, 0]] diag(σ1, σ2) [[0, b], [b, 0]] = diag(a b σ2, a b σ1) → |ab|(σ1 + σ2)
    s1, s2 = 3.0, 2.0
    taus = [s1 * torch.outer(_unit(0), _unit(0)), s2 * torch.outer(_unit(left), _unit(right))]
    a, b = math.cos(math.radians(left)), math.cos(math.radians(right))
    assert singular_task_interference(taus, rank=1) == pytest.approx(abs(a * b) * (s1 + s2))


def test_sti_default_rank_is_tsvs_and_ignores_the_svds_sign_convention() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(8, 6, generator=g, dtype=F64) for _ in range(3)]
    # default k = ⌊6/3⌋ = 2
    assert singular_task_interference(taus) == pytest.approx(singular_task_interference(taus, rank=2))
    assert singular_task_interference(taus) > 0
    # flipping a singular pair (u_i, v_i) together, as another LAPACK may, changes nothing
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u = torch.cat([p[0][:, :2] for p in parts], dim=1)
    s = torch.cat([p[1][:2] for p in parts])
    v = torch.cat([p[2][:2].T for p in parts], dim=1)
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0], dtype=F64)
    assert interference_of_factors(u * flip, s, v * flip) == pytest.approx(interference_of_factors(u, s, v))
    assert interference_of_factors(u, s, v) == pytest.approx(singular_task_interference(taus))


def test_tsv_orthogonalisation_removes_interference() -> None:
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(8, 6, generator=g, dtype=F64) for _ in range(3)]
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u = torch.cat([p[0][:, :2] for p in parts], dim=1)
    s = torch.cat([p[1][:2] for p in parts])
    v = torch.cat([p[2][:2].T for p in parts], dim=1)
    assert interference_of_factors(u, s, v) > 0.1
    assert interference_of_factors(polar_factor(u), s, polar_factor(v.T).T) == pytest.approx(0.0, abs=1e-10)


# ---- subspace alignment ratio -----------------------------------------------------------------------------
@pytest.mark.parametrize(("s", "captured", "k"), [([4.0, 3.0], 0.95, 2), ([4.0, 3.0], 0.8, 1), ([10.0, 1.0], 0.95, 1),
                                                  ([1.0, 1.0, 1.0, 1.0], 0.5, 1), ([1.0, 1.0, 1.0, 1.0], 0.95, 4),
                                                  ([0.0, 0.0], 0.95, 0)])
def test_captured_rank(s: list[float], captured: float, k: int) -> None:
    # diag(4, 3): the top direction keeps 4/5 = 0.8 of the norm
    assert captured_rank(torch.tensor(s), captured) == k


def test_sar_by_hand() -> None:
    merged = torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))  # subspace: e1
    assert subspace_alignment_ratio(torch.outer(_e(0), _e(2)), merged) == pytest.approx(1.0)
    assert subspace_alignment_ratio(torch.outer(_e(1), _e(2)), merged) == pytest.approx(0.0)
    # half in e1, half in e2 (by squared norm): ‖Π τ‖/‖τ‖ = 1/√2
    task = torch.outer(_e(0), _e(2)) + torch.outer(_e(1), _e(3))
    assert subspace_alignment_ratio(task, merged) == pytest.approx(1 / math.sqrt(2))
    assert subspace_alignment_ratio(torch.zeros(4, 4, dtype=F64), merged) == 0.0


def test_sar_uses_only_the_dominant_directions_of_the_merge() -> None:
    # merged = diag(10, 1): captured_rank 1 → e2 is outside the subspace; with rank=2 it is inside
    merged = torch.diag(torch.tensor([10.0, 1.0, 0.0, 0.0], dtype=F64))
    task = torch.outer(_e(1), _e(1))
    assert subspace_alignment_ratio(task, merged) == pytest.approx(0.0)
    assert subspace_alignment_ratio(task, merged, rank=2) == pytest.approx(1.0)


def test_iso_c_raises_alignment_over_task_arithmetic() -> None:
    # the paper's observation, by construction: one strong task drowns a weak one in the sum; the flat
    # spectrum of Iso-C brings the weak task's direction back into the merged subspace
    taus = [10 * torch.outer(_e(0), _e(0)), 1 * torch.outer(_e(1), _e(1))]
    total = taus[0] + taus[1]
    zero = torch.zeros(4, 4, dtype=F64)
    iso = merge_state_dicts([{"w": t} for t in taus], "iso_c", base={"w": zero})["w"]
    assert mean_alignment(taus, total) == pytest.approx(0.5)  # e1 only: SAR (1, 0)
    assert mean_alignment(taus, iso) == pytest.approx(1.0)


# ---- over a whole merge -----------------------------------------------------------------------------------
def _models() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(2)
    base = {"a.weight": torch.randn(8, 6, generator=g), "a.bias": torch.randn(8, generator=g),
            "b.weight": torch.randn(6, 8, generator=g), "frozen.weight": torch.randn(4, 4, generator=g)}
    fts = [{k: v + (0 if k.startswith("frozen") else 0.1) * torch.randn(v.shape, generator=g)
            for k, v in base.items()} for _ in range(3)]
    return base, fts


def test_layer_diagnostics_cover_the_changed_matrices() -> None:
    base, fts = _models()
    merged = merge_state_dicts(fts, "tsv", base=base)
    rows = layer_diagnostics(base, fts, merged)
    assert [r.name for r in rows] == ["a.weight", "b.weight"]
    for r in rows:
        deltas = [f[r.name].double() - base[r.name].double() for f in fts]
        assert r.interference == pytest.approx(singular_task_interference(deltas))
        assert r.relative_interference > 0
        assert r.alignment_task_arithmetic == pytest.approx(mean_alignment(deltas, sum(deltas)))
        assert r.alignment_merged is not None and 0 <= r.alignment_merged <= 1
    assert all(r.alignment_merged is None for r in layer_diagnostics(base, fts))


def test_plot_layer_diagnostics_writes_a_png(tmp_path: Path) -> None:
    base, fts = _models()
    rows = layer_diagnostics(base, fts, merge_state_dicts(fts, "iso_c", base=base))
    out = plot_layer_diagnostics(rows, tmp_path / "layers.png", merged_label="Iso-C")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no layers"):
        plot_layer_diagnostics([], tmp_path / "empty.png")


# --- `mergelab merge --diagnostics`: the same measures, computed by the engine during the merge -------------------

def _save_family(root: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, Any]]:
    base, fts = _models()
    save_file(base, str(root / "base.safetensors"))
    for i, ft in enumerate(fts):
        save_file(ft, str(root / f"ft{i}.safetensors"))
    config = {"merge_method": "iso_c", "base_model": str(root / "base.safetensors"),
              "models": [{"model": str(root / f"ft{i}.safetensors")} for i in range(len(fts))]}
    return base, fts, config


def test_diagnostics_written_by_the_engine_equal_the_library_on_the_merged_output(tmp_path: Path) -> None:
    base, fts, config = _save_family(tmp_path)
    result = run_merge(config, tmp_path / "out", progress=False, observer=LayerDiagnosticsWriter())
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = {r.name: r for r in layer_diagnostics(base, fts, merged)}
    rows = read_csv(tmp_path / "out" / "diagnostics" / "layers.csv")
    assert [r["name"] for r in rows] == ["a.weight", "b.weight"]  # the bias is 1-D; frozen.weight is unchanged
    for r in rows:
        e = expected[r["name"]]
        assert float(r["interference"]) == pytest.approx(e.interference, rel=1e-9)
        assert float(r["alignment_merged"]) == pytest.approx(e.alignment_merged, rel=1e-9)
        assert int(r["rank_task_arithmetic"]) == e.rank_task_arithmetic
    record = result.record["diagnostics"]
    assert record["matrices"] == 2 and record["skipped"] == {"unchanged by every model": 1}
    assert record["mean_alignment_merged"] == pytest.approx(
        (expected["a.weight"].alignment_merged + expected["b.weight"].alignment_merged) / 2)
    assert (tmp_path / "out" / "diagnostics" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "mergelab.json").read_text())["diagnostics"] == record


def test_diagnostics_do_not_change_the_merged_bytes(tmp_path: Path) -> None:
    _, _, config = _save_family(tmp_path)
    run_merge(config, tmp_path / "plain", progress=False)
    run_merge(config, tmp_path / "diag", progress=False, observer=LayerDiagnosticsWriter())
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "diag" / "model.safetensors"
                                                                       ).read_bytes()


def test_diagnostics_without_a_base_skip_every_matrix_and_say_why(tmp_path: Path) -> None:
    _, _, config = _save_family(tmp_path)
    config = {"merge_method": "linear", "models": [{"model": m["model"], "parameters": {"weight": 1.0}}
                                                   for m in config["models"]]}
    result = run_merge(config, tmp_path / "out", progress=False, observer=LayerDiagnosticsWriter())
    assert result.record["diagnostics"]["matrices"] == 0
    assert result.record["diagnostics"]["skipped"] == {"no base model": 3}
    assert not (tmp_path / "out" / "diagnostics").exists()


def test_diagnostics_skip_matrices_above_the_size_cap(tmp_path: Path) -> None:
    _, _, config = _save_family(tmp_path)
    writer = LayerDiagnosticsWriter(max_entries=47)  # a.weight and b.weight have 48 entries
    assert run_merge(config, tmp_path / "out", progress=False, observer=writer).record["diagnostics"]["skipped"] \
        == {"more than 47 entries": 2, "unchanged by every model": 1}


def test_cli_diagnostics_flag_writes_csv_and_plot_and_names_them(tmp_path: Path) -> None:
    _, _, config = _save_family(tmp_path)
    cfg = write_config(tmp_path / "cfg", config)
    result = run_cli(cfg, tmp_path / "out", "--diagnostics")
    assert_ok(result)
    assert (tmp_path / "out" / "diagnostics" / "layers.csv").exists()
    assert "diagnostics" in result.output and "layers.png" in result.output


def test_diagnostics_refuse_a_multi_stage_config_before_writing_anything(tmp_path: Path) -> None:
    _, _, config = _save_family(tmp_path)
    first = {**config, "name": "first"}
    path = tmp_path / "stages.yml"
    path.write_text(yaml.safe_dump(first) + "---\n" + yaml.safe_dump({**config, "base_model": str(
        tmp_path / "base.safetensors"), "models": [{"model": "first"}, *config["models"][1:]]}))
    with pytest.raises(UsageError, match="multi-stage"):
        run_merge(path, tmp_path / "out", progress=False, observer=LayerDiagnosticsWriter())
    assert not (tmp_path / "out").exists()
