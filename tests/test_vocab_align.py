"""Rows aligned by token (merge/vocab_align.py): golden values worked out by hand, then mergekit's own code."""

from __future__ import annotations

import random

import pytest
import torch

from mergelab.merge.vocab_align import (
    TokenSource,
    align_rows,
    is_vocabulary_tensor,
    plan_rows,
    token_permutation,
)


def test_permutation_maps_each_output_token_to_the_models_row_or_minus_one() -> None:
    out = {"a": 0, "b": 1, "c": 2, "d": 3}
    model = {"b": 0, "a": 1, "d": 5, "e": 2}
    # 'c' is not in the model; 'd' has id 5, past the model's 4 embedding rows: both missing
    assert token_permutation(out, model, rows=4) == [1, 0, -1, -1]
    assert token_permutation(out, model, rows=6) == [1, 0, -1, 5]


# Three models, the first the base. Output tokens a..e; rows are [v, v] with v saying where they come from.
OUT = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
VOCABS = [{"a": 0, "d": 1}, {"a": 0, "e": 1, "d": 2}, {"b": 0, "a": 1, "e": 2}]
TENSORS = [torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
           torch.tensor([[10.0, 10.0], [11.0, 11.0], [12.0, 12.0]]),
           torch.tensor([[20.0, 20.0], [21.0, 21.0], [22.0, 22.0]])]


def _perms() -> list[list[int]]:
    return [token_permutation(OUT, v, len(v)) for v in VOCABS]


def _first_column(tensors: list[torch.Tensor]) -> list[list[float]]:
    return [t[:, 0].tolist() for t in tensors]


def test_missing_rows_follow_mergekits_rules() -> None:
    """a: everyone has it (own rows); b: only model 2 (its row for all); c: nobody (zeros); d: the base and
    model 1 (the base's row for model 2); e: models 1 and 2 but not the base (their mean, 16.5, for the base)."""
    plan = plan_rows(OUT, _perms(), base=0)
    assert plan.tokens == plan.rows == 5
    assert plan.average == {4: (1, 2)} and plan.copy == {1: (2, 0), 3: (0, 1)} and plan.zero == {2}
    assert _first_column(align_rows(TENSORS, plan)) == [
        [1.0, 20.0, 0.0, 2.0, 16.5],
        [10.0, 20.0, 0.0, 12.0, 11.0],
        [21.0, 20.0, 0.0, 2.0, 22.0],
    ]


def test_without_a_base_a_token_several_models_share_is_their_mean() -> None:
    plan = plan_rows(OUT, _perms(), base=None)
    # d: models 0 and 1 have it (rows 2 and 12) -> 7 for model 2
    assert _first_column(align_rows(TENSORS, plan))[2] == [21.0, 20.0, 0.0, 7.0, 22.0]


def test_padding_rows_are_the_mean_of_the_vocabularys_rows() -> None:
    plan = plan_rows(OUT, _perms(), base=0, pad_to_multiple_of=4)
    assert plan.rows == 8
    base_rows = align_rows(TENSORS, plan)[0][:, 0].tolist()
    assert base_rows[:5] == [1.0, 20.0, 0.0, 2.0, 16.5]
    assert base_rows[5:] == pytest.approx([39.5 / 5] * 3)
    assert plan_rows(OUT, _perms(), base=0, pad_to_multiple_of=5).rows == 5


def test_configured_sources_forced_or_for_missing_rows() -> None:
    settings = {
        "a": TokenSource(model=1, force=True),    # every model takes model 1's row for 'a' (10)
        "c": TokenSource(model=2, token="b"),     # model 2's row of its own token 'b' (20)
        "e": TokenSource(model=2, row=1),         # row 1 of model 2 (21) where e is missing: the base
        "d": TokenSource(zero=True),              # zeros where d is missing: model 2
    }
    plan = plan_rows(OUT, _perms(), base=0, settings=settings, model_vocabs=VOCABS)
    assert _first_column(align_rows(TENSORS, plan)) == [
        [10.0, 20.0, 20.0, 2.0, 21.0],
        [10.0, 20.0, 20.0, 12.0, 11.0],
        [10.0, 20.0, 20.0, 0.0, 22.0],
    ]


def test_a_configured_token_without_a_usable_source_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"tokenizer.tokens.c: no source .*\(m0 lacks it\)"):
        plan_rows(OUT, _perms(), base=0, settings={"c": TokenSource()}, labels=["m0", "m1", "m2"])
    with pytest.raises(ValueError, match=r"tokenizer.tokens.b: m0 does not have this token"):
        plan_rows(OUT, _perms(), base=0, settings={"b": TokenSource(model=0)}, labels=["m0", "m1", "m2"])
    with pytest.raises(ValueError, match=r"token 'zz' is not in the vocabulary of m1"):
        plan_rows(OUT, _perms(), base=0, settings={"c": TokenSource(model=1, token="zz")}, model_vocabs=VOCABS,
                  labels=["m0", "m1", "m2"])
    plan = plan_rows(OUT, _perms(), base=0, settings={"c": TokenSource(model=1, row=7)})
    with pytest.raises(ValueError, match=r"'lm_head.weight': .* row 7, but that model has 3 rows"):
        align_rows(TENSORS, plan, "lm_head.weight")


