"""Deterministic mode (``EngineConfig.deterministic``): a request's tokens do not depend on what shares its
steps or on how its prompt was chunked, for every family, in bf16 (where it matters most)."""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.attn_meta import AttnMeta
from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.paged import gather_attention, paged_attention
from moeyard.attention.sequence import SamplingParams
from moeyard.model.batch_invariant import batch_invariant

BS = 4


def _meta(batch, seed=0, num_blocks=400):
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-c // BS))] for _, c in batch]
    return AttnMeta.build([q for q, _ in batch], [c for _, c in batch], tables, BS), tables


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_attention_rows_do_not_depend_on_the_other_sequences_or_the_chunking(mla):
    """One sequence (context 300: two key tiles) decoded alone and beside others of other lengths, and its
    last 37 positions as a prefill chunk of 37 or at the end of one of 120: the same bits for its rows."""
    h, kv, dq, dv = (8, 1, 48, 32) if mla else (8, 2, 16, 16)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(400 * BS, kv, dq, generator=g).bfloat16()
    v = None if mla else torch.randn(400 * BS, kv, dv, generator=g).bfloat16()
    queries = torch.randn(4, 600, h, dq, generator=g).bfloat16()   # per sequence, the query at each position
    _, tables = _meta([(1, 300), (1, 600), (1, 17), (1, 90)])

    def run(seqs: list[int], batch: list[tuple[int, int]]):
        """Sequences ``seqs`` (indices into ``tables``/``queries``) with ``(q_len, ctx)`` each; the rows of
        the first one listed as target (by position)."""
        meta = AttnMeta.build([qq for qq, _ in batch], [c for _, c in batch], [tables[i] for i in seqs], BS)
        q = torch.cat([queries[i, c - qq:c] for i, (qq, c) in zip(seqs, batch)])
        with batch_invariant():
            out = paged_attention(q, k, v, meta, dq ** -0.5, dv)
        ref = gather_attention(q.float(), k.float(), None if v is None else v.float(), meta, dq ** -0.5, dv)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)   # still attention
        first = [i for i, s in enumerate(seqs) if s == 0][0]
        start = sum(qq for qq, _ in batch[:first])
        return out[start:start + batch[first][0]]

    alone = run([0], [(1, 300)])
    assert torch.equal(run([0, 1, 2], [(1, 300), (1, 600), (1, 17)]), alone)
    assert torch.equal(run([2, 0, 3], [(1, 17), (1, 300), (1, 90)]), alone)
    short = run([0], [(37, 300)])                          # positions 263..299
    longer = run([1, 0], [(1, 600), (120, 300)])           # positions 180..299
    assert torch.equal(longer[120 - 37:], short)
    assert torch.equal(short[-1:], alone)                  # the last position, decoded or prefilled


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "llama"])
def test_a_requests_tokens_do_not_depend_on_its_batch_or_chunking(family, hf_models):
    ckpt, _ = hf_models(family)
    g = torch.Generator().manual_seed(5)

    def engine(budget: int) -> LLMEngine:
        return LLMEngine(ckpt, EngineConfig(dtype="bfloat16", deterministic=True, block_size=4, num_blocks=512,
                                            max_num_batched_tokens=budget, enable_prefix_caching=False))
    e = engine(24)
    prompts = [torch.randint(3, e.spec.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 17, 26, 40, 3)]
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    together = e.generate(prompts, sp)
    alone = [e.generate([p], sp)[0] for p in prompts]
    other_chunks = engine(512).generate(prompts[::-1], sp)[::-1]
    assert together == alone == other_chunks


def test_deterministic_refuses_a_capacity_factor(hf_models):
    ckpt, _ = hf_models("mixtral")
    with pytest.raises(ValueError, match="deterministic mode cannot be combined with a capacity factor"):
        LLMEngine(ckpt, EngineConfig(dtype="float32", deterministic=True, capacity_factor=1.25))


def test_deterministic_fp32_still_matches_transformers(hf_models):
    from tests.attention.test_parity import NEW_TOKENS, _hf_greedy, _prompts

    ckpt, model = hf_models("mixtral")
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", deterministic=True, block_size=4,
                                          max_num_batched_tokens=24, num_blocks=128))
    prompts = _prompts(engine.spec.vocab_size)
    ours = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    assert ours == [_hf_greedy(model, p, NEW_TOKENS) for p in prompts]
