"""GGUF files: the reader against ``transformers``' own GGUF loading, greedy parity, bad files.

The GGUF here is written by the ``gguf`` package the way llama.cpp's converter writes a Llama: query
and key rows permuted for interleaved RoPE, the embeddings in Q8_0 blocks, the projections in Q4_1,
norms in F32, a byte-level BPE tokenizer and a chat template in the metadata.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.attention.tokenizer import ChatMessage, load_tokenizer
from moeyard.model.gguf_checkpoint import GGUFCheckpoint, GGUFError, convert_gguf
from moeyard.model.tokenizer_builder import build_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# odd sizes: 3 heads of 32 (hidden 96), one KV head, FFN 160 (Q4_1 and Q8_0 blocks are 32 wide)
DIMS = dict(hidden=96, heads=3, kv_heads=1, inter=160, layers=3, vocab=384)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: hub rows -> interleaved-RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, seed: int = 0, arch: str = "llama") -> dict[str, torch.Tensor]:
    """A small random Llama as GGUF; returns the hub-named fp32 tensors it encodes (before quantisation)."""
    d, h, kv, inter, n_layers, vocab = (DIMS[k] for k in ("hidden", "heads", "kv_heads", "inter", "layers", "vocab"))
    hd = d // h
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).numpy().astype(np.float32)

    tok = json.loads(build_tokenizer(vocab).to_str())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])]
    for added in tok.get("added_tokens", []):
        if added["id"] >= len(tokens):
            tokens.append(added["content"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(inter)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    hub: dict[str, np.ndarray] = {}

    def put(name: str, hub_name: str, arr: np.ndarray, qtype=None, n_perm: int | None = None):
        hub[hub_name] = arr
        stored = _permute(arr, n_perm) if n_perm else arr
        if qtype is None:
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    put("token_embd.weight", "model.embed_tokens.weight", rnd(len(tokens), d, scale=0.5), Q8)
    for i in range(n_layers):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", q + "input_layernorm.weight", 1 + rnd(d, scale=0.1))
        put(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", 1 + rnd(d, scale=0.1))
        put(p + "attn_q.weight", q + "self_attn.q_proj.weight", rnd(h * hd, d), Q4, n_perm=h)
        put(p + "attn_k.weight", q + "self_attn.k_proj.weight", rnd(kv * hd, d), Q4, n_perm=kv)
        put(p + "attn_v.weight", q + "self_attn.v_proj.weight", rnd(kv * hd, d), Q4)
        put(p + "attn_output.weight", q + "self_attn.o_proj.weight", rnd(d, h * hd), Q4)
        put(p + "ffn_gate.weight", q + "mlp.gate_proj.weight", rnd(inter, d), Q4)
        put(p + "ffn_up.weight", q + "mlp.up_proj.weight", rnd(inter, d), Q4)
        put(p + "ffn_down.weight", q + "mlp.down_proj.weight", rnd(d, inter), Q4)
    put("output_norm.weight", "model.norm.weight", 1 + rnd(d, scale=0.1))  # embeddings tied: no output.weight
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(v) for k, v in hub.items()}


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gguf")
    path = d / "tiny-llama.Q4_1.gguf"
    write_llama_gguf(path)
    return path, convert_gguf(path, d / "converted")


def test_dequantised_tensors_equal_transformers_gguf_loading(llama_gguf):
    import transformers
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, out = llama_gguf
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(out))
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(ref) and len(ours) == 2 + 9 * DIMS["layers"]
    for name, t in ours.items():
        want = ref[name] if isinstance(ref[name], torch.Tensor) else torch.from_numpy(np.asarray(ref[name]))
        assert t.dtype == torch.float32 and torch.equal(t, want.float()), name


def test_quantised_tensors_are_close_to_what_was_written(llama_gguf, tmp_path):
    path, _ = llama_gguf
    written = write_llama_gguf(tmp_path / "again.gguf")
    read = dict(GGUFCheckpoint(path).tensors())
    for name, w in written.items():
        err = float((read[name] - w).abs().max())
        assert err <= 0.15 * float(w.abs().max()), (name, err)  # Q4_1: 16 levels per 32-block
    assert torch.equal(read["model.layers.0.input_layernorm.weight"], written["model.layers.0.input_layernorm.weight"])


def test_config_and_tokenizer_come_from_the_metadata(llama_gguf):
    path, out = llama_gguf
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["tie_word_embeddings"]) == \
        ("llama", 96, 3, 1, 160, 3, True)
    tconfig = json.loads((out / "tokenizer_config.json").read_text())
    assert tconfig["add_bos_token"] is False and tconfig["chat_template"] == CHAT_TEMPLATE
    ours = load_tokenizer(out)
    built = build_tokenizer(DIMS["vocab"])
    text = "the expert router sends 12 tokens"
    assert ours.encode(text) == [i for i in built.encode(text, add_special_tokens=False).ids]


def test_greedy_tokens_equal_transformers_from_the_gguf(llama_gguf):
    import transformers

    path, out = llama_gguf
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    engine = LLMEngine(out, EngineConfig(dtype="float32"))
    prompts = [[5, 17, 99, 250, 3, 42], [7, 8, 9], [300, 301, 302, 303]]
    ours = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist()
        assert got == want


def test_chat_template_renders_as_transformers_does(llama_gguf):
    import transformers

    _, out = llama_gguf
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "What is the capital of France?")]
    want = ref.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs], tokenize=False,
                                   add_generation_prompt=True)
    assert load_tokenizer(out).apply_chat_template(msgs) == want


def test_generate_cli_serves_a_gguf_with_chat(llama_gguf, tmp_path):
    path, _ = llama_gguf
    exe = Path(sys.executable).with_name("moeyard")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(exe), "generate", "--model", str(path), "--chat", "--prompt", "hello there",
                        "--max-new-tokens", "5", "--ignore-eos", "--json"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 5 and out["usage"]["prompt_tokens"] > 5  # the template's tokens too
    assert list((tmp_path / ".moeyard" / "gguf").iterdir())  # converted once, cached


# -- bad files --------------------------------------------------------------------------------------

def test_an_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "moe.gguf"
    write_llama_gguf(path, arch="qwen3moe")
    with pytest.raises(GGUFError, match="GGUF architecture 'qwen3moe' is not supported"):
        GGUFCheckpoint(path)


def test_a_truncated_file_is_refused_and_nothing_is_left_behind(llama_gguf, tmp_path):
    path, _ = llama_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="cut.gguf"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_not_a_gguf_and_an_existing_output_are_refused(llama_gguf, tmp_path):
    path, out = llama_gguf
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        GGUFCheckpoint(junk)
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(path, out)


def test_an_unsupported_block_type_is_named(tmp_path):
    """A tensor in Q8_1 blocks (which the gguf package cannot dequantise): a clear error naming the tensor and
    the type, and nothing written."""
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 32),
                       (w.add_feed_forward_length, 64), (w.add_head_count, 2), (w.add_head_count_kv, 1)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.add_token_merges([])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((3, 32 // block * size), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="tensor token_embd.weight has block type .*Q8_1.*cannot be dequantised"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
