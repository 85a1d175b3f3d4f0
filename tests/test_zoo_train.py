"""Zoo training: shared vs independent init, seeds recorded, cache hits, prefix-stable members."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.zoo import train as zoo_train
from mergelab.zoo.cache import recipe_hash
from mergelab.zoo.data import SPLITS_VERSION
from mergelab.zoo.train import TRAIN_VERSION, TrainConfig, _member_key, member_seed, train_zoo

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


def test_members_keep_the_base_head_for_adamw_families_and_reset_it_for_bn_ones(cache: Path) -> None:
    # zero fine-tuning epochs: a member is exactly its starting point
    start = {**TINY, "epochs": 0}
    vgg = train_zoo("vgg6", "digits", 2, "shared", workers=1, show_progress=False, **start)
    assert _same(vgg.models[0], vgg.models[1])  # both are the base, head included
    bn = train_zoo("vgg6bn", "digits", 2, "shared", workers=1, show_progress=False, **start)
    assert torch.equal(bn.models[0].convs[0].weight, bn.models[1].convs[0].weight)
    assert not torch.equal(bn.models[0].head.weight, bn.models[1].head.weight)  # fresh heads from their seeds
    forced = train_zoo("vgg6", "digits", 2, "shared", workers=1, show_progress=False, member_head="reset", **start)
    assert not torch.equal(forced.models[0].head.weight, forced.models[1].head.weight)
    with pytest.raises(ValueError, match="member_head"):
        train_zoo("vgg6", "digits", 1, "shared", workers=1, show_progress=False, member_head="new", **start)


def test_a_reset_head_recipe_keeps_the_cache_key_it_had_before_the_head_policy() -> None:
    cfg = TrainConfig(arch="vgg6bn", dataset="digits")
    old = {k: v for k, v in vars(cfg).items() if k not in ("member_head", "base_dataset")}  # the newer fields
    assert _member_key(cfg, 7) == recipe_hash({**old, "role": "member", "member_seed": 7, "version": TRAIN_VERSION,
                                               "splits": SPLITS_VERSION})  # splits: zoo.data's sampler version
    keep = TrainConfig(arch="vgg6", dataset="digits")
    assert _member_key(keep, 7) != _member_key(TrainConfig(arch="vgg6", dataset="digits", member_head="reset"), 7)


def test_a_cached_zoo_reads_each_checkpoint_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the cache check keeps what it read: loading a cached shared-start zoo reads the base and each member once
    train_zoo("vgg6", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    reads: list[str] = []
    real = zoo_train.load_entry

    def spy(key: str, root: Path | None = None) -> dict[str, object] | None:
        reads.append(key)
        return real(key, root)

    monkeypatch.setattr(zoo_train, "load_entry", spy)
    again = train_zoo("vgg6", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    assert again.trained == 0
    assert len(reads) == len(set(reads)) == 3 and set(again.cache_keys) < set(reads)  # before: 6 reads
