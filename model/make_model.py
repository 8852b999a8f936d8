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
  (a byte-level BPE trained locally, :mod:`moeyard.model.tokenizer_builder`).

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
import json
import math
import os
import queue
import re
import struct
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from moeyard.model.make_model_config import build_config
from moeyard.model.make_model_options import DTYPES, TRANSFORMERS_LAYOUT_VERSION, MakeModelOptions
from moeyard.model.make_model_tensors import TensorPlan, fill_tensor, tensor_plan
from moeyard.model.spec import SUPPORTED_FAMILIES
from moeyard.model.tokenizer_builder import BOS_ID, EOS_ID, build_tokenizer, save_tokenizer_files

__all__ = ["make_model", "main"]

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
        header[t.name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
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
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype)
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