def test_the_mean_is_summed_in_the_tensors_dtype() -> None:
    """bfloat16 rows 1, 2^-8, 2^-8 of a token the fourth model lacks: summed one at a time in bfloat16,
    1 + 2^-8 rounds to 1 (a tie, to even) twice, and 1/3 rounds to 0.333984375; a float32 sum would give
    (1 + 2^-7)/3 -> 0.3359375."""
    out = {"t": 0}
    perms = [[0], [0], [0], [-1]]
    tensors = [torch.tensor([[v]], dtype=torch.bfloat16) for v in (1.0, 2**-8, 2**-8, 5.0)]
    rows = align_rows(tensors, plan_rows(out, perms, base=None))
    assert rows[3].dtype == torch.bfloat16 and rows[3].item() == 0.333984375


def test_shapes_beyond_the_vocabulary_must_agree() -> None:
    plan = plan_rows({"a": 0}, [[0], [0]], base=0)
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight': .* \[\[1, 2\], \[1, 3\]\]"):
        align_rows([torch.zeros(1, 2), torch.zeros(1, 3)], plan, "model.embed_tokens.weight")


def test_token_indexed_tensors_are_known_by_name() -> None:
    assert is_vocabulary_tensor("model.embed_tokens.weight") and is_vocabulary_tensor("lm_head.weight")
    assert is_vocabulary_tensor("transformer.wte.weight")
    assert not is_vocabulary_tensor("model.layers.0.mlp.up_proj.weight")
    assert not is_vocabulary_tensor("transformer.wpe.weight")  # positions, not tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_rows_as_mergekits_permuted_vocabulary(dtype: torch.dtype) -> None:
    """Random vocabularies, base or none, padding or none, configured tokens: mergekit 0.1.5's own
    ``PermutedVocabulary.execute`` on the same permutations gives the same bits."""
    from types import SimpleNamespace

    from mergekit.common import ModelReference
    from mergekit.tokenizer.build import TokenizerInfo
    from mergekit.tokenizer.config import ModelTokenEmbedding, TokenEmbeddingConfig, ZeroEmbedding
    from mergekit.tokenizer.embed import PermutedVocabulary

    rng = random.Random(str(dtype))
    torch.manual_seed(0)
    for _ in range(60):
        n = rng.randint(1, 4)
        pool = [f"t{i}" for i in range(30)]
        vocabs = [{t: j for j, t in enumerate(rng.sample(pool, rng.randint(5, 25)))} for _ in range(n)]
        union = list(dict.fromkeys(t for v in vocabs for t in v)) + [f"new{i}" for i in range(rng.randint(0, 2))]
        out = {t: i for i, t in enumerate(union)}
        rows = [len(v) - rng.randint(0, 2) for v in vocabs]
        tensors = [torch.randn(r, 7).to(dtype) for r in rows]
        base = rng.choice([None, *range(n)])
        pad = rng.choice([None, 8, 16])
        refs = [ModelReference.parse(f"/m{i}") for i in range(n)]
        ours_cfg: dict[str, TokenSource] = {}
        theirs_cfg: dict[str, TokenEmbeddingConfig] = {}
        if rng.random() < 0.5:
            donor = rng.randrange(n)
            tok = rng.choice([t for t, i in vocabs[donor].items() if i < rows[donor]])
            ours_cfg["new_zero"] = TokenSource(zero=True)
            theirs_cfg["new_zero"] = TokenEmbeddingConfig(source=ZeroEmbedding(kind="zero"))
            ours_cfg[union[0]] = TokenSource(model=donor, token=tok, force=True)
            theirs_cfg[union[0]] = TokenEmbeddingConfig(
                source=ModelTokenEmbedding(kind="model_token", model=refs[donor], token=tok), force=True)
            if "new_zero" not in out:
                out["new_zero"] = len(out)
        perms = [token_permutation(out, v, r) for v, r in zip(vocabs, rows, strict=True)]
        info = TokenizerInfo.model_construct(
            tokenizer=SimpleNamespace(get_vocab=lambda out=out: dict(out)),
            permutations={r: dict(enumerate(p)) for r, p in zip(refs, perms, strict=True)},
            original_vocabs=dict(zip(refs, vocabs, strict=True)))
        task = PermutedVocabulary.model_construct(tokens=theirs_cfg or None, pad_to_multiple_of=pad,
                                                  base_model=refs[base] if base is not None else None,
                                                  vocabulary_axis=0)
        theirs = task.execute(tokenizer_info=info, tensors=dict(zip(refs, tensors, strict=True)))
        ours = align_rows(tensors, plan_rows(out, perms, base=base, settings=ours_cfg, model_vocabs=vocabs,
                                             pad_to_multiple_of=pad))
        for ref, row in zip(refs, ours, strict=True):
            assert theirs[ref].dtype == row.dtype and torch.equal(theirs[ref], row)
