"""AsyncEngine: concurrent streams equal the synchronous engine; aborts free blocks."""

from __future__ import annotations

import asyncio

import pytest

from moeyard.attention.async_engine import AsyncEngine, QueueFull
from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import RequestError, SamplingParams

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20] * 12, [30, 31]]


@pytest.fixture(scope="module")
def ckpt(hf_models):
    return hf_models("mixtral")[0]


def _engine(ckpt, **kw):
    return LLMEngine(ckpt, EngineConfig(dtype="float32", block_size=4, num_blocks=64, **kw))


async def _collect(ae, rid, prompt, params):
    ids = []
    async for out in ae.generate(rid, prompt, params):
        ids.extend(out.new_token_ids)
    return ids


def test_concurrent_streams_match_sync_engine(ckpt):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = _engine(ckpt).generate(PROMPTS, params)
    ae = AsyncEngine(_engine(ckpt))

    async def main():
        return await asyncio.gather(*[_collect(ae, f"r{i}", p, params) for i, p in enumerate(PROMPTS)])

    try:
        assert asyncio.run(main()) == expected
    finally:
        ae.shutdown()


def test_errors_and_abort(ckpt):
    ae = AsyncEngine(_engine(ckpt), max_waiting=0)

    async def main():
        with pytest.raises(RequestError, match="prompt is empty"):
            await anext(ae.generate("bad", [], SamplingParams()))
        with pytest.raises(QueueFull, match="capacity"):
            await anext(ae.generate("full", [1, 2], SamplingParams()))

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()

    ae = AsyncEngine(_engine(ckpt))
    free0 = ae.engine.blocks.num_free

    async def cancel_midway():
        gen = ae.generate("long", [5, 6, 7, 8], SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(gen)
        await gen.aclose()          # client went away
        for _ in range(100):
            if ae.stats().running == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(cancel_midway())
        assert ae.stats().running == 0
        assert ae.engine.blocks.num_free == free0
    finally:
        ae.shutdown()
