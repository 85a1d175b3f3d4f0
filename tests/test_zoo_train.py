"""Zoo training: shared vs independent init, seeds recorded, cache hits, prefix-stable members."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.zoo.train import member_seed, train_zoo

TINY = {"n_train": 200, "epochs": 1, "pretrain_epochs": 1, "width": 4, "batch_size": 50}


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.getbasetemp() / "zoo-train-cache"
    monkeypatch.setenv("MERGELAB_CACHE", str(path))
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_cache_and_prefix_stability(cache: Path) -> None:
    z2 = train_zoo("vgg6bn", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    assert z2.trained == 2 and z2.member_seeds == [member_seed(0, 0), member_seed(0, 1)]
    assert z2.base_seed is not None and all("val_acc_pct" in h for h in z2.histories)
    again = train_zoo("vgg6bn", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    assert again.trained == 0 and all(_same(a, b) for a, b in zip(z2.models, again.models, strict=True))
    z3 = train_zoo("vgg6bn", "digits", 3, "shared", workers=1, show_progress=False, **TINY)
    assert z3.trained == 1 and _same(z3.models[1], z2.models[1])
    assert not _same(z3.models[0], z3.models[1])  # different seeds → different members
    assert len(list(cache.glob("*.pt"))) == 4  # base + 3 members


def test_shared_vs_independent_init(cache: Path) -> None:
    shared = train_zoo("vgg6", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    indep = train_zoo("vgg6", "digits", 2, "independent", workers=1, show_progress=False, **TINY)

    def first_conv_cos(zoo) -> float:  # type: ignore[no-untyped-def]
        a, b = (m.convs[0].weight.detach().flatten() for m in zoo.models)
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    # one epoch of fine-tuning from a shared start leaves the kernels nearly equal; random inits do not
    assert first_conv_cos(shared) > 0.9 > first_conv_cos(indep)
    assert indep.base_seed is None


def test_bad_init_rejected(cache: Path) -> None:
    with pytest.raises(ValueError, match="shared"):
        train_zoo("linear", "digits", 1, "random", workers=1, show_progress=False, **TINY)  # type: ignore[arg-type]
