"""``moeyard make-model``: write a small random checkpoint in the Hugging Face hub layout.

The checkpoint is produced *without* ``transformers`` (only torch, safetensors,
tokenizers and json), but file for file it is what a real hub repository ships and
what ``transformers`` 5.23 ``save_pretrained`` writes, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it with no missing,
unexpected or mismatched keys:

* ``config.json``: the keys the family's ``transformers`` config class and modeling
  code read (see :func:`build_config`), plus ``torch_dtype``/``dtype``, both
  ``rope_theta`` and ``rope_parameters``;
* ``generation_config.json``;
* ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` when ``max_shard_bytes`` is set;
* ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``
  (a byte-level BPE trained locally, :mod:`cluster.tokenizer_builder`).

Tensor names are the per-expert hub names (``...experts.{e}.w1.weight`` for Mixtral,
``...experts.{e}.gate_proj.weight`` for the others); ``transformers`` 5.23 fuses
them into ``experts.gate_up_proj`` / ``experts.down_proj`` at load time and splits
them again on save.

Sizes: ``intermediate`` is the routed-expert width (``intermediate_size`` for
Mixtral and OLMoE, ``moe_intermediate_size`` for Qwen-MoE and DeepSeek). Every
*dense* MLP (Llama, Qwen2, DeepSeek's first dense layers, the unused dense
``intermediate_size`` of Qwen-MoE) and the Qwen2-MoE shared expert are
``2 * intermediate`` wide; the DeepSeek shared expert is ``n_shared_experts (=1) *
intermediate``.

Random init (deterministic): every tensor has its own ``torch.Generator`` seeded
from ``sha256(f"{seed}/{name}")``, so a tensor's values depend only on the seed,
its name and its shape (not on sharding or on the other tensors). Values are
drawn directly in the target dtype: linear weights and embeddings
``N(0, 0.02)``, attention biases ``N(0, 0.02)``, norm weights ``1 + N(0, 0.02)``,
DeepSeek-V3 ``e_score_correction_bias`` ``N(0, 0.01)`` (stored in float32, as
DeepSeek ships it). With ``skew=0`` router rows are random directions of norm 1
(element std ``1/sqrt(hidden)``, so router logits on RMS-normalised hidden states
are of order 1), all of equal norm so that no expert is favoured by chance.

Skew (load imbalance for load-balancing demos), ``skew > 0``: a bias-free linear
router ``W h`` is odd in ``h``, so on hidden states symmetric around 0 no expert
can be favoured (for top-k <= E/2 every expert is picked for at most half of the
tokens: max/mean load <= E/(2k)), and a bias planted in the router alone is drowned
by whatever the attention/MLP blocks add to the residual stream (that depends on
width and depth). So the skew reserves a protected *routing subspace* of the
hidden space: an orthonormal basis ``[u, S]`` (``u`` one direction, ``S`` with
``k = min(experts, hidden // 4)`` directions, from the seed), and

1. every block's input projections ("readers": q/k/v, MLA ``q_a``/``q``/``kv_a``,
   gate/up of dense MLPs, experts and shared experts, Qwen2-MoE
   ``shared_expert_gate``) are projected orthogonal to ``[u, S]``, and every
   output projection ("writers": ``o_proj``, ``down_proj``/``w2``) never writes into
   it, so the residual stream keeps the embedding's ``[u, S]`` coordinates
   unchanged through all layers;
2. every embedding row gets its ``u``-coordinate set to ``c = 0.02 * sqrt(hidden)``
   (the same norm as its random part); its ``S``-part (``N(0, 0.02)`` per
   coordinate) is the token's routing noise ``z``;
3. router row ``e`` is ``gamma * (r_e / 0.02 - skew * ln(e + 1) / c * u)`` with
   ``r_e`` a random unit vector in ``S`` (``gamma = 0.02 * sqrt(2)`` keeps first-layer
   logits O(1)).

After the RMSNorm the router logit of expert ``e`` is a positive, token-dependent
scale times ``N(0, 1) - skew * ln(e + 1)`` (``r_e . z / 0.02`` is standard normal),
and top-k selection only depends on the order of the logits, so in every MoE layer,
at any width and depth, each token picks the top-k of ``eps_e - skew * ln(e + 1)``
with ``eps ~ N(0, 1)``: routing odds tilted by the Zipf factor ``(e + 1) ** -skew``.
For 8 experts, top-2, ``skew=1.2`` expert 0 receives about 3x the mean load and
expert 7 about 0.15x; ``skew=0.6`` gives about 2x. (Routing then depends on the token
id only, not on its context; the rest of the network never sees ``[u, S]``.)
``skew > 0`` is refused for dense families.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import queue
import re
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from cluster.spec import SUPPORTED_FAMILIES
from cluster.tokenizer_builder import BOS_ID, EOS_ID, MIN_VOCAB_SIZE, build_tokenizer, save_tokenizer_files

__all__ = ["MakeModelOptions", "make_model", "build_config", "tensor_plan", "TensorPlan", "main",
           "routing_subspace_dims", "TRANSFORMERS_LAYOUT_VERSION"]

TRANSFORMERS_LAYOUT_VERSION = "5.23.0"
"""The ``transformers`` release whose ``save_pretrained`` layout the writer reproduces."""

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
_ARCH = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 1e6, "qwen3_moe": 1e6, "qwen2": 1e6, "llama": 5e5,
               "olmoe": 1e4, "deepseek_v2": 1e4, "deepseek_v3": 1e4}
_RMS_EPS = {"mixtral": 1e-5, "olmoe": 1e-5, "llama": 1e-5}

INIT_STD = 0.02


@dataclass(frozen=True)
class MakeModelOptions:
    """What to generate (validated on construction; ``ValueError`` says what is wrong).

    ``family``: a ``model_type`` of :data:`cluster.spec.SUPPORTED_FAMILIES`.
    ``intermediate``: routed-expert width; dense MLPs and the Qwen2-MoE shared expert are
    ``2 * intermediate`` (see the module docstring). ``experts``/``top_k`` are ignored by
    the dense families. DeepSeek uses ``num_key_value_heads = heads`` (MLA) whatever
    ``kv_heads`` says. ``dtype``: ``"bfloat16"`` or ``"float32"``. ``skew``: Zipf exponent of
    the expert load (0 = uniform; MoE families only). ``max_shard_bytes``: write
    ``model-0000k-of-0000n.safetensors`` shards of at most this size (a single larger
    tensor gets a shard of its own) plus ``model.safetensors.index.json``.
    """

    family: str
    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    experts: int = 8
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    seed: int = 0
    skew: float = 0.0
    max_shard_bytes: int | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"make-model: {msg}")

        if self.family not in SUPPORTED_FAMILIES:
            bad(f"unknown family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.dtype not in _DTYPES:
            bad(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            bad(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            bad(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if (self.hidden // self.heads) % 2:
            bad(f"head dim hidden/heads = {self.hidden // self.heads} must be even (rotary embeddings)")
        if self.family.startswith("deepseek") and self.hidden // self.heads < 4:
            bad("deepseek families need hidden/heads >= 4 (MLA rope part is half a head)")
        if self.vocab < MIN_VOCAB_SIZE:
            bad(f"vocab must be >= {MIN_VOCAB_SIZE} (byte-level BPE: 3 special tokens + 256 bytes), got {self.vocab}")
        if self.family in _MOE_FAMILIES:
            if self.experts < 1 or not 1 <= self.top_k <= self.experts:
                bad(f"need experts >= 1 and 1 <= top_k <= experts, got experts={self.experts} top_k={self.top_k}")
            if self.family == "deepseek_v3" and self.experts < 2:
                bad("deepseek_v3 needs experts >= 2 (its group scores take the top-2 experts of a group)")
        if not (math.isfinite(self.skew) and self.skew >= 0):
            bad(f"skew must be a finite number >= 0, got {self.skew}")
        if self.skew > 0 and self.family not in _MOE_FAMILIES:
            bad(f"skew biases MoE routers; family {self.family!r} has none")
        if self.max_shard_bytes is not None and self.max_shard_bytes <= 0:
            bad(f"max_shard_bytes must be positive, got {self.max_shard_bytes}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def is_moe(self) -> bool:
        return self.family in _MOE_FAMILIES

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def dense_intermediate(self) -> int:
        return 2 * self.intermediate


# -- config ---------------------------------------------------------------------------

def _mla_dims(o: MakeModelOptions) -> dict:
    hd = o.head_dim
    rope = max(2, (hd // 2) // 2 * 2)
    return dict(
        q_lora_rank=max(1, o.hidden // 2) if o.family == "deepseek_v3" else None,
        kv_lora_rank=max(1, o.hidden // 2),
        qk_nope_head_dim=hd,
        qk_rope_head_dim=rope,
        v_head_dim=hd,
    )


def _v3_groups(experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group): at most 4 groups dividing the experts, >= 2 experts a group."""
    n_group = max(g for g in range(1, min(4, experts) + 1) if experts % g == 0 and (g == 1 or experts // g >= 2))
    topk_group = min(2, n_group)
    while topk_group * (experts // n_group) < top_k:
        topk_group += 1
    return n_group, topk_group


def first_dense_layers(o: MakeModelOptions) -> int:
    """DeepSeek ``first_k_dense_replace``: one dense layer when there are >= 3 layers."""
    return 1 if o.family.startswith("deepseek") and o.layers >= 3 else 0


def build_config(o: MakeModelOptions) -> dict:
    """The ``config.json`` dict for ``o`` (keys as ``transformers`` 5.23 and the hub use them)."""
    fam = o.family
    theta = _ROPE_THETA[fam]
    cfg: dict = {
        "architectures": [_ARCH[fam]],
        "model_type": fam,
        "vocab_size": o.vocab,
        "hidden_size": o.hidden,
        "num_hidden_layers": o.layers,
        "num_attention_heads": o.heads,
        "num_key_value_heads": o.kv_heads,
        "head_dim": o.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": o.max_position_embeddings,
        "initializer_range": INIT_STD,
        "rms_norm_eps": _RMS_EPS.get(fam, 1e-6),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "torch_dtype": o.dtype,
        "dtype": o.dtype,
        "transformers_version": TRANSFORMERS_LAYOUT_VERSION,
    }
    moe_common = {"num_experts_per_tok": o.top_k, "output_router_logits": False}
    if fam == "mixtral":
        cfg.update(intermediate_size=o.intermediate, num_local_experts=o.experts, sliding_window=None,
                   router_aux_loss_coef=0.02, router_jitter_noise=0.0, **moe_common)
    elif fam in ("qwen2_moe", "qwen3_moe"):
        cfg.update(intermediate_size=o.dense_intermediate, moe_intermediate_size=o.intermediate,
                   num_experts=o.experts, decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=0.001, use_sliding_window=False, sliding_window=None,
                   max_window_layers=o.layers, **moe_common)
        if fam == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=o.dense_intermediate, norm_topk_prob=False, qkv_bias=True,
                       layer_types=["full_attention"] * o.layers)
        else:
            # transformers 5.23 maps num_experts -> num_local_experts for Qwen3-MoE and saves the latter;
            # the hub checkpoints carry num_experts. Write both (equal).
            cfg.update(num_local_experts=o.experts, norm_topk_prob=True, attention_bias=False)
    elif fam == "olmoe":
        cfg.update(intermediate_size=o.intermediate, num_experts=o.experts, norm_topk_prob=False,
                   attention_bias=False, clip_qkv=None, router_aux_loss_coef=0.01, **moe_common)
    elif fam in ("deepseek_v2", "deepseek_v3"):
        v3 = fam == "deepseek_v3"
        mla = _mla_dims(o)
        cfg.update(mla)
        cfg.update(
            num_key_value_heads=o.heads,        # MLA: every head has its own K/V (from the shared latent)
            head_dim=mla["qk_rope_head_dim"],    # what transformers' config sets (and saves) for MLA
            qk_head_dim=mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"],
            intermediate_size=o.dense_intermediate,
            moe_intermediate_size=o.intermediate,
            n_routed_experts=o.experts,
            n_shared_experts=1,
            first_k_dense_replace=first_dense_layers(o),
            moe_layer_freq=1,
            attention_bias=False,
            **moe_common,
        )
        if v3:
            n_group, topk_group = _v3_groups(o.experts, o.top_k)
            cfg.update(n_group=n_group, topk_group=topk_group, topk_method="noaux_tc", scoring_func="sigmoid",
                       norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
                       num_nextn_predict_layers=0)
        else:
            cfg.update(n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                       norm_topk_prob=False, routed_scaling_factor=1.0, mlp_bias=False)
    elif fam == "llama":
        cfg.update(intermediate_size=o.dense_intermediate, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif fam == "qwen2":
        cfg.update(intermediate_size=o.dense_intermediate, use_sliding_window=False, sliding_window=None,
                   max_window_layers=o.layers, layer_types=["full_attention"] * o.layers)
    return dict(sorted(cfg.items()))


# -- tensor plan ------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the checkpoint: its hub name, shape, initialiser and storage dtype."""

    name: str
    shape: tuple[int, ...]
    init: str  # normal | reader | writer | norm | bias | router | embed | correction_bias
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def tensor_plan(o: MakeModelOptions) -> list[TensorPlan]:
    """Every tensor of the checkpoint, in state-dict order."""
    dt = o.torch_dtype
    H, hd = o.hidden, o.head_dim
    out: list[TensorPlan] = []

    def add(name: str, shape: tuple[int, ...], init: str = "normal", dtype: torch.dtype = dt) -> None:
        out.append(TensorPlan(name, tuple(int(s) for s in shape), init, dtype))

    def mlp(prefix: str, inter: int, names=("gate_proj", "up_proj", "down_proj")) -> None:
        g, u, d = names
        add(f"{prefix}.{g}.weight", (inter, H), "reader")
        add(f"{prefix}.{u}.weight", (inter, H), "reader")
        add(f"{prefix}.{d}.weight", (H, inter), "writer")

    add("model.embed_tokens.weight", (o.vocab, H), "embed")
    n_dense = first_dense_layers(o)
    for layer in range(o.layers):
        p = f"model.layers.{layer}"
        add(f"{p}.input_layernorm.weight", (H,), "norm")
        a = f"{p}.self_attn"
        if o.family.startswith("deepseek"):
            m = _mla_dims(o)
            qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
            if m["q_lora_rank"]:
                add(f"{a}.q_a_proj.weight", (m["q_lora_rank"], H), "reader")
                add(f"{a}.q_a_layernorm.weight", (m["q_lora_rank"],), "norm")
                add(f"{a}.q_b_proj.weight", (o.heads * qk, m["q_lora_rank"]))
            else:
                add(f"{a}.q_proj.weight", (o.heads * qk, H), "reader")
            add(f"{a}.kv_a_proj_with_mqa.weight", (m["kv_lora_rank"] + m["qk_rope_head_dim"], H), "reader")
            add(f"{a}.kv_a_layernorm.weight", (m["kv_lora_rank"],), "norm")
            add(f"{a}.kv_b_proj.weight", (o.heads * (m["qk_nope_head_dim"] + m["v_head_dim"]), m["kv_lora_rank"]))
            add(f"{a}.o_proj.weight", (H, o.heads * m["v_head_dim"]), "writer")
        else:
            qkv_bias = o.family in ("qwen2", "qwen2_moe")
            for proj, n in (("q_proj", o.heads), ("k_proj", o.kv_heads), ("v_proj", o.kv_heads)):
                add(f"{a}.{proj}.weight", (n * hd, H), "reader")
                if qkv_bias:
                    add(f"{a}.{proj}.bias", (n * hd,), "bias")
            add(f"{a}.o_proj.weight", (H, o.heads * hd), "writer")
            if o.family == "qwen3_moe":
                add(f"{a}.q_norm.weight", (hd,), "norm")
                add(f"{a}.k_norm.weight", (hd,), "norm")
            elif o.family == "olmoe":
                add(f"{a}.q_norm.weight", (o.heads * hd,), "norm")
                add(f"{a}.k_norm.weight", (o.kv_heads * hd,), "norm")
        add(f"{p}.post_attention_layernorm.weight", (H,), "norm")

        if not o.is_moe or layer < n_dense:
            mlp(f"{p}.mlp", o.dense_intermediate)
        elif o.family == "mixtral":
            b = f"{p}.block_sparse_moe"
            add(f"{b}.gate.weight", (o.experts, H), "router")
            for e in range(o.experts):
                mlp(f"{b}.experts.{e}", o.intermediate, ("w1", "w3", "w2"))
        else:
            b = f"{p}.mlp"
            add(f"{b}.gate.weight", (o.experts, H), "router")
            if o.family == "deepseek_v3":
                add(f"{b}.gate.e_score_correction_bias", (o.experts,), "correction_bias", torch.float32)
            for e in range(o.experts):
                mlp(f"{b}.experts.{e}", o.intermediate)
            if o.family == "qwen2_moe":
                mlp(f"{b}.shared_expert", o.dense_intermediate)
                add(f"{b}.shared_expert_gate.weight", (1, H), "reader")
            elif o.family.startswith("deepseek"):
                mlp(f"{b}.shared_experts", o.intermediate * 1)
    add("model.norm.weight", (H,), "norm")
    add("lm_head.weight", (o.vocab, H))
    return out


# -- random values ----------------------------------------------------------------------

def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def routing_subspace_dims(o: MakeModelOptions) -> int:
    """Dimensions of the token-specific routing subspace ``S`` used when ``skew > 0``."""
    return max(1, min(o.experts, o.hidden // 4))


@functools.lru_cache(maxsize=8)
def _routing_basis(seed: int, hidden: int, k: int) -> torch.Tensor:
    """Orthonormal ``(hidden, 1 + k)``: column 0 is ``u``, columns 1.. span ``S``."""
    a = torch.randn(hidden, 1 + k, generator=_generator(seed, "skew/basis"), dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q.to(torch.float32)


def _basis(o: MakeModelOptions) -> torch.Tensor:
    return _routing_basis(int(o.seed), o.hidden, routing_subspace_dims(o))


def _router(t: TensorPlan, o: MakeModelOptions, g: torch.Generator) -> torch.Tensor:
    n_exp, hidden = t.shape
    if o.skew <= 0:
        w = torch.randn(t.shape, generator=g, dtype=torch.float32)
        # equal row norms (no expert favoured by chance); element std 1/sqrt(hidden): O(1) logits
        return w / w.norm(dim=1, keepdim=True)
    q = _basis(o)
    u, s_basis = q[:, 0], q[:, 1:]
    r = torch.randn(n_exp, s_basis.shape[1], generator=g, dtype=torch.float32)
    r /= r.norm(dim=1, keepdim=True)                       # unit directions in S
    c = INIT_STD * math.sqrt(hidden)                        # the embeddings' u-coordinate
    bias = -o.skew * torch.log1p(torch.arange(n_exp, dtype=torch.float32))
    w = (r @ s_basis.T) / INIT_STD + torch.outer(bias / c, u)
    return w * (INIT_STD * math.sqrt(2.0))                 # logits O(1) at the first layer


def fill_tensor(t: TensorPlan, o: MakeModelOptions, out: torch.Tensor) -> torch.Tensor:
    """Write the deterministic random values of planned tensor ``t`` into ``out`` (shape/dtype of ``t``)."""
    g = _generator(o.seed, t.name)
    if t.init == "router":
        return out.copy_(_router(t, o, g))
    if t.init == "correction_bias":
        return out.normal_(0.0, 0.01, generator=g)
    if t.init == "norm":
        return out.normal_(1.0, INIT_STD, generator=g)
    if o.skew > 0 and t.init in ("reader", "writer", "embed"):
        q = _basis(o)
        w = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=g)
        if t.init == "reader":      # (out, hidden): blind to u and S
            w -= (w @ q) @ q.T
        elif t.init == "writer":    # (hidden, in): never writes into u or S
            w -= q @ (q.T @ w)
        else:                       # embeddings: u-coordinate exactly c, S-part = token noise
            u = q[:, 0]
            w += torch.outer(INIT_STD * math.sqrt(o.hidden) - w @ u, u)
        return out.copy_(w)
    return out.normal_(0.0, INIT_STD, generator=g)


def init_tensor(t: TensorPlan, o: MakeModelOptions) -> torch.Tensor:
    """The deterministic random values of one planned tensor, as a new tensor."""
    return fill_tensor(t, o, torch.empty(t.shape, dtype=t.dtype))


# -- writing ----------------------------------------------------------------------------

_WEIGHT_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _shards(plan: list[TensorPlan], max_bytes: int | None) -> list[list[TensorPlan]]:
    if not max_bytes:
        return [plan]
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_safetensors(path: Path, tensors: list[TensorPlan], o: MakeModelOptions,
                       on_tensor: Callable[[int], None] | None = None) -> None:
    """Stream ``tensors`` into one ``.safetensors`` file.

    The header is known from the plan, so the file is written tensor by tensor: each
    tensor is generated into one of two reused buffers while a writer thread writes
    the other (``torch`` ops and file writes release the GIL), so memory stays at two
    tensors and generation overlaps I/O. The layout is the one
    ``safetensors.torch.save_file`` produces: ``u64`` header length, JSON header with
    ``__metadata__ = {"format": "pt"}`` padded with spaces to 8 bytes, then the data,
    wider dtypes first so every tensor is aligned to its element size.
    """
    items = sorted(tensors, key=lambda t: (-t.itemsize, t.name))  # the order save_file uses
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in items:
        header[t.name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    biggest = max((t.nbytes for t in items), default=0)
    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(torch.empty(biggest, dtype=torch.uint8))
    todo: queue.Queue = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)

        def writer() -> None:
            while (item := todo.get()) is not None:
                buf, n = item
                try:
                    if not errors:
                        f.write(memoryview(buf.numpy())[:n])
                except BaseException as e:  # noqa: BLE001 - reported by the main thread
                    errors.append(e)
                free.put(buf)

        thread = threading.Thread(target=writer, name="make-model-writer", daemon=True)
        thread.start()
        try:
            for t in items:
                buf = free.get()
                if errors:
                    break
                fill_tensor(t, o, buf[:t.nbytes].view(t.dtype).view(t.shape))
                todo.put((buf, t.nbytes))
                if on_tensor is not None:
                    on_tensor(t.nbytes)
        finally:
            todo.put(None)
            thread.join()
    if errors:
        raise errors[0]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_model(opts: MakeModelOptions, out_dir: str | Path, *,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a random checkpoint for ``opts`` into ``out_dir`` (created) and return its path.

    ``progress(bytes_written, total_bytes)`` is called after each tensor when given.
    Weight files of an earlier run in ``out_dir`` (``model*.safetensors``, the index) are
    removed first so a re-run with other sharding leaves no stale shards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file() and _WEIGHT_FILE_RE.match(f.name):
            f.unlink()

    config = build_config(opts)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "transformers_version": TRANSFORMERS_LAYOUT_VERSION,
    })
    save_tokenizer_files(build_tokenizer(opts.vocab), out, model_max_length=opts.max_position_embeddings)

    plan = tensor_plan(opts)
    total = sum(t.nbytes for t in plan)
    shards = _shards(plan, opts.max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    written = 0

    def on_tensor(nbytes: int) -> None:
        nonlocal written
        written += nbytes
        if progress is not None:
            progress(written, total)

    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if opts.max_shard_bytes is None else f"model-{i:05d}-of-{n:05d}.safetensors"
        _write_safetensors(out / fname, shard, opts, on_tensor)
        for t in shard:
            weight_map[t.name] = fname
    if opts.max_shard_bytes is not None:
        n_params = sum(math.prod(t.shape) for t in plan)
        _write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": total, "total_parameters": n_params},
            "weight_map": dict(sorted(weight_map.items())),
        })
    return out


# -- command line -----------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``make-model`` options (shared with ``moeyard make-model``)."""
    d = MakeModelOptions(family="mixtral")
    p.add_argument("--out", dest="out_dir", required=True, help="checkpoint directory to write")
    p.add_argument("--family", required=True, choices=SUPPORTED_FAMILIES)
    for name in ("layers", "hidden", "intermediate", "experts", "top_k", "heads", "kv_heads", "vocab",
                 "max_position_embeddings", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=d.dtype)
    p.add_argument("--skew", type=float, default=d.skew, help="Zipf exponent of the expert load (0 = uniform)")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="write sharded files of at most this size")


def options_from_args(args: argparse.Namespace) -> MakeModelOptions:
    fields = asdict(MakeModelOptions(family="mixtral")).keys()
    return MakeModelOptions(**{k: getattr(args, k) for k in fields})


def run(args: argparse.Namespace) -> int:
    """``moeyard make-model``: write the checkpoint the parsed options describe."""
    opts = options_from_args(args)
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\rwriting weights {done / 2**20:9.1f} / {total / 2**20:.1f} MiB", end="", file=sys.stderr)

    out = make_model(opts, args.out_dir, progress=progress)
    if tty:
        print(file=sys.stderr)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {opts.family} checkpoint to {os.fspath(out)} ({size / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moeyard make-model", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
