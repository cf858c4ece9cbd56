"""NF4 format: bit-for-bit against bitsandbytes 0.50 on CPU, plus hand-computed and float64 checks."""

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from mtpeft.errors import CheckpointError  # noqa: E402
from mtpeft.quant import (  # noqa: E402
    dequantize_nf4,
    from_bnb,
    from_bnb_state_dict,
    from_params4bit,
    quantize_nf4,
    to_bnb,
    to_bnb_state_dict,
    to_params4bit,
)
from mtpeft.quant.nf4 import dynamic_map, nf4_code, real_absmax  # noqa: E402

# shapes: aligned, numel % 64 != 0 with even last dim, odd numel, tiny, more than one nested block of 256
SHAPES = [(64, 64), (37, 30), (5, 7), (3,), (129, 200), (70, 257)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes torch.compile()s its odd-shape fallback; compiling costs seconds per shape.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if len(shape) == 2:  # rows of very different scale: exercises small normalized absmax codes
        w = w * torch.logspace(-4, 1, shape[0]).view(-1, 1)
    return w.to(dtype)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(nf4_code(), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())
    code = dynamic_map()
    # hand-derived: exponent 0 has one fraction (0.1+1)/2 = 0.55 -> 5.5e-7; exponent 6 ends at
    # the midpoint of (1 - 0.9/64, 1) = 0.99296875; 1.0 is appended.
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code[-1] == 1.0 and abs(code[0].item() + 0.99296875) < 1e-7
    assert abs(code[code > 0].min().item() - 5.5e-7) < 1e-12


def test_hand_computed_bytes():
    w = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.2])
    q = quantize_nf4(w, double_quant=False)
    # 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626), -0.2 -> 5 (-0.1848),
    # odd tail padded with a zero (code 7) in the low nibble
    assert q.packed.tolist() == [0xF0, 0x7C, 0x57]
    assert q.absmax.tolist() == [1.0]
    assert torch.equal(dequantize_nf4(q, torch.float32), nf4_code()[torch.tensor([15, 0, 7, 12, 5])])


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_bitsandbytes(shape, dtype, double_quant):
    w = _weight(shape, dtype, seed=hash((shape, str(dtype))) % 1000)
    packed, state = BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == (w.numel() + 1) // 2
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert q.shape == w.shape and q.dtype == dtype
    if double_quant:
        assert q.absmax.dtype == torch.uint8
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_code, state.state2.code)
        assert q.absmax_offset == state.offset.item()
    expected = BF.dequantize_4bit(packed, state, quant_type="nf4")
    for out_dtype in {dtype, torch.float32}:
        state.dtype = out_dtype
        assert torch.equal(dequantize_nf4(q, out_dtype), BF.dequantize_4bit(packed, state, quant_type="nf4"))
    assert dequantize_nf4(q, dtype).shape == expected.shape


@pytest.mark.parametrize("double_quant", [False, True])
def test_codes_are_nearest_in_float64(double_quant):
    """Independent of bitsandbytes: each nibble is the NF4 level nearest to w / absmax."""
    w = _weight((33, 70), torch.float32, seed=3)
    q = quantize_nf4(w, double_quant=double_quant)
    flat = w.reshape(-1).double()
    blocks = torch.nn.functional.pad(flat, (0, 64 - flat.numel() % 64)).view(-1, 64)
    absmax = blocks.abs().amax(1)
    normed = (blocks / absmax[:, None]).reshape(-1)[: flat.numel()]
    dist = (normed[:, None] - nf4_code().double()[None, :]).abs()
    nearest = dist.argmin(1)
    got = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)[: flat.numel()].long()
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    assert torch.all(chosen <= dist.gather(1, nearest[:, None]).squeeze(1) + 1e-6)
    # double quantization keeps every absmax within half a dynamic-map step (< 1% of the block scale)
    err = (real_absmax(q).double() - absmax).abs()
    assert torch.all(err <= 0.01 * absmax.max())
    deq = dequantize_nf4(q, torch.float32).double().reshape(-1)
    want = nf4_code().double()[got] * real_absmax(q).double().repeat_interleave(64)[: flat.numel()]
    assert torch.allclose(deq, want, rtol=1e-7, atol=0)


