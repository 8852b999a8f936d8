"""Sparse upcycling: a dense Llama or Qwen2 checkpoint turned into an MoE checkpoint of a family we serve.

``copy`` mode (Komatsuzaki et al.'s sparse upcycling): every expert of a layer is a copy of the layer's
dense FFN and the routing weights of a token sum to one (top-k renormalised softmax), so the MoE
computes exactly the dense function whatever the router picks: ``sum_k w_k * FFN(x) = FFN(x)``. The
router decides only which copies do the work, which is what the load statistics, placement and
autoscaler see. Routers: ``random`` (seeded normal), or ``kmeans``: each layer's router rows are the
k-means centroids of the calibration text's FFN inputs at that layer (captured by the caller through the
in-process engine: ``moeyard.attention.ffn_capture``), so that tokens cluster onto
experts the way real text clusters (skewed load), unlike a random router.

Families: Llama -> ``mixtral`` (the same attention, a softmax top-k renormalised router);
Qwen2 -> ``qwen2_moe`` with ``norm_topk_prob`` and no shared expert (its q/k/v biases kept).
The output is written aside and renamed into place: a failure leaves nothing in ``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.weight_names import dense_mlp_names, expert_names, layer_prefix, router_weight_name

TARGET_FAMILY = {"llama": "mixtral", "qwen2": "qwen2_moe"}
MAX_EXPERTS = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class UpcycleError(ValueError):
    """An upcycle that cannot be done; the message names the problem."""


@dataclass(frozen=True)
class UpcycleOptions:
    experts: int
    top_k: int
    mode: str = "copy"
    router: str = "random"
    seed: int = 0
    dtype: str | None = None
    """``float32`` or ``bfloat16`` for the output (default: the dense checkpoint's ``torch_dtype``)."""

    def check(self) -> None:
        if self.mode not in ("copy", "split"):
            raise UpcycleError(f"--mode {self.mode!r} is not supported (supported: copy, split)")
        if self.router not in ("random", "kmeans"):
            raise UpcycleError(f"--router {self.router!r} is not supported (supported: random, kmeans)")
        if not 1 <= self.experts <= MAX_EXPERTS:
            raise UpcycleError(f"--experts must be in [1, {MAX_EXPERTS}], got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise UpcycleError(f"--top-k must be in [1, --experts = {self.experts}], got {self.top_k}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise UpcycleError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


def target_family(dense: dict, opts: UpcycleOptions) -> str:
    """``copy``: Mixtral for Llama, Qwen2-MoE for Qwen2. ``split``: Qwen2-MoE for both (softmax weights
    without renormalisation: with a zero router every expert weighs exactly 1/E; a Llama gets zero q/k/v
    biases, which Qwen2-MoE's attention adds)."""
    return "qwen2_moe" if opts.mode == "split" else TARGET_FAMILY[dense["model_type"]]


def moe_config(dense: dict, opts: UpcycleOptions) -> dict:
    """The MoE ``config.json`` for a dense ``config.json``: the same attention and sizes, an explicit
    (untied) LM head; ``copy``: E experts of the dense FFN's width, top-k renormalised softmax routing;
    ``split``: E experts of 1/E of its width, softmax weights kept as they are."""
    family = target_family(dense, opts)
    cfg = {k: v for k, v in dense.items() if k not in ("architectures", "model_type", "auto_map")}
    cfg["tie_word_embeddings"] = False
    if opts.dtype:
        cfg["torch_dtype"] = opts.dtype
    if family == "mixtral":
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=opts.experts,
                   num_experts_per_tok=opts.top_k, router_jitter_noise=0.0, output_router_logits=False,
                   router_aux_loss_coef=0.0, sliding_window=None)
        for key in ("mlp_bias", "attention_bias", "pretraining_tp"):
            cfg.pop(key, None)
    else:
        split = opts.mode == "split"
        cfg.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=opts.experts,
                   num_experts_per_tok=opts.top_k,
                   moe_intermediate_size=dense["intermediate_size"] // opts.experts if split
                   else dense["intermediate_size"],
                   shared_expert_intermediate_size=0, norm_topk_prob=not split, decoder_sparse_step=1,
                   mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.0,
                   qkv_bias=True, use_sliding_window=False)
        if split and dense["model_type"] == "llama":
            for key in ("mlp_bias", "attention_bias", "pretraining_tp"):
                cfg.pop(key, None)
    return cfg


