"""``mergelab example-models DIR``: a tiny Llama-style base and three "fine-tunes" that every config in
``examples/`` runs on unchanged (they name ``./base``, ``./ft-a``, ``./ft-b``, ``./ft-c``).

Written with torch and safetensors alone (no ``transformers`` needed to make them), in the Hugging Face
layout ``LlamaForCausalLM`` loads: 3 layers (``examples/slerp.yml`` slices ``layer_range: [0, 3]``), hidden
size 32, and a word-level tokenizer over the bundled evaluation text, so ``mergelab eval`` can measure
perplexity on them. The fine-tunes are the base plus seeded Gaussian noise (a stand-in, not trained): they
exist to show the mechanics in seconds, not to be good models.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelab.errors import OutputExistsError

NAMES = ("base", "ft-a", "ft-b", "ft-c")
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, MAX_POSITIONS = 3, 32, 64, 4, 2, 256
SPECIAL = ("[UNK]", "[PAD]")


def bundled_text() -> str:
    """The small text ``mergelab eval`` measures causal-LM perplexity on (written for this project)."""
    return resources.files("mergelab").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def _vocabulary() -> list[str]:
    words = sorted(set(bundled_text().lower().split()))
    return [*SPECIAL, *words]


def _config(vocab_size: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0,
        "pad_token_id": 1, "bos_token_id": None, "eos_token_id": None, "dtype": "float32",
    }


def _base_state(vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    head_dim = HIDDEN // HEADS

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.02

    state = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN), "model.norm.weight": torch.ones(HIDDEN),
             "lm_head.weight": normal(vocab_size, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": normal(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": normal(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": normal(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": normal(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": torch.ones(HIDDEN),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
        }
    return state


def _tokenizer_files(folder: Path, vocab: list[str]) -> None:
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(SPECIAL)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)}, "unk_token": "[UNK]"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]",
         "model_max_length": MAX_POSITIONS}, indent=2) + "\n")


def example_configs() -> list[Path]:
    """The packaged example configs (``examples/*.yml``, also in the repository's ``examples/``)."""
    return sorted(Path(str(resources.files("mergelab").joinpath("examples"))).glob("*.yml"))


def write_example_models(folder: str | Path, *, seed: int = 0, overwrite: bool = False,
                         scale: float = 0.01) -> list[Path]:
    """Write ``base``, ``ft-a``, ``ft-b``, ``ft-c`` and a copy of every example config under ``folder``;
    returns the model folders."""
    root = Path(folder)
    existing = [p for p in [*(root / n for n in NAMES), *(root / c.name for c in example_configs())] if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} exists; choose another folder or pass --overwrite")
    vocab = _vocabulary()
    generator = torch.Generator().manual_seed(seed)
    base = _base_state(len(vocab), generator)
    paths = []
    for i, name in enumerate(NAMES):
        # each fine-tune moves every weight by its own seeded noise
        state = base if i == 0 else {k: v + torch.randn(v.shape, generator=generator) * scale for k, v in base.items()}
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(_config(len(vocab)), indent=2) + "\n")
        _tokenizer_files(out, vocab)
        (out / "mergelab_example.json").write_text(json.dumps({"seed": seed, "noise_std": scale if i else 0.0,
                                                               "role": name}) + "\n")
        paths.append(out)
    for config in example_configs():
        shutil.copy2(config, root / config.name)
    return paths
