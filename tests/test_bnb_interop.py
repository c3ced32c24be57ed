"""bitsandbytes interoperability against real bitsandbytes 0.50.2 on the CPU.

State dicts come from real ``bnb.nn.Linear4bit`` modules quantized on the CPU (``.to("cpu")``)
and never run forward before ``state_dict()`` (REFERENCE.md: an eval forward on an AVX512-BF16
CPU rewrites the weight layout in place).

Where bitsandbytes is right we compare with ``bnb.functional.dequantize_4bit`` directly. Its
native CPU kernel in 0.50.2 indexes absmax per row, which is wrong when ``in_features %
blocksize != 0`` (and in_features is even; odd widths take bitsandbytes' generic path): there we
compare with bitsandbytes' own generic implementation
(``bitsandbytes.backends.default.ops._dequantize_4bit_compute``, the flat-block formula) and with
the independent NumPy reference below, and do not reproduce the bug.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlora import QLoraLinear
from qlora._state import NF4_CODEBOOK, create_dynamic_map

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def _bnb_state(w, bias=None, blocksize=64, compress=False, quant_type="nf4"):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, quant_type=quant_type,
                            compress_statistics=compress, compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False,
                                   blocksize=blocksize, compress_statistics=compress,
                                   quant_type=quant_type)
    if bias is not None:
        lin.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=False)
    lin = lin.to("cpu")  # quantizes
    sd = {k: v.detach().numpy().copy() for k, v in lin.state_dict().items()}
    return lin, sd


def _bnb_absmax(qs):
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
        return absmax.float()
    return qs.absmax


def _bnb_native_is_correct(shape, blocksize):
    in_f = shape[1]
    return in_f % 2 == 1 or in_f % blocksize == 0


def _bnb_dequant(lin):
    """bitsandbytes' dequantized weight, by the path that is correct for this shape."""
    qs = lin.weight.quant_state
    if _bnb_native_is_correct(tuple(qs.shape), qs.blocksize):
        return F.dequantize_4bit(lin.weight.data, qs).numpy()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    return _dequantize_4bit_compute(lin.weight.data.reshape(-1), _bnb_absmax(qs), qs.code,
                                    qs.blocksize, tuple(qs.shape), torch.float32).numpy()


def _numpy_dequant(sd, prefix=""):
    """Independent reference: unpack bnb's flat nibbles (high first), scale per flat block."""
    qs = json.loads(sd[prefix + "weight.quant_state.bitsandbytes__nf4"].tobytes())
    out_f, in_f = qs["shape"]
    n, bs = out_f * in_f, qs["blocksize"]
    flat = sd[prefix + "weight"].reshape(-1)
    codes = np.empty(flat.size * 2, np.uint8)
    codes[0::2], codes[1::2] = flat >> 4, flat & 15
    vals = NF4_CODEBOOK[codes[:n]]
    absmax = sd[prefix + "weight.absmax"]
    if "nested_offset" in qs:
        nested = np.repeat(sd[prefix + "weight.nested_absmax"], 256)[: absmax.size]
        absmax = (sd[prefix + "weight.nested_quant_map"][absmax] * nested
                  + np.float32(qs["nested_offset"])).astype(np.float32)
    return (vals * np.repeat(absmax, bs)[:n]).reshape(out_f, in_f)


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