def kmeans_rows(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """``k`` unit-norm centroids ``[k, D]`` of the rows of ``x [N, D]`` (spherical k-means, k-means++ start).

    Rows are normalised first, so a token's router logit ``x . c`` ranks the centroids by direction."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = torch.nn.functional.normalize(x.float(), dim=1)
    n = xs.shape[0]
    if n < k:
        raise UpcycleError(f"the calibration text gave {n} tokens, fewer than --experts = {k}")
    first = int(torch.randint(0, n, (1,), generator=g))
    centers = [xs[first]]
    for _ in range(1, k):
        sim = torch.stack(centers) @ xs.T
        dist = (1 - sim.max(dim=0).values).clamp_min(0) + 1e-12
        centers.append(xs[int(torch.multinomial(dist, 1, generator=g))])
    c = torch.stack(centers)
    for _ in range(iters):
        assign = (xs @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, xs)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        c = torch.where(empty[:, None], c, torch.nn.functional.normalize(sums, dim=1))
    return c


def _routers(num_layers: int, hidden: int, opts: UpcycleOptions,
             calib_inputs: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    if opts.router == "random":
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        return [torch.randn(opts.experts, hidden, generator=g) * 0.02 for _ in range(num_layers)]
    inputs = calib_inputs()
    if len(inputs) != num_layers:
        raise UpcycleError(f"the calibration run gave FFN inputs of {len(inputs)} layers, not {num_layers}")
    scale = 4.0  # router logits of a few units: top-k picks by direction, softmax weights stay soft
    return [kmeans_rows(x, opts.experts, opts.seed + layer) * scale for layer, x in enumerate(inputs)]


def split_neurons(acts: torch.Tensor, experts: int, seed: int) -> list[list[int]]:
    """Partition the ``I`` neurons of ``acts [N, I]`` (a layer's FFN activations on the calibration text)
    into ``experts`` groups of ``I / experts``, grouping neurons that fire together: spherical k-means on
    each neuron's activation magnitudes over the tokens, then a balanced assignment (the most similar
    (neuron, centroid) pairs first, each group filled to its size)."""
    n_neurons = acts.shape[1]
    size = n_neurons // experts
    profiles = acts.abs().T.float()  # [I, N]
    centroids = kmeans_rows(profiles, experts, seed)
    sim = torch.nn.functional.normalize(profiles, dim=1) @ centroids.T  # [I, E]
    order = torch.argsort(sim.reshape(-1), descending=True).tolist()
    groups: list[list[int]] = [[] for _ in range(experts)]
    placed = [False] * n_neurons
    for flat in order:
        i, e = divmod(flat, experts)
        if not placed[i] and len(groups[e]) < size:
            groups[e].append(i)
            placed[i] = True
    return [sorted(g) for g in groups]


def fitted_router(x: torch.Tensor, acts: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """``[E, D]`` router rows whose logits ``x . w_e`` predict how much expert ``e`` matters to a token (the
    norm of its neurons' activations), fitted by least squares on the calibration inputs ``x [N, D]``, then
    scaled so that the logits stay within 0.1: top-k picks by the prediction, and the softmax weights stay
    within about 10% of 1/E (the experts, scaled by E, then weigh about one each, as in the dense FFN)."""
    target = torch.stack([acts[:, g].norm(dim=1) for g in groups], dim=1).double()  # [N, E]
    target = target - target.mean(dim=0)
    w = torch.linalg.lstsq(x.double(), target).solution.T  # [E, D]
    peak = float((x.double() @ w.T).abs().max())
    return (w * (0.1 / peak if peak > 0 else 0.0)).float()


def upcycle(dense_dir: str | Path, out_dir: str | Path, opts: UpcycleOptions,
            calib_inputs: Callable[[], list[torch.Tensor]] | None = None, progress: bool = False) -> Path:
    """Write the upcycled MoE of the dense checkpoint ``dense_dir`` into ``out_dir``; returns ``out_dir``.

    ``calib_inputs`` gives, per decoder layer, the dense model's FFN inputs ``[N, D]`` on the calibration
    text (``moeyard.attention.ffn_capture.ffn_inputs``; needed for ``--router kmeans``)."""
    opts.check()
    dense_dir, out = Path(dense_dir), Path(out_dir)
    cfg_path = dense_dir / "config.json"
    if not cfg_path.is_file():
        raise UpcycleError(f"{dense_dir} is not a checkpoint directory (no config.json)")
    dense = json.loads(cfg_path.read_text())
    if dense.get("model_type") not in TARGET_FAMILY:
        raise UpcycleError(f"{dense_dir}: model_type {dense.get('model_type')!r} cannot be upcycled "
                           f"(supported dense families: {', '.join(TARGET_FAMILY)})")
    if out.exists():
        raise UpcycleError(f"{out} already exists")
    if (opts.router == "kmeans" or opts.mode == "split") and calib_inputs is None:
        raise UpcycleError(f"--{'mode split' if opts.mode == 'split' else 'router kmeans'} needs calibration text")
    inter = int(dense["intermediate_size"])
    if opts.mode == "split" and inter % opts.experts:
        raise UpcycleError(f"--mode split: --experts {opts.experts} does not divide the FFN width {inter}")
    family = target_family(dense, opts)
    cfg = moe_config(dense, opts)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.get("torch_dtype") or "float32"]
    num_layers, hidden = int(dense["num_hidden_layers"]), int(dense["hidden_size"])
    if opts.mode == "split":
        inputs = calib_inputs()
        if len(inputs) != num_layers:
            raise UpcycleError(f"the calibration run gave FFN inputs of {len(inputs)} layers, not {num_layers}")
        routers = None
    else:
        routers = _routers(num_layers, hidden, opts, calib_inputs or (lambda: []))
    reader = CheckpointReader(dense_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        mlp_names = {n for layer in range(num_layers) for n in vars(dense_mlp_names(layer)).values()}
        for name in reader.names():
            if name in mlp_names or name.endswith("rotary_emb.inv_freq"):
                continue
            tensors[name] = reader.get(name, dtype=dtype).contiguous()
        if "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        for layer in tqdm(range(num_layers), desc="upcycling", unit="layer", file=sys.stderr, disable=not progress):
            dn = dense_mlp_names(layer)
            gate, up, down = (reader.get(n, dtype=dtype).contiguous() for n in (dn.gate, dn.up, dn.down))
            if opts.mode == "split":
                x = inputs[layer].float()
                acts = torch.nn.functional.silu(x @ gate.float().T) * (x @ up.float().T)
                groups = split_neurons(acts, opts.experts, opts.seed + layer)
                router = (torch.zeros(opts.experts, hidden) if opts.top_k == opts.experts
                          else fitted_router(x, acts, groups))
                for e, idx in enumerate(groups):  # down x E: a softmax weight of 1/E gives the dense sum
                    en = expert_names(family, layer, e)
                    tensors[en.gate], tensors[en.up] = gate[idx].contiguous(), up[idx].contiguous()
                    tensors[en.down] = (down[:, idx] * opts.experts).contiguous()
            else:
                router = routers[layer]
                for e in range(opts.experts):
                    en = expert_names(family, layer, e)
                    tensors[en.gate], tensors[en.up], tensors[en.down] = gate.clone(), up.clone(), down.clone()
            tensors[router_weight_name(family, layer)] = router.to(dtype).contiguous()
            if family == "qwen2_moe" and dense["model_type"] == "llama":  # Qwen2-MoE's attention adds biases
                p = f"{layer_prefix(layer)}.self_attn"
                heads, kv = int(dense["num_attention_heads"]), int(dense.get("num_key_value_heads", 0) or 0)
                kv = kv or heads
                hd = int(dense.get("head_dim") or hidden // heads)
                tensors[f"{p}.q_proj.bias"] = torch.zeros(heads * hd, dtype=dtype)
                tensors[f"{p}.k_proj.bias"] = torch.zeros(kv * hd, dtype=dtype)
                tensors[f"{p}.v_proj.bias"] = torch.zeros(kv * hd, dtype=dtype)
            if family == "qwen2_moe":  # no shared expert: a zero-width one, its gate at zero
                p = f"{layer_prefix(layer)}.mlp"
                tensors[f"{p}.shared_expert.gate_proj.weight"] = torch.zeros(0, hidden, dtype=dtype)
                tensors[f"{p}.shared_expert.up_proj.weight"] = torch.zeros(0, hidden, dtype=dtype)
                tensors[f"{p}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 0, dtype=dtype)
                tensors[f"{p}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
        _save_sharded(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            if (dense_dir / fname).is_file():
                shutil.copy2(dense_dir / fname, tmp / fname)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int = 2 << 30) -> None:
    """safetensors in hub layout: one file, or ``model-0000k-of-0000n`` shards plus the index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
