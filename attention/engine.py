"""The in-process LLM engine: scheduler + block manager + model runner + sampler.

One ``step()`` schedules a batch (prefill chunks and decodes mixed), runs the
model once, samples, and reports new tokens per request. The routed experts
run wherever the router's transport sends them (in this process by default).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from moeyard.attention.attn_meta import AttnMeta
from moeyard.attention.block_manager import BlockManager
from moeyard.attention.kv_cache import KVCache, bytes_per_block
from moeyard.attention.model_runner import ModelRunner
from moeyard.attention.overlap import OverlapMode, OverlapTuner, OverlapTunerConfig
from moeyard.attention.sampler import sample
from moeyard.attention.scheduler import Scheduler, SchedulerConfig
from moeyard.attention.sequence import RequestError, RequestOutput, SamplingParams, Sequence
from moeyard.attention.tokenizer import TextTokenizer, load_tokenizer
from moeyard.attention.weights import load_attention_weights, pack_linears
from moeyard.model.batch_invariant import batch_invariant
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.cpu_matmul import MatmulMode, resolve_matmul
from moeyard.model.devices import host_tensor_to, resolve_device
from moeyard.model.dtypes import resolve_dtype
from moeyard.model.spec import ModelSpec, load_spec
from moeyard.router_service.dispatch import ExpertDispatcher
from moeyard.router_service.gate import GateConfig
from moeyard.router_service.moe_router import GateParams, MoERouter
from moeyard.router_service.placement import ExpertsUnavailable, Placement, round_robin_placement
from moeyard.router_service.transport import ExpertTransport, InProcessTransport

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EngineConfig:
    dtype: str | None = None
    device: str = "auto"
    """``auto`` (CUDA where this process has a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``: where
    the weights, the KV cache and every tensor of a step live."""
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    top_k_override: int | None = None
    """Experts per token instead of the checkpoint's ``top_k`` (DS-MoE: dense-trained, sparse at inference)."""
    capacity_factor: float | None = None
    """Switch-style capacity: each expert takes at most ``ceil(factor * T * A / E)`` assignments of a step
    (``T`` its tokens); ``None``: no limit."""
    overflow: Literal["drop", "reroute"] = "drop"
    """Past an expert's capacity: ``drop`` (the token keeps its residual for it) or ``reroute`` (to its
    next-best expert with room; :func:`~moeyard.router_service.gate.limit_capacity`)."""
    num_threads: int | None = None
    overlap: bool = False
    """Split steps into two micro-batches so attention of one overlaps the
    other's expert round trip (useful with a remote transport)."""
    overlap_mode: OverlapMode = "adaptive"
    """With ``overlap``: ``adaptive`` splits a step only where measured splits ran faster
    (:mod:`moeyard.attention.overlap`); ``always`` splits every step of two sequences or more."""
    attention_backend: str = "auto"
    """The paged-attention kernel (:mod:`moeyard.attention.paged`): ``auto`` (Triton on CUDA where it is
    installed, else ``paged``), ``paged`` (torch, tile by tile through the block tables), ``triton``,
    or ``gather`` (the reference: whole contexts gathered, MLA expanded)."""
    cpu_matmul: MatmulMode = "auto"
    """The CPU's matmul kernel for the projections, LM head and (in-process) experts
    (:mod:`moeyard.model.cpu_matmul`): ``amx`` (our AMX kernel, bf16 on AMX-BF16 CPUs), ``packed``
    (weights in oneDNN's layout, bf16 on AVX-512 and up), ``plain`` (torch's matmul), ``auto`` (the
    first of these that runs here)."""
    deterministic: bool = False
    """Batch-invariant math (:mod:`moeyard.model.batch_invariant`): a request's tokens do not depend on
    what else shares its steps, on how its prompt was chunked, or on the placement; costs throughput
    (``docs/benchmarks.md``). Refused together with a capacity factor, which drops tokens by design
    depending on the batch."""
    expert_restart_wait_s: float = 0.0
    """With a remote transport: how long a step waits for a dead shard to come back when
    some expert it held has no other copy (0: fail the requests routed to it at once)."""


def build_local_experts(model_dir: str | Path, spec: ModelSpec, placement: Placement, dtype: torch.dtype,
                        reader: CheckpointReader | None = None,
                        device: torch.device | str = "cpu", matmul: MatmulMode = "auto",
                        deterministic: bool = False) -> InProcessTransport:
    """Load every shard of ``placement`` into this process, on ``device`` (the in-process transport)."""
    from moeyard.expert_actors.slots import ExpertSlots

    reader = reader or CheckpointReader(model_dir)
    shards = {}
    for shard in range(placement.num_shards):
        slots = ExpertSlots(spec, dtype, device, matmul=matmul, deterministic=deterministic)
        for moe_layer, pairs in placement.shard_slots(shard).items():
            slots.load(reader, moe_layer, pairs)
        shards[shard] = slots
    return InProcessTransport(shards)


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig(),
                 transport: ExpertTransport | None = None, placement: Placement | None = None):
        self.model_dir = Path(model_dir)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.deterministic and config.capacity_factor is not None:
            raise ValueError("deterministic mode cannot be combined with a capacity factor: which tokens overflow "
                             "an expert depends on the rest of the batch")
        self.spec = spec = load_spec(model_dir)
        self.dtype = resolve_dtype(config.dtype, spec.torch_dtype)
        self.device = resolve_device(config.device)
        self.reader = CheckpointReader(model_dir)
        self.matmul = resolve_matmul(config.cpu_matmul, self.dtype, self.device)
        weights = pack_linears(load_attention_weights(self.reader, spec, self.dtype, self.device), self.matmul)
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        num_blocks = config.num_blocks or max(
            1, config.kv_cache_bytes // bytes_per_block(spec, config.block_size, self.dtype))
        num_blocks = min(num_blocks, config.max_num_seqs * -(-self.max_model_len // config.block_size) + 1)
        self.cache = KVCache(spec, num_blocks, config.block_size, self.dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len), self.blocks)
        router = None
        if spec.moe is not None:
            gate_cfg = GateConfig.from_spec(spec.moe, config.top_k_override, config.capacity_factor,
                                           family=spec.family, overflow=config.overflow)
            gates = [GateParams(lw.moe.router, lw.moe.correction_bias)
                     for lw in weights.layers if lw.moe is not None]
            self.placement = placement or round_robin_placement(spec.num_moe_layers, spec.moe.num_experts, 1)
            self.placement.validate(spec.moe.num_experts)
            if transport is None:
                transport = build_local_experts(model_dir, spec, self.placement, self.dtype, device=self.device,
                                                matmul=config.cpu_matmul, deterministic=config.deterministic)
            dispatcher = ExpertDispatcher(self.placement, transport, restart_wait_s=config.expert_restart_wait_s)
            router = MoERouter(gate_cfg, gates, dispatcher)
        self.router = router
        self.runner = ModelRunner(spec, weights, self.cache, router, self.dtype, self.max_model_len, self.device,
                                  config.attention_backend)
        self.overlap_tuner = OverlapTuner(OverlapTunerConfig(config.overlap_mode)) if config.overlap else None
        self.tokenizer: TextTokenizer | None = load_tokenizer(model_dir)
        self._seqs: dict[str, Sequence] = {}
        self.num_steps = 0
        """Model steps run (each one forward over every MoE layer, in one or two micro-batches)."""
        self._arrival = itertools.count()
        self._eos = set(spec.eos_token_ids)

    # -- requests ----------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise :class:`RequestError` for a request this engine can never serve.

        Reads only immutable configuration, so any thread may call it."""
        params.validate()
        if not prompt_token_ids:
            raise RequestError("prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} out of range [0, {self.spec.vocab_size})")
        self.scheduler.check(Sequence("", list(prompt_token_ids), params))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate_request(prompt_token_ids, params)
        if request_id in self._seqs:
            raise RequestError(f"duplicate request id {request_id!r}")
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=next(self._arrival))
        self.scheduler.add(seq)
        self._seqs[request_id] = seq

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ----------------------------------------------------------------
    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids:
            return "stop"
        if token in self._eos and not p.ignore_eos:
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids)
            if any(s in text for s in p.stop):
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _inputs(self, pairs: list[tuple[Sequence, int]]):
        """Model inputs of scheduled ``(sequence, new tokens)`` pairs."""
        ids, q_lens, ctx_lens, tables, sample_rows, sampled = [], [], [], [], [], []
        row = 0
        for seq, n in pairs:
            ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            q_lens.append(n)
            ctx_lens.append(seq.num_computed + n)
            tables.append(seq.block_table)
            row += n
            if seq.num_computed + n == seq.num_tokens:
                sample_rows.append(row - 1)
                sampled.append(seq)
        meta = AttnMeta.build(q_lens, ctx_lens, tables, self.blocks.block_size, self.device)
        ids_t = host_tensor_to(ids, torch.int64, self.device)
        return (ids_t, meta, host_tensor_to(sample_rows, torch.int64, self.device)), sampled

    @staticmethod
    def _split(pairs: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """Two micro-batches of about equal token counts (one if too small to split)."""
        if len(pairs) < 2:
            return [pairs]
        total = sum(n for _, n in pairs)
        acc = 0
        for i, (_, n) in enumerate(pairs[:-1]):
            acc += n
            if acc * 2 >= total:
                return [pairs[:i + 1], pairs[i + 1:]]
        return [pairs[:-1], pairs[-1:]]

    def _fail_unroutable(self, e: ExpertsUnavailable, groups) -> list[RequestOutput]:
        """Some tokens of this step need experts with no reachable copy: fail the
        requests they belong to; the others did not advance and run again next step."""
        if e.rows is None or e.microbatch is None:
            victims = [seq for group in groups for seq, _ in group]
        else:
            rows, victims, start = set(e.rows), [], 0
            for seq, n in groups[e.microbatch]:
                if any(r in rows for r in range(start, start + n)):
                    victims.append(seq)
                start += n
        log.warning("failing %d request(s): %s", len(victims), e)
        outputs = []
        for seq in victims:
            self.scheduler.finish(seq, "error")
            self._seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput(seq.request_id, [], True, "error", len(seq.prompt_token_ids),
                                         len(seq.output_token_ids), error=str(e)))
        return outputs

    def _forward(self, mbs):
        if self.router is not None:
            self.router.begin_step(sum(int(ids.shape[0]) for ids, _, _ in mbs))  # capacity counts per step
            with self.router.dispatcher.step():  # placements switch between steps, never inside one
                return self.runner.forward_microbatches(mbs)
        return self.runner.forward_microbatches(mbs)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        pairs = list(zip(batch.seqs, batch.num_new))
        num_tokens = sum(batch.num_new)
        tuner = self.overlap_tuner
        split = tuner is not None and tuner.should_split(num_tokens, len(pairs))
        groups = self._split(pairs) if split else [pairs]
        mbs, sampled = [], []
        for group in groups:
            mb, group_sampled = self._inputs(group)
            mbs.append(mb)
            sampled.extend(group_sampled)
        t0 = time.perf_counter()
        try:
            with batch_invariant(self.config.deterministic):
                logits = self._forward(mbs)
        except ExpertsUnavailable as e:
            return self._fail_unroutable(e, groups)
        self.num_steps += 1
        if tuner is not None:
            tuner.observe(num_tokens, len(pairs), len(groups) > 1, time.perf_counter() - t0)
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            if not seq.prefix_registered and seq.num_computed >= len(seq.prompt_token_ids):
                self.blocks.register_full_blocks(seq.prompt_token_ids, seq.block_table, seq.num_computed)
                seq.prefix_registered = True
        self.last_logits = logits  # [B', V] of the sequences sampled this step (tests, scoring)
        outputs = []
        tokens = sample(logits, sampled) if sampled else []
        for seq, tok in zip(sampled, tokens):
            seq.token_ids.append(tok)
            seq.output_token_ids.append(tok)
            reason = self._stop_reason(seq, tok)
            if reason:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput(seq.request_id, [tok], reason is not None, reason,
                                         len(seq.prompt_token_ids), len(seq.output_token_ids)))
        return outputs

    # -- convenience -------------------------------------------------------------
    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[int]]:
        """Run prompts to completion together; returns generated ids per prompt."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        base = f"gen-{next(self._arrival)}-"
        results: dict[str, list[int]] = {}
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            rid = f"{base}{i}"
            self.add_request(rid, p, sp)
            results[rid] = []
        while any(rid in self._seqs for rid in results):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[f"{base}{i}"] for i in range(len(prompts))]
