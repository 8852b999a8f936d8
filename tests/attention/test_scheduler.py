"""Continuous batching: joins, independent finishes, chunked prefill, preemption, abort."""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.block_manager import BlockManager
from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.scheduler import Scheduler, SchedulerConfig
from moeyard.attention.sequence import RequestError, SamplingParams, Sequence

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def _prompts(*lens: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]


def _engine(hf_models, **kw) -> LLMEngine:
    ckpt, _ = hf_models("mixtral")
    cfg = dict(dtype="float32", block_size=4, num_blocks=64)
    cfg.update(kw)
    return LLMEngine(ckpt, EngineConfig(**cfg))


def _record_batches(engine: LLMEngine) -> list:
    """Wrap the engine's scheduler so every step's (request id, new tokens) and preemptions are kept."""
    log = []
    schedule = engine.scheduler.schedule

    def wrapped():
        batch = schedule()
        log.append(([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new)],
                    [s.request_id for s in batch.preempted]))
        return batch

    engine.scheduler.schedule = wrapped
    return log


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


@pytest.fixture(scope="module")
def solo(hf_models):
    """Greedy tokens of each prompt run alone on a roomy engine (the reference)."""
    cache: dict[tuple, list[int]] = {}

    def get(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        key = (tuple(prompt), params.max_tokens)
        if key not in cache:
            cache[key] = _engine(hf_models, num_blocks=128).generate([prompt], params)[0]
        return cache[key]

    return get


# -- through the engine -------------------------------------------------------------

def test_new_request_joins_running_batch(hf_models, solo):
    eng = _engine(hf_models)
    a, b = _prompts(9, 6)
    log = _record_batches(eng)
    eng.add_request("a", a, GREEDY)
    got = {"a": [], "b": []}
    for _ in range(3):
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    eng.add_request("b", b, GREEDY)
    outs = eng.step()
    assert {o.request_id for o in outs} == {"a", "b"}  # b's prefill ran alongside a's decode
    assert log[-1][0] == [("a", 1), ("b", len(b))]
    for o in outs:
        got[o.request_id].extend(o.new_token_ids)
    for rid, toks in _run(eng).items():
        got[rid].extend(toks)
    assert got["a"] == solo(a)
    assert got["b"] == solo(b)


def test_sequences_finish_independently(hf_models, solo):
    eng = _engine(hf_models)
    a, b = _prompts(5, 7, seed=4)
    log = _record_batches(eng)
    eng.add_request("short", a, SamplingParams(max_tokens=2, ignore_eos=True))
    eng.add_request("long", b, SamplingParams(max_tokens=6, ignore_eos=True))
    finished = {}
    step = 0
    tokens = {"short": [], "long": []}
    while eng.has_unfinished():
        step += 1
        for o in eng.step():
            tokens[o.request_id].extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id] = (step, o.finish_reason, o.num_output_tokens)
    assert finished["short"] == (2, "length", 2)
    assert finished["long"] == (6, "length", 6)
    # after the short one finished, steps run only the long one
    assert all(ids == [("long", 1)] for ids, _ in log[2:])
    assert tokens["short"] == solo(a, SamplingParams(max_tokens=2, ignore_eos=True))
    assert tokens["long"] == solo(b, SamplingParams(max_tokens=6, ignore_eos=True))
    assert eng.scheduler.running == [] and eng.blocks.num_free == eng.blocks.num_blocks


def test_chunked_prefill_respects_token_budget(hf_models, solo):
    budget = 5
    eng = _engine(hf_models, max_num_batched_tokens=budget)
    prompts = _prompts(13, 9, 4, seed=5)
    log = _record_batches(eng)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, GREEDY)
    got = _run(eng)
    assert all(sum(n for _, n in ids) <= budget for ids, _ in log)
    # the 13-token prompt was split into chunks of at most the budget
    chunks = [n for ids, _ in log for rid, n in ids if rid == "r0"][:3]
    assert chunks == [5, 5, 3]
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == solo(p)


def test_preemption_keeps_greedy_tokens(hf_models, solo):
    # 8 blocks of 4 tokens: each request fits alone (<= 5 blocks), all three do not
    eng = _engine(hf_models, num_blocks=8)
    prompts = _prompts(7, 9, 6, seed=6)
    log = _record_batches(eng)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    got = _run(eng)
    assert any(pre for _, pre in log), "the tiny cache should have forced a preemption"
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == solo(p, params), f"r{i}"
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.blocks.ref == [0] * eng.blocks.num_blocks


def test_request_that_can_never_fit(hf_models, solo):
    eng = _engine(hf_models, num_blocks=4)  # 16 token slots in all
    (p,) = _prompts(10, seed=7)
    with pytest.raises(RequestError, match="needs 5 KV-cache blocks .* only 4"):
        eng.add_request("big", p, SamplingParams(max_tokens=10))
    assert not eng.has_unfinished()
    small = p[:5]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    assert eng.generate([small], params) == [solo(small, params)]


def test_abort_frees_blocks(hf_models):
    eng = _engine(hf_models, max_num_seqs=2)
    initial = eng.blocks.num_free
    for i, p in enumerate(_prompts(9, 6, 11, seed=8)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.blocks.num_free < initial
    assert len(eng.scheduler.running) == 2 and len(eng.scheduler.waiting) == 1
    for rid in ("r0", "r2", "r1"):  # running, waiting, running
        eng.abort(rid)
    eng.abort("never-existed")
    assert not eng.has_unfinished()
    assert eng.blocks.num_free == initial
    assert eng.blocks.ref == [0] * eng.blocks.num_blocks
    assert eng.step() == []


# -- the scheduler alone ---------------------------------------------------------------

def _sim_step(sched: Scheduler) -> list[tuple[str, int]]:
    """The engine's bookkeeping around one schedule() (a fake model that always emits 0)."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new):
        assert len(seq.block_table) * sched.blocks.block_size >= seq.num_computed + n
        seq.num_computed += n
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(0)
            seq.output_token_ids.append(0)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq, "length")
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new)]


def test_scheduler_budget_and_seq_limit():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64),
                      BlockManager(32, 4))
    seqs = [Sequence(f"s{i}", list(range(1, n + 1)), SamplingParams(max_tokens=3), arrival=i)
            for i, n in enumerate((20, 3, 6))]
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.has_work():
        steps.append(_sim_step(sched))
        assert sum(n for _, n in steps[-1]) <= 8
        assert len(sched.running) <= 2
        assert len(steps) < 50
    assert all(s.finished and s.finish_reason == "length" for s in seqs)
    assert all(len(s.output_token_ids) == 3 for s in seqs)
    # FIFO: s0 prefills in chunks of 8, 8, 4; s1 joins in the step s0 leaves room
    assert steps[0] == [("s0", 8)]
    assert steps[1] == [("s0", 8)]
    assert steps[2] == [("s0", 4), ("s1", 3)]
    # s2 waits for a sequence slot (max_num_seqs=2)
    first_s2 = next(i for i, st in enumerate(steps) if any(r == "s2" for r, _ in st))
    assert all(r != "s1" for st in steps[first_s2:] for r, _ in st)
    assert sched.blocks.num_free == 32
