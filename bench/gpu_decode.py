"""Stage ``c`` of the GPU check: in-process decode of 2-layer slices of Mixtral-8x7B and DeepSeek-V3.

Full width (every tensor of those models' layers at its real shape, random weights made on the device:
:mod:`bench.random_weights`), both layers MoE, bf16. A decode step at batch 1 to 256 with every sequence
at ``context`` tokens (the cache filled with random keys and values, as a prefill would leave it) is timed
through :class:`moeyard.attention.model_runner.ModelRunner` with the experts in-process, and set against
the memory floor: the bytes one step must read (the attention side's weights, the LM head, the experts
the batch touches under uniform routing, ``E * (1 - (1 - k/E) ** B)`` per layer, and the KV cache),
divided by the HBM bandwidth (4.3 TB/s measured on an H200; the copy bandwidth measured here is
reported beside it). Also: KV-cache bytes per token, the peak memory a step allocates on CUDA beyond the
weights and the cache, and one attention call per kernel (``triton``, ``paged``, ``gather``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch

from bench.common import device_sync, median_ms
from bench.random_weights import RandomWeights

H200_HBM_TBS = 4.3
"""HBM bandwidth measured on an H200 (the device tool's notes): the floor's denominator on CUDA."""

MIXTRAL_8X7B = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 2,
               "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
               "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
               "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
               "topk_method": "noaux_tc", "first_k_dense_replace": 0, "moe_layer_freq": 1, "q_lora_rank": 1536,
               "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
               "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
               "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1}
QUICK = {  # the same two slices at toy widths (CI: --device cpu --quick)
    "mixtral": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 512},
    "deepseek_v3": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 16, "n_group": 4,
                    "topk_group": 2, "num_experts_per_tok": 4, "q_lora_rank": 64, "kv_lora_rank": 64,
                    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 512},
}


@dataclasses.dataclass
class Slice:
    spec: object
    runner: object
    cache: object
    blocks_per_seq: int
    attention_bytes: int


def _tensor_bytes(obj, skip: frozenset[str] = frozenset()) -> int:
    """Bytes of every tensor in a weights dataclass (recursively), less the fields named in ``skip``."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name), skip) for f in dataclasses.fields(obj) if f.name not in skip)
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, skip) for x in obj)
    return 0