SHAPES = [(48, 128), (40, 100), (33, 77), (7, 2), (64, 256), (3, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("compress", [False, True])
def test_from_bnb_dequantizes_bit_exactly(shape, blocksize, compress):
    rng = np.random.default_rng(sum(shape) + blocksize)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    lin, sd = _bnb_state(w, bias, blocksize, compress)
    layer = QLoraLinear.from_bnb(sd, rank=1)
    ours = layer.dequantize_weight()
    assert _same_bits(ours, _numpy_dequant(sd))
    assert _same_bits(ours, _bnb_dequant(lin))
    assert _same_bits(layer.scale, _bnb_absmax(lin.weight.quant_state).numpy())
    np.testing.assert_array_equal(layer.bias, bias)
    assert layer.group_size == blocksize and layer.num_groups == sd["weight.absmax"].size
    assert ("double_quant=True" in repr(layer)) == compress


@pytest.mark.parametrize("blocksize", [64, 2048, 4096])
def test_large_blocksizes(blocksize):
    rng = np.random.default_rng(blocksize)
    w = rng.standard_normal((16, 4096)).astype(np.float32)
    lin, sd = _bnb_state(w, None, blocksize, compress=True)
    layer = QLoraLinear.from_bnb(sd)
    assert _same_bits(layer.dequantize_weight(), _numpy_dequant(sd))
    assert _same_bits(layer.dequantize_weight(), _bnb_dequant(lin))
    assert layer.bias is None


def test_many_groups_nested_blocks():
    """More than 256 groups: several nested blocks and a partial last one."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((300, 128)) * rng.uniform(0.01, 1, (300, 1))).astype(np.float32)
    lin, sd = _bnb_state(w, None, 64, compress=True)
    assert sd["weight.nested_absmax"].size == 3
    layer = QLoraLinear.from_bnb(sd)
    assert _same_bits(layer.dequantize_weight(), _bnb_dequant(lin))


def test_prefix_and_extra_keys():
    rng = np.random.default_rng(1)
    _, sd = _bnb_state(rng.standard_normal((16, 64)).astype(np.float32), None, 64, True)
    full = {f"model.layers.3.mlp.up_proj.{k}": v for k, v in sd.items()}
    full["model.layers.3.mlp.up_proj.something_else"] = np.zeros(3)
    layer = QLoraLinear.from_bnb(full, "model.layers.3.mlp.up_proj.", rank=4, alpha=8.0, seed=3)
    assert layer.rank == 4 and layer.scaling == 2.0
    assert _same_bits(layer.dequantize_weight(), _numpy_dequant(sd))
    np.testing.assert_array_equal(layer.lora_b, 0)
    ref = QLoraLinear.from_weight(np.ones((16, 64)), rank=4, seed=3)
    np.testing.assert_array_equal(layer.lora_a, ref.lora_a)  # same init as from_weight


@pytest.mark.parametrize("shape", [(48, 128), (40, 100), (33, 77)])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_to_bnb_matches_bitsandbytes(shape, compress, bias):
    rng = np.random.default_rng(7)
    w = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape[0]).astype(np.float32) if bias else None
    lin, sd = _bnb_state(w, b, 64, compress)
    layer = QLoraLinear.from_weight(w, rank=1, group_size=64, bias=b, double_quant=compress)
    ours = layer.to_bnb()
    # Same keys, shapes and dtypes as bitsandbytes writes (the JSON's length varies with the
    # digits of nested_offset).
    js = "weight.quant_state.bitsandbytes__nf4"
    assert {k: (v.shape if k != js else v.ndim, v.dtype) for k, v in ours.items()} == \
        {k: (v.shape if k != js else v.ndim, v.dtype) for k, v in sd.items()}
    if not compress:
        # qlora's quantizer is bit-exact with bitsandbytes': the whole state dict is equal,
        # down to the bytes of the quant-state JSON.
        for k in sd:
            np.testing.assert_array_equal(ours[k], sd[k], err_msg=k)
    else:
        # Codes are identical; the 8-bit scales may differ by one code where bitsandbytes'
        # lookup-table quantizer is not nearest (REFERENCE.md), and its torch mean may differ
        # from ours in the last bit.
        np.testing.assert_array_equal(ours["weight"], sd["weight"])
        np.testing.assert_array_equal(ours["weight.nested_quant_map"],
                                      sd["weight.nested_quant_map"])
        d = np.abs(ours["weight.absmax"].astype(int) - sd["weight.absmax"].astype(int))
        assert d.max() <= 1
    # bitsandbytes loads it and dequantizes to our weight.
    tsd = {k[len("weight."):]: torch.from_numpy(v) for k, v in ours.items()
           if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(torch.from_numpy(ours["weight"]), tsd, device="cpu")
    qs = p.quant_state
    assert tuple(qs.shape) == shape and qs.nested == compress
    assert _same_bits(_bnb_absmax(qs).numpy(), layer.scale)
    if _bnb_native_is_correct(shape, 64):
        assert _same_bits(F.dequantize_4bit(p.data, qs).numpy(), layer.dequantize_weight())
    assert _same_bits(_numpy_dequant(ours), layer.dequantize_weight())


def test_bnb_forward_of_exported_state_matches():
    """Load our export into a real Linear4bit and compare forwards (B = 0, so no LoRA term)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    layer = QLoraLinear.from_weight(w, rank=2, bias=b, double_quant=True)
    lin = bnb.nn.Linear4bit(128, 64, bias=True, quant_type="nf4", compress_statistics=True,
                            compute_dtype=torch.float32)
    sd = layer.to_bnb()
    stats = {k[len("weight."):]: torch.from_numpy(v) for k, v in sd.items()
             if k.startswith("weight.")}
    lin.weight = bnb.nn.Params4bit.from_prequantized(torch.from_numpy(sd["weight"]), stats,
                                                     device="cpu", module=lin)
    lin.bias = torch.nn.Parameter(torch.from_numpy(sd["bias"]), requires_grad=False)
    lin.eval()
    x = rng.standard_normal((5, 128)).astype(np.float32)
    with torch.no_grad():
        y_bnb = lin(torch.from_numpy(x)).float().numpy()
    y = layer(x)
    # On CPUs with AVX512-BF16, bitsandbytes' CPU forward repacks the weight to bfloat16
    # (REFERENCE.md), rounding each dequantized weight to 8 significant bits (relative error
    # <= 2**-9); over 128 products that leaves ~3e-3 relative output error, so 1e-2 is the
    # bound. A wrong export (transposed or misordered codes, wrong scales) is off by O(1).
    assert np.linalg.norm(y - y_bnb) / np.linalg.norm(y_bnb) < 1e-2


def test_fp4_rejected():
    rng = np.random.default_rng(3)
    _, sd = _bnb_state(rng.standard_normal((8, 64)).astype(np.float32), quant_type="fp4")
    with pytest.raises(ValueError, match="FP4"):
        QLoraLinear.from_bnb(sd)


def _good_sd(compress=True):
    rng = np.random.default_rng(4)
    return _bnb_state(rng.standard_normal((8, 64)).astype(np.float32), None, 64, compress)[1]


def _qs_edit(sd, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    qs = json.loads(sd[key].tobytes())
    qs.update(changes)
    sd = dict(sd)
    sd[key] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
    return sd


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: {k.replace("__nf4", "__int3"): v for k, v in sd.items()}, "unknown quant type"),
    (lambda sd: _qs_edit(sd, quant_type="fp4"), "quant_type"),
    (lambda sd: {k: v for k, v in sd.items() if k != "weight.absmax"}, "weight.absmax: missing"),
    (lambda sd: {k: v for k, v in sd.items() if k != "weight.nested_absmax"}, "nested_absmax"),
    (lambda sd: {k: v for k, v in sd.items() if "quant_state" not in k}, "missing"),
    (lambda sd: _qs_edit(sd, shape=[8, 65]), "weight: must hold"),
    (lambda sd: _qs_edit(sd, shape=[8]), "shape"),
    (lambda sd: _qs_edit(sd, blocksize=0), "blocksize"),
    (lambda sd: _qs_edit(sd, blocksize=32), "absmax: must hold"),
    (lambda sd: _qs_edit(sd, nested_blocksize=128), "nested_blocksize"),
    (lambda sd: _qs_edit(sd, nested_offset="x"), "nested_offset"),
    (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].astype(np.float32)}, "dtype uint8"),
    (lambda sd: {**sd, "weight.quant_map": sd["weight.quant_map"][::-1].copy()}, "NF4 table"),
    (lambda sd: {**sd, "weight.nested_quant_map": np.zeros(255, np.float32)}, "256"),
    (lambda sd: {**sd, "weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"{oops", np.uint8)},
     "JSON"),
    (lambda sd: {**sd, "bias": np.zeros(7, np.float32)}, "bias"),
])
def test_bad_states_raise_clear_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        QLoraLinear.from_bnb(mutate(_good_sd()))


