"""Parameter economics of a checkpoint: total, active and dense-equivalent parameters.

Everything is computed from the safetensors headers (names, shapes, dtypes) and
``config.json``; no tensor data is read.

* ``total_params``: the numel of every tensor the checkpoint stores. Persistent
  buffers that a checkpoint ships (DeepSeek-V3's ``e_score_correction_bias``)
  count too. With ``tie_word_embeddings`` the output head *is* the embedding, so a
  redundant ``lm_head.weight`` stored next to ``model.embed_tokens.weight`` is
  counted once (what ``transformers`` counts after tying).
* ``routed_expert_params``: the routed experts only (not shared experts, not routers).
* ``active_params``: what one token uses: everything but the routed experts, plus
  ``top_k / E_l`` of the routed-expert parameters of each MoE layer ``l``, where
  ``E_l`` is the number of experts that layer stores (per-expert tensors
  ``...experts.{e}...``, or fused 3-D tensors whose first dimension is the expert).
* ``dense_equivalent_params``: :func:`dense_equivalent`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.spec import load_spec
from moeyard.model.weight_names import is_expert_tensor

__all__ = ["DTYPE_BYTES", "dense_equivalent", "economics", "is_routed_expert_tensor"]

DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
"""Element size in bytes of the safetensors header dtypes."""

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_INDEX_RE = re.compile(r"\.experts\.(\d+)\.")
_TIED_HEAD = "lm_head.weight"
_EMBEDDING = "model.embed_tokens.weight"


def dense_equivalent(total: float, num_experts: int, top_k: int) -> float:
    """Dense-equivalent parameter count of an MoE model (Epoch AI's heuristic).

    ``total / (E ** 0.44 / A ** 0.63)`` with ``E = num_experts`` routed experts per MoE
    layer and ``A = top_k`` experts active per token. A dense model
    (``num_experts == 0``, ``top_k == 0``) is its own dense equivalent: ``total``.

    Raises ``ValueError`` for negative or non-finite values, for ``top_k > num_experts``
    and, when ``num_experts > 0``, for non-positive ``total`` or ``top_k``.
    """
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"total must be a finite number >= 0, got {total}")
    if num_experts < 0 or top_k < 0:
        raise ValueError(f"num_experts and top_k must be >= 0, got num_experts={num_experts} top_k={top_k}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must not exceed num_experts ({num_experts})")
    if num_experts == 0:
        return float(total)
    if total <= 0 or top_k <= 0:
        raise ValueError(f"an MoE model needs total > 0 and top_k > 0, got total={total} top_k={top_k}")
    return float(total) / (num_experts ** 0.44 / top_k ** 0.63)


def is_routed_expert_tensor(name: str) -> bool:
    """True for routed-expert weights only.

    :func:`moeyard.model.weight_names.is_expert_tensor` matches ``.experts.``, which the shared
    experts (``mlp.shared_expert.*`` of Qwen2-MoE, ``mlp.shared_experts.*`` of DeepSeek)
    never contain: the ``_`` before ``experts`` keeps them out.
    """
    return is_expert_tensor(name)


def _dtype_of(reader: CheckpointReader, name: str) -> str:
    # CheckpointReader exposes shapes only; the dtype comes from the same (header-only) slice.
    return reader._handle(reader._files[name]).get_slice(name).get_dtype()


@dataclass
class Economics:
    """Parameter counts of the checkpoint (from its tensor shapes) and the dense-equivalent estimate."""

    family: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    """Experts per token served (a deployment's ``moe_top_k``, else the checkpoint's)."""
    total_params: int
    active_params: int
    """Parameters one token uses: everything but the routed experts, plus ``top_k`` routed experts per MoE layer."""
    routed_expert_params: int
    dense_equivalent_params: float
    """Epoch AI's heuristic: ``total / (E ** 0.44 / A ** 0.63)``."""
    bytes_per_param: int
    checkpoint_top_k: int = 0
    """The checkpoint's own experts per token (``top_k`` differs when the deployment overrides it)."""



def economics(model_dir: str | Path, top_k: int | None = None) -> Economics:
    """Parameter counts of the checkpoint in ``model_dir`` (headers and config only); ``top_k``: experts per
    token served, when a deployment overrides the checkpoint's (active and dense-equivalent counts follow)."""
    spec = load_spec(model_dir)
    reader = CheckpointReader(model_dir)
    names = reader.names()
    if spec.tie_word_embeddings and _TIED_HEAD in names and _EMBEDDING in names:
        names = [n for n in names if n != _TIED_HEAD]

    total = 0
    routed = 0
    numel_by_dtype: dict[str, int] = defaultdict(int)
    routed_by_layer: dict[int, int] = defaultdict(int)
    experts_by_layer: dict[int, set[int]] = defaultdict(set)
    fused_experts_by_layer: dict[int, int] = {}
    for name in names:
        shape = reader.shape(name)
        n = math.prod(shape)
        total += n
        numel_by_dtype[_dtype_of(reader, name)] += n
        if not is_routed_expert_tensor(name):
            continue
        routed += n
        m = _LAYER_RE.search(name)
        layer = int(m.group(1)) if m else -1
        routed_by_layer[layer] += n
        e = _EXPERT_INDEX_RE.search(name)
        if e:
            experts_by_layer[layer].add(int(e.group(1)))
        else:  # fused ``experts.gate_up_proj`` / ``experts.down_proj``: [E, ...]
            if not shape:
                raise ValueError(f"routed-expert tensor {name!r} is a scalar; cannot tell its experts apart")
            fused_experts_by_layer[layer] = max(fused_experts_by_layer.get(layer, 0), shape[0])

    if spec.moe is None:
        if routed:
            raise ValueError(f"{model_dir}: config describes a dense model but the checkpoint stores "
                             f"{routed} routed-expert parameters")
        num_experts = top_k = 0
        active = total
    else:
        num_experts = spec.moe.num_experts
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in [1, {num_experts}] (the model's experts)")
        top_k = top_k or spec.moe.top_k
        used = Fraction(0)
        for layer, n in routed_by_layer.items():
            stored = max(len(experts_by_layer.get(layer, ())), fused_experts_by_layer.get(layer, 0))
            used += Fraction(n * min(top_k, stored), stored)
        active = total - routed + round(used)

    bytes_per_param = 0
    if numel_by_dtype:
        dominant = max(numel_by_dtype, key=numel_by_dtype.get)
        if dominant not in DTYPE_BYTES:
            raise ValueError(f"{model_dir}: unknown safetensors dtype {dominant!r}")
        bytes_per_param = DTYPE_BYTES[dominant]
    return Economics(
        family=spec.family,
        num_layers=spec.num_layers,
        num_moe_layers=spec.num_moe_layers,
        num_experts=num_experts,
        top_k=top_k,
        total_params=total,
        active_params=active,
        routed_expert_params=routed,
        dense_equivalent_params=dense_equivalent(total, num_experts, top_k),
        bytes_per_param=bytes_per_param,
        checkpoint_top_k=spec.moe.top_k if spec.moe else 0,
    )