def test_zero_block_and_constant_block():
    w = torch.cat([torch.zeros(64), torch.full((64,), -3.0), torch.zeros(10)])
    for dq in (False, True):
        packed, state = BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=dq)
        q = quantize_nf4(w, double_quant=dq)
        assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
        # (bitsandbytes' C++ path returns a 1-D weight as [1, n]: compare values only)
        expected = BF.dequantize_4bit(packed, state, quant_type="nf4").reshape(-1)
        assert torch.equal(dequantize_nf4(q, torch.float32), expected)


def test_dequant_rows_straddling_blocks():
    """[96, 80]: blocks of 64 straddle rows. bitsandbytes 0.50.2's C++ AVX-512 CPU dequant indexes
    absmax per row here (wrong: error up to 4x absmax); its torch kernel and the flat layout agree."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = _weight((96, 80), torch.float32, seed=11)
    packed, state = BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    q = quantize_nf4(w, double_quant=False)
    expected = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, nf4_code(), 64, w.shape, torch.float32)
    assert torch.equal(dequantize_nf4(q, torch.float32), expected)
    assert (dequantize_nf4(q, torch.float32) - w).abs().max() <= 0.5 * w.abs().max()


@pytest.mark.parametrize("double_quant", [False, True])
def test_params4bit_round_trip(double_quant):
    w = _weight((96, 128), torch.bfloat16, seed=5)
    q = quantize_nf4(w, double_quant=double_quant)
    p = to_params4bit(q)
    assert isinstance(p, bnb.nn.Params4bit) and p.bnb_quantized
    assert torch.equal(BF.dequantize_4bit(p.data, p.quant_state), dequantize_nf4(q, torch.bfloat16))
    back = from_params4bit(p)
    assert torch.equal(back.packed, q.packed) and torch.equal(back.absmax, q.absmax)
    assert back.shape == q.shape and back.dtype == q.dtype and back.double_quant == double_quant
    # the other direction: a Params4bit quantized by bitsandbytes itself
    theirs = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant).to("cpu")
    mine = from_params4bit(theirs)
    assert torch.equal(mine.packed, q.packed) and torch.equal(mine.absmax, q.absmax)
    assert torch.equal(dequantize_nf4(mine), BF.dequantize_4bit(theirs.data, theirs.quant_state))
    packed, state = to_bnb(mine)
    as_bf16 = packed.reshape(-1).view(torch.bfloat16).reshape(-1, 1)  # quant_storage=torch.bfloat16
    assert torch.equal(from_bnb(as_bf16, state).packed, q.packed)


@pytest.mark.parametrize("double_quant", [False, True])
def test_serialized_state_dict_both_ways(double_quant):
    w = _weight((40, 72), torch.float32, seed=7)
    layer = bnb.nn.Linear4bit(72, 40, bias=False, quant_type="nf4", compress_statistics=double_quant)
    layer.load_state_dict({"weight": w})
    layer = layer.to("cpu")  # quantizes
    theirs = layer.state_dict()
    q = quantize_nf4(w, double_quant=double_quant)
    mine = to_bnb_state_dict(q)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    loaded = from_bnb_state_dict(theirs)
    assert torch.equal(loaded.packed, q.packed) and loaded.shape == q.shape
    assert torch.equal(dequantize_nf4(loaded, torch.float32), dequantize_nf4(q, torch.float32))
    stats = {k[len("weight."):]: v for k, v in mine.items() if k != "weight"}
    p = bnb.nn.Params4bit.from_prequantized(mine["weight"], stats, device="cpu")
    assert torch.equal(BF.dequantize_4bit(p.data, p.quant_state), dequantize_nf4(q, torch.float32))


def test_state_dict_errors_name_the_key():
    q = quantize_nf4(_weight((8, 64), torch.float32, seed=1))
    sd = to_bnb_state_dict(q, prefix="layer.weight")
    del sd["layer.weight.absmax"]
    with pytest.raises(CheckpointError, match="layer.weight.absmax"):
        from_bnb_state_dict(sd, prefix="layer.weight")
    sd = to_bnb_state_dict(q)
    meta = json.loads(bytes(sd.pop("weight.quant_state.bitsandbytes__nf4").tolist()))
    meta["quant_type"] = "fp4"
    sd["weight.quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="not NF4"):
        from_bnb_state_dict(sd)
    sd = to_bnb_state_dict(q)
    sd["weight"] = sd["weight"][:-3]
    with pytest.raises(CheckpointError, match="truncated"):
        from_bnb_state_dict(sd)
