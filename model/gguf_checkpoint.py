"""Dense Llama-family GGUF files (llama.cpp's format) as hub-layout checkpoints.

:class:`GGUFCheckpoint` reads one file with the ``gguf`` package: its metadata becomes a
``config.json`` for ``model_type: llama``; its tensors are dequantised (any block type the ``gguf``
package decodes: Q4_0/Q4_1/Q5_x/Q8_0, K-quants, F16/BF16/F32) and renamed to the hub's names, with the
query and key rows put back in the order ``transformers`` uses (llama.cpp's converter permutes them
for its interleaved RoPE); its tokenizer (``tokenizer.ggml.*``: a GPT-2 style byte-level BPE) and
chat template become ``tokenizer.json`` and ``tokenizer_config.json``. :func:`convert_gguf` writes all
of it into a folder the engine serves like any checkpoint (written aside, then renamed into place:
never half-written).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> hub name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


class GGUFError(ValueError):
    """A GGUF file this reader cannot serve; the message names the file and the problem."""


@dataclass(frozen=True)
class GGUFTokenizer:
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's query/key row permutation: ``[H * hd, D]`` rows back to the hub's order."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFCheckpoint:
    """One GGUF file: ``config()``, ``tensors()`` (hub names, fp32), ``tokenizer()``."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such GGUF file")
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # truncated or not a GGUF at all: the package raises several kinds
            raise GGUFError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.architecture = self._get("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    # -- metadata ---------------------------------------------------------------------------------
    def _get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _arch(self, key: str, default=None):
        return self._get(f"{self.architecture}.{key}", default)

    def _need(self, key: str):
        value = self._arch(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata {self.architecture}.{key} is missing")
        return value

    def config(self) -> dict:
        """The ``config.json`` of the model (``model_type: llama``, fp32 weights)."""
        hidden, heads = int(self._need("embedding_length")), int(self._need("attention.head_count"))
        kv_heads = int(self._arch("attention.head_count_kv", heads))
        names = {t.name for t in self.reader.tensors}
        vocab = self._arch("vocab_size")
        if vocab is None:
            vocab = len(self._get("tokenizer.ggml.tokens") or [])
        tok = self.tokenizer()
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": int(self._need("feed_forward_length")),
            "num_hidden_layers": int(self._need("block_count")), "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": int(self._arch("rope.dimension_count", hidden // heads)),
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch("context_length", 2048)), "vocab_size": int(vocab),
            "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        }
        if tok.bos_token_id is not None:
            cfg["bos_token_id"] = tok.bos_token_id
        if tok.eos_token_id is not None:
            cfg["eos_token_id"] = tok.eos_token_id
        return cfg

    def tokenizer(self) -> GGUFTokenizer:
        model = self._get("tokenizer.ggml.model")
        if model != "gpt2":
            raise GGUFError(f"{self.path}: tokenizer model {model!r} is not supported (supported: gpt2, "
                            "a byte-level BPE)")

        def opt_int(key):
            v = self._get(key)
            return None if v is None else int(v)

        return GGUFTokenizer(
            tokens=list(self._get("tokenizer.ggml.tokens") or []),
            merges=list(self._get("tokenizer.ggml.merges") or []),
            token_types=[int(t) for t in (self._get("tokenizer.ggml.token_type") or [])],
            pre=self._get("tokenizer.ggml.pre"), bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(self._get("tokenizer.ggml.add_bos_token", True)),
            chat_template=self._get("tokenizer.chat_template"))

    # -- tensors ------------------------------------------------------------------------------------
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor under its hub name, dequantised to fp32."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        cfg = self.config()
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for t in self.reader.tensors:
            name = self._hub_name(t.name)
            try:
                qtype = GGMLQuantizationType(t.tensor_type)
                w = np.asarray(dequantize(t.data, qtype), dtype=np.float32)
            except (NotImplementedError, ValueError, KeyError) as e:
                raise GGUFError(f"{self.path}: tensor {t.name} has block type {t.tensor_type!r}, which cannot be "
                                f"dequantised ({e})") from None
            w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # ggml lists dims innermost first
            if t.name.endswith("attn_q.weight"):
                w = _reverse_permute(w, heads)
            elif t.name.endswith("attn_k.weight"):
                w = _reverse_permute(w, kv_heads)
            yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))

    def _hub_name(self, name: str) -> str:
        if name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
        if name.startswith("rope_freqs"):
            raise GGUFError(f"{self.path}: tensor {name} (rope frequency factors) is not supported")
        raise GGUFError(f"{self.path}: unknown tensor {name!r} for architecture {self.architecture!r}")

    # -- tokenizer files ----------------------------------------------------------------------------
    def tokenizer_files(self) -> tuple[dict, dict]:
        """``(tokenizer.json, tokenizer_config.json)`` contents: a byte-level BPE over the file's vocabulary
        and merges, its control tokens special, SmolLM-style digits split one by one."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tok = self.tokenizer()
        vocab = {t: i for i, t in enumerate(tok.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in tok.merges]
        bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if tok.pre in ("smollm", "smaug-bpe") or tok.pre is None:
            bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            bpe.pre_tokenizer = byte_level
        bpe.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tok.tokens, tok.token_types)
                   if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
        if special:
            bpe.add_special_tokens(special)
        tconfig = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos_token,
                   "add_eos_token": False, "clean_up_tokenization_spaces": False,
                   "model_max_length": self.config()["max_position_embeddings"]}
        if tok.bos_token_id is not None:
            tconfig["bos_token"] = tok.tokens[tok.bos_token_id]
        if tok.eos_token_id is not None:
            tconfig["eos_token"] = tok.tokens[tok.eos_token_id]
        if tok.chat_template:
            tconfig["chat_template"] = tok.chat_template
        return json.loads(bpe.to_str()), tconfig


def convert_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Write ``path`` as a hub-layout checkpoint into ``out_dir`` (fp32 safetensors, ``config.json``,
    tokenizer files). Built in a sibling temporary folder and renamed into place: a failure leaves
    nothing behind. Returns ``out_dir``."""
    from safetensors.torch import save_file

    ckpt = GGUFCheckpoint(path)
    out = Path(out_dir)
    if out.exists():
        raise GGUFError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tensors = dict(ckpt.tensors())
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(ckpt.config(), indent=2) + "\n")
        tokenizer, tconfig = ckpt.tokenizer_files()
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tconfig, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_checkpoint(path: str | Path, cache_root: str | Path) -> Path:
    """The converted checkpoint of GGUF ``path`` under ``cache_root`` (converted on first use; keyed by the
    file's name, size and modification time)."""
    p = Path(path)
    st = p.stat()
    out = Path(cache_root) / f"{p.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    try:
        return convert_gguf(p, out)
    except GGUFError:
        if (out / "config.json").is_file():  # another process converted it meanwhile
            return out
        raise