def build_slice(config: dict, device: torch.device, dtype: torch.dtype, max_batch: int, context: int,
                block_size: int = 16, backend: str = "auto", transport=None, placement=None) -> Slice:
    """The slice's attention side (and, without ``transport``, its experts in-process in one shard);
    the same seeds give the same weights and cache contents in every process."""
    from moeyard.attention.engine import build_local_experts
    from moeyard.attention.kv_cache import KVCache
    from moeyard.attention.model_runner import ModelRunner
    from moeyard.attention.weights import load_attention_weights
    from moeyard.model.spec import load_spec
    from moeyard.router_service.dispatch import ExpertDispatcher
    from moeyard.router_service.gate import GateConfig
    from moeyard.router_service.moe_router import GateParams, MoERouter
    from moeyard.router_service.placement import round_robin_placement

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        spec = load_spec(tmp)
        reader = RandomWeights(device)
        weights = load_attention_weights(reader, spec, dtype, device)
        if transport is None:
            placement = round_robin_placement(spec.num_moe_layers, spec.moe.num_experts, 1)
            transport = build_local_experts(tmp, spec, placement, dtype, reader=reader, device=device)
    gates = [GateParams(lw.moe.router, lw.moe.correction_bias) for lw in weights.layers]
    router = MoERouter(GateConfig.from_spec(spec.moe, family=spec.family), gates,
                       ExpertDispatcher(placement, transport))
    per_seq = -(-(context + 1) // block_size)
    cache = KVCache(spec, max_batch * per_seq + 1, block_size, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    for t in (cache.latent if cache.mla else cache.k + cache.v):
        t.normal_(generator=g)
    runner = ModelRunner(spec, weights, cache, router, dtype, context + 8, device, backend)
    # what a step reads on the attention side: not the embedding table (B rows of it) and, absorbed, not kv_b
    skip = frozenset({"kv_b"} if spec.mla else set())
    attn_bytes = _tensor_bytes(weights.layers, skip) + _tensor_bytes(weights.lm_head) + _tensor_bytes(
        weights.final_norm)
    return Slice(spec, runner, cache, per_seq, attn_bytes)


def _meta(s: Slice, batch: int, context: int, device: torch.device):
    from moeyard.attention.attn_meta import AttnMeta

    tables = [list(range(1 + i * s.blocks_per_seq, 1 + (i + 1) * s.blocks_per_seq)) for i in range(batch)]
    return AttnMeta.build([1] * batch, [context + 1] * batch, tables, s.cache.block_size, device)


def step_bytes(s: Slice, batch: int, context: int, dtype: torch.dtype) -> dict:
    """The bytes a decode step of ``batch`` sequences at ``context`` must read, by part."""
    from moeyard.attention.kv_cache import bytes_per_block

    m = s.spec.moe
    touched = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch)
    expert = 3 * s.spec.hidden_size * m.intermediate_size * dtype.itemsize
    return {"attention_side": s.attention_bytes,
            "experts": int(s.spec.num_moe_layers * touched * expert),
            "kv_cache": batch * (context + 1) * bytes_per_block(s.spec, 1, dtype)}


def copy_bandwidth_gbs(device: torch.device, nbytes: int) -> float:
    """Read + write bandwidth of one large on-device copy, GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 5)[0]
    return 2 * nbytes / ms / 1e6


def _attention_ms(s: Slice, batch: int, context: int, device: torch.device, dtype: torch.dtype,
                  repeats: int) -> dict:
    """One layer's attention (projections included) per kernel: ms (median, min, max), and each kernel's
    largest error against the reference (``gather``) relative to the reference's largest value (bf16:
    the check of the Triton kernel's bf16 path, which Triton's CPU interpreter cannot run)."""
    from moeyard.attention.layers import gqa_attention, mla_attention
    from moeyard.attention.paged import resolve_attention

    meta = _meta(s, batch, context, device)
    x = torch.randn(batch, s.spec.hidden_size, device=device, dtype=dtype)
    lw, out, outputs = s.runner.w.layers[0], {}, {}
    for backend in ("gather", "triton", "paged"):
        if backend == "triton" and device.type != "cuda":
            continue
        try:
            attend, absorb = resolve_attention(backend, device)
        except ValueError as e:
            out[backend] = str(e)
            continue
        if s.spec.mla:
            def call():
                return mla_attention(x, lw.attn, s.spec, 0, s.cache, s.runner.rope, meta, attend, absorb)
        else:
            def call():
                return gqa_attention(x, lw.attn, s.spec, 0, s.cache, s.runner.rope, meta, attend)
        try:
            outputs[backend] = call().float()
            out[backend] = [round(v, 3) for v in median_ms(call, device, repeats)]
        except Exception as e:  # one kernel failing (say Triton's compiler) must not hide the others' figures
            out[backend] = f"{type(e).__name__}: {e}"[:500]
    ref = outputs["gather"]
    out["rel_err_vs_gather"] = {b: float((o - ref).abs().max() / ref.abs().max()) for b, o in outputs.items()
                                if b != "gather"}
    return out


def _measure_slice(cfg: dict, device: torch.device, dtype: torch.dtype, batches: list[int], context: int,
                   repeats: int, floor_gbs: float, quick: bool) -> dict:
    from moeyard.attention.kv_cache import bytes_per_block

    s = build_slice(cfg, device, dtype, max(batches), context)
    runs = []
    for b in batches:
        meta = _meta(s, b, context, device)
        ids = torch.randint(0, s.spec.vocab_size, (b,), device=device)
        rows = torch.arange(b, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        ms = median_ms(lambda: s.runner.forward(ids, meta, rows), device, repeats)
        parts = step_bytes(s, b, context, dtype)
        floor_ms = sum(parts.values()) / floor_gbs / 1e6
        run = {"batch": b, "step_ms": [round(v, 3) for v in ms], "floor_ms": round(floor_ms, 3),
               "over_floor": round(ms[0] / floor_ms, 2), "tok_s": round(b / ms[0] * 1e3, 1), "bytes": parts}
        if device.type == "cuda":
            run["step_peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
        runs.append(run)
    attn_batch = 64 if not quick else 4
    mla = s.spec.mla
    return {"kv_bytes_per_token_per_layer": bytes_per_block(s.spec, 1, dtype) // s.spec.num_layers,
            # what MLA's cache would hold per token and layer with every head's K and V expanded
            "kv_bytes_per_token_per_layer_expanded": (s.spec.num_heads * (mla.qk_head_dim + mla.v_head_dim)
                                                      * dtype.itemsize) if mla else None,
            "runs": runs, "attention_ms_batch": attn_batch,
            "attention_ms": _attention_ms(s, attn_batch, context, device, dtype, repeats)}


def stage_c(device: torch.device, quick: bool) -> dict:
    dtype = torch.bfloat16
    if quick:
        batches, context, repeats = [1, 4, 16], 64, 2
        configs = {name: {**cfg, **QUICK[cfg["model_type"]]} for name, cfg in
                   (("mixtral_8x7b_2l", MIXTRAL_8X7B), ("deepseek_v3_2l", DEEPSEEK_V3))}
    else:
        batches, context, repeats = [1, 8, 32, 64, 128, 256], 1024, 5
        configs = {"mixtral_8x7b_2l": MIXTRAL_8X7B, "deepseek_v3_2l": DEEPSEEK_V3}
    measured_gbs = copy_bandwidth_gbs(device, (1 << 30) if not quick else (64 << 20))
    floor_gbs = H200_HBM_TBS * 1e3 if device.type == "cuda" else measured_gbs
    out = {"context": context, "dtype": "bfloat16", "floor_bandwidth_gbs": round(floor_gbs, 1),
           "measured_copy_gbs": round(measured_gbs, 1), "slices": {}}
    for name, cfg in configs.items():
        out["slices"][name] = _measure_slice(cfg, device, dtype, batches, context, repeats, floor_gbs, quick)
        device_sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(math.isfinite(r["step_ms"][0]) and r["step_ms"][0] > 0 for sl in out["slices"].values()
             for r in sl["runs"])
    ok = ok and all(err < 2e-2 for sl in out["slices"].values()
                    for err in sl["attention_ms"]["rel_err_vs_gather"].values())
    out["ok"] = ok
    return out