def test_bad_plain_absmax():
    sd = _good_sd(compress=False)
    sd["weight.absmax"] = sd["weight.absmax"].copy()
    sd["weight.absmax"][0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        QLoraLinear.from_bnb(sd)
    with pytest.raises(TypeError):
        QLoraLinear.from_bnb([1, 2])


@pytest.mark.parametrize("kwargs", [
    {"signed": True}, {"signed": False}, {"signed": True, "max_exponent_bits": 5},
    {"signed": True, "total_bits": 6, "max_exponent_bits": 4},
])
def test_dynamic_map_equals_bitsandbytes(kwargs):
    # torch's vectorised float32 linspace (which bitsandbytes' map is built from) uses fused
    # multiply-adds on AVX2/AVX512/NEON CPUs; qlora reproduces that. On a CPU where torch falls
    # back to its unfused kernel a few map entries would differ in the last bit. Imports are
    # unaffected either way: from_bnb uses the map stored in the state dict.
    want = F.create_dynamic_map(**kwargs).numpy()
    got = create_dynamic_map(**kwargs)
    assert _same_bits(got, want)


def test_dynamic_map_inconsistent_arguments():
    with pytest.raises(AssertionError):
        F.create_dynamic_map(signed=False, max_exponent_bits=4)
    with pytest.raises(ValueError, match="entries"):
        create_dynamic_map(signed=False, max_exponent_bits=4)


@pytest.mark.parametrize("compress", [False, True])
def test_real_checkpoint_file_forward_matches_bitsandbytes(tmp_path, compress):
    """The user path: a bitsandbytes 4-bit model's state dict saved to safetensors with torch,
    read back with safetensors.numpy (no torch), imported with from_bnb; qlora's forward
    matches the bitsandbytes module's own forward (run only after state_dict() was taken)."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    rng = np.random.default_rng(21)
    w = (rng.standard_normal((96, 256)) * 0.02).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    lin, _ = _bnb_state(w, b, 64, compress)
    save_file({f"model.fc.{k}": v.contiguous() for k, v in lin.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    sd = load_file(str(tmp_path / "model.safetensors"))
    layer = QLoraLinear.from_bnb(sd, "model.fc.", rank=4)
    assert _same_bits(layer.dequantize_weight(), _bnb_dequant(lin))
    x = rng.standard_normal((7, 256)).astype(np.float32)
    lin.eval()
    with torch.no_grad():
        y_bnb = lin(torch.from_numpy(x)).float().numpy()
    # Same bf16 argument as in test_bnb_forward_of_exported_state_matches.
    assert np.linalg.norm(layer(x) - y_bnb) / np.linalg.norm(y_bnb) < 1e-2
    # And exactly the float64 product with the (bit-exact) dequantized weight, to fp32 rounding.
    want = x.astype(np.float64) @ layer.dequantize_weight().T.astype(np.float64) + b
    assert np.linalg.norm(layer(x) - want) / np.linalg.norm(want) < 1e-5


def test_from_bnb_argument_errors():
    sd = _good_sd()
    with pytest.raises(ValueError, match="rank"):
        QLoraLinear.from_bnb(sd, rank=9)  # > min(8, 64)
    with pytest.raises(ValueError, match="alpha"):
        QLoraLinear.from_bnb(sd, alpha=-1.0)
    with pytest.raises(TypeError, match="prefix"):
        QLoraLinear.from_bnb(sd, prefix=3)
