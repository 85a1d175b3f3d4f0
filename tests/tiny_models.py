"""Tiny random Hugging Face models saved as folders, for end-to-end and conformance tests."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert")


def _config(arch: str, vocab: int = 64, layers: int = 3):  # type: ignore[no-untyped-def]
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v projections carry biases, unlike Llama's and Mistral's
        return tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0,
                             eos_token_id=0)
    if arch == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=64)
    raise ValueError(arch)


def make_family(root: Path, arch: str, n_models: int = 3, *, seed: int = 0, vocab: int = 64,
                max_shard_size: str | None = None, scale: float = 0.02, layers: int = 3) -> tuple[Path, list[Path]]:
    """A base model and ``n_models`` 'fine-tunes' (base + small random deltas), saved as HF folders."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _config(arch, vocab, layers)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "gpt2": tf.GPT2LMHeadModel, "bert": tf.BertModel}[arch]
    base = cls(cfg).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base_dir = root / f"{arch}-base"
    base.save_pretrained(base_dir, **kwargs)
    paths = []
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n_models):
        model = cls(cfg).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        d = root / f"{arch}-ft{i}"
        model.save_pretrained(d, **kwargs)
        paths.append(d)
    return base_dir, paths


def tiny_tokenizer(folder: Path, words: list[str], added: tuple[str, ...] = ()) -> Path:
    """A word-level fast tokenizer ('[UNK]' = 0, then ``words``; ``added`` as added tokens) saved in ``folder``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if added:
        fast.add_tokens(list(added))
    fast.save_pretrained(folder)
    return folder
