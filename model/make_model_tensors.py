"""The tensors of a generated checkpoint: names and shapes per family, and their random values
(seeded per tensor, so that a tensor does not depend on which others are written)."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from moeyard.model.make_model_config import first_dense_layers, mla_dims
from moeyard.model.make_model_options import INIT_STD, MakeModelOptions


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
            m = mla_dims(o)
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


