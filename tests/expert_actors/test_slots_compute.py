"""ExpertSlots on a real checkpoint against per-token reference loops: each slot computes its expert."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moeyard.expert_actors.slots import ExpertSlots
from moeyard.model.amx import AmxLinear
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.cpu_matmul import PackedLinear, amx_supported, packed_supported
from moeyard.model.spec import load_spec
from tests.model.test_ffn import _ffn_ref_token


def _expert_from_file(ckpt, layer: int, expert: int):
    """(gate, up, down) of a Mixtral expert, read with safetensors directly."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        return f.get_tensor(f"{p}.w1.weight"), f.get_tensor(f"{p}.w3.weight"), f.get_tensor(f"{p}.w2.weight")


@pytest.fixture
def mixtral_slots(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    slots = ExpertSlots(spec, torch.float32)
    # global slot ids need not start at 0 on a shard; expert 5 has two copies
    slots.load(CheckpointReader(ckpt), 1, [(9, 5), (10, 2), (11, 7), (12, 5)])
    return ckpt, spec, slots


def test_expert_slots_compute_uses_each_slots_expert(mixtral_slots):
    ckpt, spec, slots = mixtral_slots
    layer = spec.moe_layers[1]
    slot_ids, counts = [9, 11, 12], [2, 3, 1]
    x = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(8))
    out = slots.compute(1, slot_ids, counts, x, [5, 7, 5])
    experts = [5, 5, 7, 7, 7, 5]
    ref = torch.stack([_ffn_ref_token(x[t], *_expert_from_file(ckpt, layer, e)) for t, e in enumerate(experts)])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # both copies of expert 5 compute the same thing
    a = slots.compute(1, [9], [1], x[:1], [5])
    b = slots.compute(1, [12], [1], x[:1], [5])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_expert_slots_bf16_casts_input(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    slots = ExpertSlots(spec, torch.bfloat16)
    slots.load(CheckpointReader(ckpt), 0, [(0, 3)])
    x = torch.randn(3, spec.hidden_size, generator=torch.Generator().manual_seed(9))
    out = slots.compute(0, [0], [3], x, [3])
    assert out.dtype == torch.bfloat16
    g, u, d = (t.bfloat16().float() for t in _expert_from_file(ckpt, spec.moe_layers[0], 3))
    ref = torch.stack([_ffn_ref_token(x[t].bfloat16().float(), g, u, d) for t in range(3)])
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_unknown_slot_is_a_key_error_naming_it(mixtral_slots):
    _, spec, slots = mixtral_slots
    x = torch.zeros(2, spec.hidden_size)
    with pytest.raises(KeyError) as ei:
        slots.compute(1, [9, 77], [1, 1], x, [5, 5])
    assert "77" in str(ei.value)
    with pytest.raises(KeyError, match="MoE layer 0"):
        slots.compute(0, [9], [2], x, [5])  # nothing loaded for that layer


def test_unload_removes_slot(mixtral_slots):
    _, spec, slots = mixtral_slots
    x = torch.randn(1, spec.hidden_size)
    slots.compute(1, [10], [1], x, [2])  # builds the stacked weights
    slots.unload(1, [10])
    assert 10 not in slots.slots(1)
    with pytest.raises(KeyError, match="10"):
        slots.compute(1, [10], [1], x, [2])
    assert slots.compute(1, [11], [1], x, [7]).shape == (1, spec.hidden_size)


def test_expert_slots_refuse_bad_expert_and_dense_model(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    with pytest.raises(ValueError, match="out of range"):
        ExpertSlots(spec, torch.float32).load(CheckpointReader(ckpt), 0, [(0, 8)])
    dense_ckpt, _ = hf_models("llama")
    with pytest.raises(ValueError, match="no MoE layers"):
        ExpertSlots(load_spec(dense_ckpt), torch.float32)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_gemm_shard_equals_the_loop_shard(hf_models, dtype, rtol):
    """The same slots, staged copies and empty segments through one grouped GEMM per projection and
    through the per-row loop."""
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    reader = CheckpointReader(ckpt)
    shards = {mode: ExpertSlots(spec, dtype, gemm=mode) for mode in ("grouped", "loop")}
    for s in shards.values():
        s.load(reader, 1, [(9, 5), (10, 2), (11, 7), (12, 5)])
        s.load(reader, 1, [(10, 6)], stage=True)  # a staged copy next to expert 2
    assert shards["grouped"].uses_grouped_gemm() and not shards["loop"].uses_grouped_gemm()
    x = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
    batch = ([9, 10, 10, 11, 12], [2, 3, 0, 1, 3], [5, 6, 2, 7, 5])
    got, want = (shards[m].compute(1, batch[0], batch[1], x, batch[2]) for m in ("grouped", "loop"))
    assert float((got.float() - want.float()).abs().max()) <= rtol * float(want.float().abs().max())


def test_auto_gemm_on_the_cpu_is_the_loop(hf_models):
    ckpt, _ = hf_models("mixtral")
    assert not ExpertSlots(load_spec(ckpt), torch.bfloat16).uses_grouped_gemm()


KERNELS = ("packed", "amx")
"""The CPU kernels that keep each expert copy apart (each proven where this CPU runs it, refused elsewhere)."""


def _kernel_mixtral(hf_models, matmul: str):
    """``(spec, reader)`` of the tiny Mixtral where this CPU runs ``matmul`` on bf16 (``packed``: AVX-512 and
    up; ``amx``: AMX-BF16); elsewhere asserts that a shard forced to it is refused by name and returns None."""
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    why = packed_supported(torch.bfloat16) if matmul == "packed" else amx_supported(torch.bfloat16)
    if why is not None:
        with pytest.raises(ValueError, match=f"matmul '{matmul}' cannot run here"):
            ExpertSlots(spec, torch.bfloat16, matmul=matmul)
        return None
    return spec, CheckpointReader(ckpt)


def _same(got: torch.Tensor, want: torch.Tensor, matmul: str) -> None:
    """packed: bit-identical to the stack (the same oneDNN sums); amx: its own fp32 sums, within bf16's
    tolerance (tests/model/test_amx.py bounds a single product by one rounding)."""
    if matmul == "packed":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("matmul", KERNELS)
def test_kernel_copies_equal_the_stack_through_loads_stages_and_unloads(hf_models, matmul):
    """bf16 experts kept in the kernel's layout, one pair per copy: the same outputs as the stacked weights,
    through a staged copy, an unload and a reload; a released copy's memory goes back."""
    if (loaded := _kernel_mixtral(hf_models, matmul)) is None:
        return
    spec, reader = loaded
    shards = {m: ExpertSlots(spec, torch.bfloat16, matmul=m) for m in ("plain", matmul)}
    x = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    batch = ([9, 10, 10, 11, 12], [2, 3, 0, 1, 3], [5, 6, 2, 7, 5])
    for s in shards.values():
        s.load(reader, 1, [(9, 5), (10, 2), (11, 7), (12, 5)])
        s.load(reader, 1, [(10, 6)], stage=True)
    got, want = (shards[m].compute(1, *batch[:2], x, batch[2]) for m in (matmul, "plain"))
    _same(got, want, matmul)
    packed = shards[matmul]
    kind = PackedLinear if matmul == "packed" else AmxLinear     # the tiny Mixtral's 64 x 96 fits the tiles
    assert packed.matmul == matmul and all(isinstance(w, kind) for w in packed.table(1).w13 if w is not None)
    assert isinstance(packed.table(1).w13, list) and packed.nbytes() == shards["plain"].nbytes()
    copy = 3 * spec.moe.intermediate_size * spec.hidden_size * 2
    assert packed.reserved_bytes() == 5 * copy                      # the copies written, no spare rows
    for s in shards.values():
        s.unload(1, [(10, 2)])
        s.load(reader, 1, [(11, 3)])                                # replaces expert 7 (its row recycled)
    assert packed.reserved_bytes() == 4 * copy                      # the released copies' memory went back
    batch = ([9, 10, 11, 12], [2, 3, 1, 3], [5, 6, 3, 5])
    got, want = (shards[m].compute(1, *batch[:2], x, batch[2]) for m in (matmul, "plain"))
    _same(got, want, matmul)
    with pytest.raises(ValueError, match=f"matmul '{matmul}' keeps each copy apart"):
        ExpertSlots(spec, torch.bfloat16, gemm="grouped", matmul=matmul)


@pytest.mark.parametrize("matmul", KERNELS)
def test_a_kernel_shard_computes_when_its_first_row_is_free(hf_models, matmul):
    """Row 0 released (its packed copy freed): computes on the other rows still run."""
    if (loaded := _kernel_mixtral(hf_models, matmul)) is None:
        return
    spec, reader = loaded
    slots = ExpertSlots(spec, torch.bfloat16, matmul=matmul)
    slots.load(reader, 0, [(0, 1), (1, 2)])
    slots.unload(0, [0])
    assert slots.table(0).w13[0] is None
    x = torch.randn(3, spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = ExpertSlots(spec, torch.bfloat16, matmul="plain")
    ref.load(reader, 0, [(1, 2)])
    _same(slots.compute(0, [1], [3], x, [2]), ref.compute(0, [1], [3], x, [2]), matmul)
