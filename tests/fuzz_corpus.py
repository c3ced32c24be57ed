"""Deterministic corruptions of the files qlora loads, and a child-process runner for them.

Used by ``tests/test_fuzz_files.py``; also a command line for reproducing one case:

    PYTHONPATH=python python tests/fuzz_corpus.py run FAMILY START COUNT   # JSON line per case
    PYTHONPATH=python python tests/fuzz_corpus.py run FAMILY SEED 1 -v     # one case, traceback
    PYTHONPATH=python python tests/fuzz_corpus.py write FAMILY SEED DIR    # the damaged input

A case is ``(family, seed)``: the seed alone picks the kind of damage (round robin over the
family's kinds, so every kind gets its share) and drives a ``numpy.random.Generator`` seeded
with ``[family number, seed]``. Nothing depends on time, the process or the machine.

Families (each a public loading path):

``qlora_mmap``, ``qlora_read``
    qlora safetensors files (``qlora.load_layers`` and ``QLoraLinear.load``, ``mmap=True`` /
    ``False``).
``bnb_dict``
    bitsandbytes ``Linear4bit`` state dicts of NumPy arrays (``QLoraLinear.from_bnb``).
``bnb_file``
    the same state dicts saved as safetensors files, damaged at the byte and header level,
    read back with ``safetensors.numpy.load_file`` and given to ``from_bnb`` (a file the
    safetensors library itself refuses is counted as ``rejected_by_safetensors``).
``peft``
    PEFT adapter folders (``qlora.load_peft_adapter``): hostile configs and damaged weights.

Outcomes of one case (the child reports them; crashes and hangs the parent sees):

``rejected``         ValueError or OSError (what the loaders promise)
``loaded``           loaded, and every layer is self-consistent: finite dequantized weight,
                     scaling a normal float32, forward within the float32 rounding bound of a
                     float64 reference built from the layer's own dequantize_weight/LoRA/bias
``rejected_by_safetensors``  (bnb_file only) the third-party reader refused the file
anything else        a failure: ``exception:<Type>``, ``memory`` (MemoryError under the
                     address-space limit), ``inconsistent``, ``nonfinite_weight``,
                     ``bad_scaling``, ``bad_adapter``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------ limits
# One case may take this long before it counts as a hang (cases take ~3 ms; the slowest
# seen is ~60 ms on a loaded machine).
CASE_TIMEOUT_S = float(os.environ.get("QLORA_FUZZ_CASE_TIMEOUT", "5"))
def asan_loaded() -> bool:
    """True when this process runs with AddressSanitizer's runtime (LD_PRELOADed by CI)."""
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


ADDRESS_SPACE_LIMIT = 1 << 30  # 1 GiB: the child needs ~110 MiB; inputs are < 64 KiB
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)

FAMILIES = ("qlora_mmap", "qlora_read", "bnb_dict", "bnb_file", "peft")

# Values put into JSON fields where numbers, strings, bools, lists or objects belong.
HOSTILE_VALUES = [
    0, -1, 1, 2, 3, 7, 16, 255, 256, 257, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 62,
    2 ** 63 - 1, 2 ** 63, 2 ** 64, 2 ** 64 + 1, -2 ** 63, -2 ** 64, 10 ** 30, 10 ** 400,
    0.5, 1.0, 2.0, -0.0, 1e-45, 1e-320, 1e-39, 1e-38, 3.4028234663852886e38, 3.5e38, 1e300,
    float("nan"), float("inf"), float("-inf"),
    True, False, None, "", "1", "64", "nf4", "fp4", "float32", "qlora", "LORA", "none",
    "x" * 300, "\u0000", "\ud800", [], [1], [1, 2], [0, 0], [-1, 5], [2 ** 63, 1], [[1]],
    {}, {"a": 1}, {"": None},
]
# Number literals (text) that replace numbers in JSON text.
HOSTILE_LITERALS = [
    b"0", b"-1", b"1", b"2", b"255", b"256", b"65", b"4294967296", b"18446744073709551615",
    b"18446744073709551616", b"-9223372036854775809", b"9" * 40, b"9" * 4400, b"1e308",
    b"1e999", b"-1e999", b"1e-999", b"-0.0", b"0.5", b"NaN", b"Infinity", b"-Infinity",
    b"true", b"null", b"\"7\"", b"[]", b"{}", b"1.5", b"1E2", b"0x10", b"01",
]
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
               "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "I128",
               "f32", "", "float32", 3, None, ["F32"]]


# ------------------------------------------------------------------------------ safetensors
def st_build(header: object, body: bytes, *, raw_header: bytes | None = None) -> bytes:
    """A safetensors file from a header (object or raw bytes) and a data section."""
    blob = raw_header if raw_header is not None else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(blob)) + blob + body


def st_write(tensors: list[tuple[str, str, list[int], bytes]],
             metadata: dict | None = None) -> bytes:
    """Write a valid safetensors file from (name, dtype name, shape, raw bytes) tensors."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    body = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    return st_build(header, body)


def st_split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def _deep_json(rng) -> str:
    depth = _pick(rng, [100, 1000, 5000, 50_000, 200_000])
    if rng.integers(2):
        return _nested(depth)
    return '{"a":' * depth + "1" + "}" * depth


def _hostile_json_text(rng, valid_text: str) -> bytes:
    """A hostile variant of a valid JSON text (deep nesting, NaN, duplicates, bad UTF-8...)."""
    kind = int(rng.integers(12))
    if kind == 0:
        return _deep_json(rng).encode()
    if kind == 1:  # non-UTF-8 bytes somewhere
        raw = bytearray(valid_text.encode())
        pos = int(rng.integers(len(raw) + 1))
        raw[pos:pos] = _pick(rng, [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])
        return bytes(raw)
    if kind == 2:  # a duplicate key: repeat the object's first member at its end
        obj = json.loads(valid_text)
        if isinstance(obj, dict) and obj:
            k = _pick(rng, list(obj))
            dup = json.dumps({k: _pick(rng, HOSTILE_VALUES)})[1:-1]
            return (valid_text.rstrip()[:-1] + "," + dup + "}").encode()
        return valid_text.encode() + b"{}"
    if kind == 3:  # a number literal replaced
        return _replace_number(valid_text.encode(), rng)
    if kind == 4:  # not an object
        return _pick(rng, [b"[]", b"null", b"1", b"\"x\"", b"true", b"", b" ", b"[{}]"])
    if kind == 5:  # truncated
        raw = valid_text.encode()
        return raw[:int(rng.integers(len(raw)))]
    if kind == 6:  # trailing garbage or a second document
        return valid_text.encode() + _pick(rng, [b"x", b"{}", b"\x00", b" ]", b"\n1"])
    if kind == 7:  # byte order mark, NUL bytes
        return _pick(rng, [b"\xef\xbb\xbf", b"\x00", b"\xff\xfe"]) + valid_text.encode()
    if kind == 8:  # a huge string or a huge key
        obj = json.loads(valid_text)
        if isinstance(obj, dict):
            obj["x" * int(rng.integers(1, 200_000))] = "y" * int(rng.integers(1, 200_000))
        return json.dumps(obj).encode()
    if kind == 9:  # lone surrogates / escapes
        return valid_text.replace('"', '"\\ud800', 1).encode()
    if kind == 10:  # a deep value inside the valid object
        obj = json.loads(valid_text)
        text = json.dumps(obj)
        if isinstance(obj, dict):
            return (text[:-1] + (', ' if obj else '') + '"deep": ' + _deep_json(rng) + "}").encode()
        return text.encode()
    # kind 11: a random byte flipped
    raw = bytearray(valid_text.encode())
    if raw:
        raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
    return bytes(raw)


_NUMBER = re.compile(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def _replace_number(text: bytes, rng) -> bytes:
    nums = list(_NUMBER.finditer(text))
    if not nums:
        return text
    m = _pick(rng, nums)
    return text[:m.start()] + _pick(rng, HOSTILE_LITERALS) + text[m.end():]


def _bytes_havoc(data: bytes, rng) -> bytes:
    """Several random byte-level edits (AFL-style): flips, interesting bytes, inserts, deletes,
    duplicated and moved chunks."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 8))):
        if not buf:
            buf += rng.bytes(int(rng.integers(1, 16)))
            continue
        op = int(rng.integers(7))
        pos = int(rng.integers(len(buf)))
        if op == 0:
            buf[pos] ^= 1 << int(rng.integers(8))
        elif op == 1:
            buf[pos] = _pick(rng, [0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x22, 0x5B, 0x7B, 0x2D, 0x39])
        elif op == 2:
            buf[pos:pos] = rng.bytes(int(rng.integers(1, 16)))
        elif op == 3:
            del buf[pos:pos + int(rng.integers(1, 32))]
        elif op == 4:
            ln = int(rng.integers(1, 64))
            buf[int(rng.integers(len(buf)))] = buf[pos]  # copy one byte
            buf[pos:pos] = buf[pos:pos + ln]
        elif op == 5:
            for i in range(int(rng.integers(1, 8))):
                if pos + i < len(buf):
                    buf[pos + i] = 0xFF
        else:
            w = int(rng.integers(1, 5)) * 2
            val = _pick(rng, [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1])
            chunk = (val % (1 << (8 * 8))).to_bytes(8, "little")[:w]
            buf[pos:pos + w] = chunk
    return bytes(buf)


def mutate_safetensors(data: bytes, rng, kind: str, others: list[bytes]) -> bytes:
    """Damage a valid safetensors file in one of the generic ways (``ST_KINDS``)."""
    header, body = st_split(data)
    names = _tensor_names(header)
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "truncate":
        cut = _pick(rng, [0, 1, 7, 8, 9, 8 + n - 1, 8 + n, len(data) - 1,
                          int(rng.integers(len(data)))])
        return data[:max(0, min(cut, len(data) - 1))]
    if kind == "flip":
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(len(buf)))] ^= 1 << int(rng.integers(8))
        return bytes(buf)
    if kind == "flip_header":
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(8 + n))] = int(rng.integers(256))
        return bytes(buf)
    if kind == "append":
        return data + rng.bytes(int(rng.integers(1, 64)))
    if kind == "havoc":
        return _bytes_havoc(data, rng)
    if kind == "splice":
        other = _pick(rng, others)
        _, b2 = st_split(other)
        if rng.integers(2):
            return st_build(header, b2)
        return data[:int(rng.integers(len(data)))] + other[int(rng.integers(len(other))):]
    if kind == "header_len":
        choices = [0, 1, 2, n - 1, n + 1, len(data) - 8, len(data), 100_000_001, 2 ** 31,
                   2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
        return struct.pack("<Q", _pick(rng, choices) % 2 ** 64) + data[8:]
    if kind == "header_number":
        text = data[8:8 + n]
        return st_build(None, body, raw_header=_replace_number(text, rng))
    if kind == "header_text":
        return st_build(None, body, raw_header=_hostile_json_text(rng, json.dumps(header)))
    if kind == "offsets":
        name = _pick(rng, names)
        b, e = header[name]["data_offsets"]
        size = len(body)
        other = header[_pick(rng, names)]["data_offsets"]
        choices = [[2 ** 64 - 8, 2 ** 64], [2 ** 63, 2 ** 63 + 4], [-1, e], [b, -1], [-8, 0],
                   [e, b], [b, b], [0, size], [0, e], [b, size + 1], [b + 1, e + 1],
                   [other[0], other[0] + e - b], [other[0], other[1]], [b, 2 ** 62],
                   [b * 1.0, e], [str(b), e], [b], [b, e, e], [[b], e], None, {}, [b - 1, e - 1],
                   [b, e + 2 ** 32]]
        header[name]["data_offsets"] = _pick(rng, choices)
        return st_build(header, body)
    if kind == "shape":
        name = _pick(rng, names)
        shape = list(header[name]["shape"])
        nel = int(np.prod(shape)) if shape else 1
        choices = [[], [0], [-1], [nel], [nel, 1], shape[::-1], [2 ** 31, 2 ** 31],
                   [2 ** 62, 4], [2 ** 63], [2 ** 64 + 1], [0, 2 ** 63], [1] * 17, [1] * 16,
                   [float(d) for d in shape], [str(d) for d in shape], [True] * len(shape),
                   shape + [0], [nel * 2], [-nel, -1], None, 3, "[1]", [[1]],
                   [2 ** 32, 2 ** 32, 0], [d + 1 for d in shape]]
        header[name]["shape"] = _pick(rng, choices)
        return st_build(header, body)
    if kind == "dtype":
        name = _pick(rng, names)
        header[name]["dtype"] = _pick(rng, DTYPE_NAMES)
        return st_build(header, body)
    if kind == "entry":
        name = _pick(rng, names)
        op = int(rng.integers(6))
        if op == 0:
            header[name] = _pick(rng, HOSTILE_VALUES)
        elif op == 1:
            header[name]["extra"] = _pick(rng, HOSTILE_VALUES)
        elif op == 2:
            del header[name][_pick(rng, ["dtype", "shape", "data_offsets"])]
        elif op == 3:  # rename onto another tensor (it vanishes) or to a strange name
            new = _pick(rng, names + ["", "__metadata__", "\u0000", "x" * 5000, name + "."])
            entry = header.pop(name)
            header[new] = entry
        elif op == 4:  # delete: leaves a gap
            del header[name]
        else:  # an extra tensor entry pointing into the data
            header["extra.tensor"] = copy.deepcopy(header[name])
        return st_build(header, body)
    if kind == "metadata_top":
        op = int(rng.integers(4))
        if op == 0:
            header["__metadata__"] = _pick(rng, HOSTILE_VALUES)
        elif op == 1:
            header.pop("__metadata__", None)
        else:
            meta = header.setdefault("__metadata__", {})
            if not isinstance(meta, dict):
                meta = header["__metadata__"] = {}
            keys = list(meta) + ["format", "format_version", "codes_layout", "layers", "other"]
            meta[_pick(rng, keys)] = _pick(rng, HOSTILE_VALUES + ["2", "0", "{}", "[]"])
        return st_build(header, body)
    if kind == "float_values":  # hostile float32 values in the data of an F32 tensor
        f32 = [nm for nm in names if header[nm]["dtype"] == "F32"
               and header[nm]["data_offsets"][1] > header[nm]["data_offsets"][0]]
        if not f32:
            return _bytes_havoc(data, rng)
        name = _pick(rng, f32)
        b, e = header[name]["data_offsets"]
        arr = np.frombuffer(body[b:e], dtype="<f4").copy()
        val = _pick(rng, [np.nan, np.inf, -np.inf, F32_MAX, -F32_MAX, 1e-45, -0.0, 1e30,
                          1e20, 0.0])
        idx = rng.integers(arr.size, size=int(rng.integers(1, arr.size + 1)))
        arr[idx] = val
        body = body[:b] + arr.astype("<f4").tobytes() + body[e:]
        return st_build(header, body)
    raise AssertionError(kind)


ST_KINDS = ["truncate", "flip", "flip_header", "append", "havoc", "splice", "header_len",
            "header_number", "header_text", "offsets", "shape", "dtype", "entry",
            "metadata_top", "float_values"]


# ------------------------------------------------------------------------------ checks
class Inconsistent(Exception):
    """A loaded layer or adapter that does not agree with itself (a failure)."""

    def __init__(self, outcome: str, msg: str):
        super().__init__(msg)
        self.outcome = outcome


def check_layer(layer, rng) -> str:
    """A loaded layer must be self-consistent; returns "loaded" or raises Inconsistent."""
    import reference

    out_f, in_f = layer.out_features, layer.in_features
    s = layer.scaling
    if not (F32_TINY <= s <= F32_MAX):
        raise Inconsistent("bad_scaling", f"scaling {s!r} is not a normal float32 > 0")
    deq = layer.dequantize_weight()
    if deq.shape != (out_f, in_f):
        raise Inconsistent("inconsistent", f"dequantize_weight shape {deq.shape}")
    if not np.isfinite(deq).all():
        raise Inconsistent("nonfinite_weight", f"the dequantized weight holds NaN or Inf: "
                           f"{layer!r}")
    a, b, bias = layer.lora_a, layer.lora_b, layer.bias
    if a.shape != (layer.rank, in_f) or b.shape != (out_f, layer.rank):
        raise Inconsistent("inconsistent", f"LoRA shapes {a.shape} {b.shape}")
    for batch in (1, 3):
        x = rng.standard_normal((batch, in_f)).astype(np.float32)
        y = layer(x)
        if y.shape != (batch, out_f) or y.dtype != np.float32:
            raise Inconsistent("inconsistent", f"forward gave {y.dtype} {y.shape}")
        ref = reference.forward(x, deq, a, b, s, bias)
        mag = reference.forward_abs(x, deq, a, b, s, bias)
        if mag.max() > 1e36:  # float32 may overflow along the way: only shape and NaN-freedom
            continue
        bound = reference.forward_bound(x, deq, a, b, s, bias)
        err = np.abs(y.astype(np.float64) - ref)
        if not np.isfinite(y).all() or (err > bound).any():
            raise Inconsistent("inconsistent", f"forward differs from the float64 reference "
                               f"by {np.nanmax(err):.3g} (bound {bound.max():.3g})")
    return "loaded"


# ------------------------------------------------------------------------------ base inputs
def qlora_base_files(tmpdir: str) -> list[bytes]:
    """Small valid qlora files: plain and double-quantized scales, bias or not, partial
    groups, odd shapes, one and two layers (non-zero LoRA B, so the LoRA term matters)."""
    import qlora
    from qlora import QLoraLinear

    rng = np.random.default_rng(0)
    specs = [((9, 40), 16, False, True), ((5, 33), 7, True, False), ((3, 64), 64, True, True),
             ((4, 8), 3, False, False)]
    out = []
    path = os.path.join(tmpdir, "base.safetensors")
    layers = []
    for shape, gs, dq, bias in specs:
        layer = QLoraLinear.from_weight(rng.standard_normal(shape), rank=2, group_size=gs,
                                        double_quant=dq, alpha=3.0,
                                        bias=rng.standard_normal(shape[0]) if bias else None)
        layer.set_lora_b(rng.standard_normal((shape[0], 2)) * 0.1)
        layers.append(layer)
        layer.save(path)
        with open(path, "rb") as f:
            out.append(f.read())
    qlora.save_layers(path, {"model.a.b": layers[0], "c": layers[1]})
    with open(path, "rb") as f:
        out.append(f.read())
    return out


def bnb_base_states() -> list[tuple[str, dict]]:
    """(prefix, state dict) of small bitsandbytes Linear4bit states (via ``to_bnb``)."""
    from qlora import QLoraLinear

    rng = np.random.default_rng(1)
    specs = [((8, 16), 32, False, False, "p."), ((6, 40), 64, True, True, "m.l.0.up."),
             ((5, 7), 32, False, True, ""), ((3, 100), 128, True, False, "x.")]
    out = []
    for shape, gs, dq, bias, prefix in specs:
        layer = QLoraLinear.from_weight(rng.standard_normal(shape), rank=1, group_size=gs,
                                        double_quant=dq,
                                        bias=rng.standard_normal(shape[0]) if bias else None)
        out.append((prefix, layer.to_bnb(prefix)))
    return out


PEFT_CONFIG = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
    "lora_dropout": 0.05, "bias": "none", "use_rslora": False, "use_dora": False,
    "fan_in_fan_out": False, "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {"layers.1.self_attn.v_proj": 2}, "alpha_pattern": {"v_proj": 3},
    "modules_to_save": None, "base_model_name_or_path": "tiny", "inference_mode": True,
}
PEFT_MODULES = [("model.layers.0.self_attn.q_proj", 4, 12, 10, "F32"),
                ("model.layers.0.self_attn.v_proj", 4, 12, 6, "F16"),
                ("model.layers.1.self_attn.v_proj", 2, 12, 6, "BF16")]


def _encode(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return arr.astype("<f4").tobytes()
    if dtype == "F16":
        return arr.astype("<f2").tobytes()
    if dtype == "F64":
        return arr.astype("<f8").tobytes()
    if dtype == "BF16":
        return (arr.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    raise AssertionError(dtype)


def peft_base_weights() -> bytes:
    rng = np.random.default_rng(2)
    tensors = []
    for module, r, in_f, out_f, dt in PEFT_MODULES:
        a = rng.standard_normal((r, in_f)) * 0.1
        b = rng.standard_normal((out_f, r)) * 0.1
        tensors.append((f"base_model.model.{module}.lora_A.weight", dt, [r, in_f], _encode(a, dt)))
        tensors.append((f"base_model.model.{module}.lora_B.weight", dt, [out_f, r], _encode(b, dt)))
    return st_write(tensors, {"format": "pt"})


# ------------------------------------------------------------------------------ families
class Family:
    """A family of cases: ``make(seed)`` builds the input, ``run(input)`` loads and checks it."""

    kinds: list[str] = []

    def __init__(self, number: int, tmpdir: str):
        self.number = number
        self.tmpdir = tmpdir

    def rng(self, seed: int):
        return np.random.default_rng([self.number, seed])

    def kind(self, seed: int) -> str:
        return self.kinds[seed % len(self.kinds)]


class QloraFiles(Family):
    kinds = ST_KINDS + ["layer_meta", "layer_meta_text", "layer_meta_field_drop",
                        "nested_values", "tensor_swap", "consistent_edit", "consistent_edit"]

    def __init__(self, number, tmpdir, mmap: bool):
        super().__init__(number, tmpdir)
        self.mmap = mmap
        self.bases = qlora_base_files(tmpdir)
        self.path = os.path.join(tmpdir, f"case_{number}.safetensors")

    def make(self, seed: int) -> bytes:
        rng = self.rng(seed)
        kind = self.kind(seed)
        data = _pick(rng, self.bases)
        if kind in ST_KINDS:
            return mutate_safetensors(data, rng, kind, self.bases)
        header, body = st_split(data)
        layers = json.loads(header["__metadata__"]["layers"])
        name = _pick(rng, list(layers))
        if kind == "layer_meta":  # a hostile value in one field of one layer's metadata
            key = _pick(rng, list(layers[name]) + ["unknown"])
            layers[name][key] = _pick(rng, HOSTILE_VALUES)
            header["__metadata__"]["layers"] = json.dumps(layers)
        elif kind == "layer_meta_text":  # the layers JSON (a string inside JSON) is hostile
            header["__metadata__"]["layers"] = _hostile_json_text(
                rng, json.dumps(layers)).decode("utf-8", "surrogateescape")
        elif kind == "layer_meta_field_drop":
            op = int(rng.integers(3))
            if op == 0:
                del layers[name][_pick(rng, list(layers[name]))]
            elif op == 1:
                layers[name] = _pick(rng, HOSTILE_VALUES)
            else:  # a layer the tensors do not back, or renamed
                layers[_pick(rng, ["ghost", name + ".x", "", "model"])] = layers.pop(name)
            header["__metadata__"]["layers"] = json.dumps(layers)
        elif kind == "nested_values":  # metadata numbers that are in range but extreme
            key = _pick(rng, ["scaling", "nested_offset", "alpha", "group_size"])
            layers[name][key] = _pick(rng, [F32_MAX, -F32_MAX, 1e-45, 1e-40, 1e-38, 1e38,
                                            2 ** 62, 2 ** 31, 1, 1e-300, 1e-320])
            header["__metadata__"]["layers"] = json.dumps(layers)
        elif kind == "consistent_edit":  # a re-written, internally consistent file
            return self._consistent_edit(header, body, layers, name, rng)
        else:  # tensor_swap: two tensors' header entries exchanged
            names = _tensor_names(header)
            x, y = _pick(rng, names), _pick(rng, names)
            header[x], header[y] = header[y], header[x]
        try:
            return st_build(header, body)
        except UnicodeEncodeError:
            return st_build(None, body, raw_header=json.dumps(header).encode(
                "utf-8", "surrogateescape"))

    @staticmethod
    def _consistent_edit(header: dict, body: bytes, layers: dict, name: str, rng) -> bytes:
        """Change one layer's rank, bias, group size or shape and rewrite every tensor and
        offset to agree (random data of the right size), or claim a huge size consistently
        in metadata and header without the data to back it. Most of these files load: the
        checks of the loaded layer then do the work."""
        tensors = {k: [v["dtype"], list(v["shape"]), body[v["data_offsets"][0]:
                                                          v["data_offsets"][1]]]
                   for k, v in header.items() if k != "__metadata__"}
        info = layers[name]
        out_f, in_f = info["out_features"], info["in_features"]
        f32 = lambda *shape: (rng.standard_normal(shape) * 0.3).astype("<f4").tobytes()  # noqa
        op = int(rng.integers(5))
        if op == 0:  # another rank
            r = _pick(rng, [1, 3, 7, 64])
            info["rank"] = r
            tensors[f"{name}.lora_a"] = ["F32", [r, in_f], f32(r, in_f)]
            tensors[f"{name}.lora_b"] = ["F32", [out_f, r], f32(out_f, r)]
        elif op == 1:  # bias added or removed
            if info["bias"]:
                del tensors[f"{name}.bias"]
            else:
                tensors[f"{name}.bias"] = ["F32", [out_f], f32(out_f)]
            info["bias"] = not info["bias"]
        elif op == 2 and not info["double_quant"]:  # another group size, scales to match
            gs = _pick(rng, [1, 2, 5, 64, out_f * in_f, out_f * in_f + 1, 2 ** 40])
            groups = -(-out_f * in_f // gs)
            info["group_size"] = gs
            tensors[f"{name}.scales"] = ["F32", [groups],
                                         np.abs(rng.standard_normal(groups)).astype("<f4")
                                         .tobytes()]
        elif op == 3:  # a huge rank, claimed consistently but not backed by data
            r = _pick(rng, [2 ** 20, 2 ** 31, 2 ** 31 + 1])
            info["rank"] = r
            tensors[f"{name}.lora_a"] = ["F32", [r, in_f], b""]
            tensors[f"{name}.lora_b"] = ["F32", [out_f, r], b""]
            meta = dict(header["__metadata__"], layers=json.dumps(layers))
            out_header: dict = {"__metadata__": meta}
            pos = 0
            for k, (dt, shape, raw) in tensors.items():
                size = int(np.prod(shape)) * 4 if raw == b"" else len(raw)
                out_header[k] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + size]}
                pos += size
            return st_build(out_header, b"".join(v[2] for v in tensors.values()))
        else:  # more output rows: codes, scales, LoRA B and bias all grown to match
            new_out = out_f + int(rng.integers(1, 4))
            info["out_features"] = new_out
            row_bytes = tensors[f"{name}.codes"][1][1]
            tensors[f"{name}.codes"] = ["U8", [new_out, row_bytes], rng.bytes(new_out * row_bytes)]
            groups = -(-new_out * in_f // info["group_size"])
            if info["double_quant"]:
                tensors[f"{name}.qscales"] = ["U8", [groups], rng.bytes(groups)]
                tensors[f"{name}.nested_scales"] = ["F32", [-(-groups // 256)],
                                                    f32(-(-groups // 256))]
            else:
                tensors[f"{name}.scales"] = ["F32", [groups], f32(groups)]
            tensors[f"{name}.lora_b"] = ["F32", [new_out, info["rank"]], f32(new_out, info["rank"])]
            if info["bias"]:
                tensors[f"{name}.bias"] = ["F32", [new_out], f32(new_out)]
        meta = dict(header["__metadata__"], layers=json.dumps(layers))
        return st_write([(k, v[0], v[1], v[2]) for k, v in tensors.items()], meta)

    def run(self, data: bytes, seed: int) -> str:
        import qlora
        from qlora import QLoraLinear

        with open(self.path, "wb") as f:
            f.write(data)
        if seed % 4 == 3:  # one layer through QLoraLinear.load
            try:
                layers = {"layer": QLoraLinear.load(self.path, mmap=self.mmap)}
            except (ValueError, OSError) as exc:
                if "use qlora.load_layers" not in str(exc):
                    raise
                layers = qlora.load_layers(self.path, mmap=self.mmap)
        else:
            layers = qlora.load_layers(self.path, mmap=self.mmap)
        rng = self.rng(seed + 1_000_000_007)
        for layer in layers.values():
            check_layer(layer, rng)
            repr(layer)
        return "loaded"


class BnbDicts(Family):
    kinds = ["drop_key", "dtype", "shape", "value_type", "qs_field", "qs_text", "qs_key",
             "array_bytes", "nonfinite", "extra_prefix", "consistent_edit"]

    def __init__(self, number, tmpdir):
        super().__init__(number, tmpdir)
        self.bases = bnb_base_states()

    def make(self, seed: int) -> tuple[str, dict]:
        rng = self.rng(seed)
        kind = self.kind(seed)
        prefix, base = _pick(rng, self.bases)
        sd = {k: v.copy() for k, v in base.items()}
        qkey = prefix + "weight.quant_state.bitsandbytes__nf4"
        keys = sorted(sd)
        key = _pick(rng, keys)
        if kind == "drop_key":
            del sd[key]
        elif kind == "dtype":
            dt = _pick(rng, [np.float16, np.float64, np.int8, np.int32, np.int64, np.uint16,
                             np.uint32, np.bool_, np.complex64, object, "U4", "S4", ">f4",
                             ">u2", "V4", "M8[s]", np.float32, np.uint8])
            try:
                sd[key] = sd[key].astype(dt)
            except (TypeError, ValueError):
                sd[key] = np.zeros(sd[key].shape, dtype=dt)
        elif kind == "shape":
            arr = sd[key]
            op = int(rng.integers(6))
            if op == 0:
                sd[key] = arr.reshape(-1)[:-1] if arr.size else arr
            elif op == 1:
                sd[key] = np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]])
            elif op == 2:
                sd[key] = arr.reshape((1, 1, -1))
            elif op == 3:
                sd[key] = arr.reshape(-1)[0] if arr.size else arr
            elif op == 4:
                sd[key] = np.broadcast_to(arr.reshape(-1)[:1], (arr.size,))  # stride 0
            else:
                sd[key] = np.repeat(arr.reshape(-1), 2)[::2]  # strided view
        elif kind == "value_type":
            sd[key] = _pick(rng, [None, [], [1, 2], "abc", 3, 2.5, {"a": 1}, b"\x00\x01",
                                  [[1], [1, 2]], object(), np.float32(1.0), True])
        elif kind in ("qs_field", "qs_text"):
            qs = json.loads(bytes(sd[qkey]).decode())
            if kind == "qs_field":
                field = _pick(rng, list(qs) + ["shape", "nested_offset", "nested_blocksize",
                                               "unknown"])
                qs[field] = _pick(rng, HOSTILE_VALUES)
                raw = json.dumps(qs).encode("utf-8", "surrogatepass")
            else:
                raw = _hostile_json_text(rng, json.dumps(qs))
            sd[qkey] = np.frombuffer(raw, dtype=np.uint8).copy()
        elif kind == "qs_key":
            raw = sd.pop(qkey)
            new = _pick(rng, ["fp4", "nf4x", "", "NF4", "nf4.extra"])
            sd[prefix + "weight.quant_state.bitsandbytes__" + new] = raw
            if rng.integers(2):
                sd[qkey] = raw
        elif kind == "array_bytes":
            arr = np.ascontiguousarray(sd[key]).copy()
            raw = arr.view(np.uint8).reshape(-1)
            for _ in range(int(rng.integers(1, 6))):
                if raw.size:
                    raw[int(rng.integers(raw.size))] ^= np.uint8(1 << int(rng.integers(8)))
            sd[key] = arr
        elif kind == "nonfinite":
            f32 = [k for k in keys if sd[k].dtype == np.float32 and sd[k].size]
            k = _pick(rng, f32)
            arr = sd[k].copy()
            arr.reshape(-1)[int(rng.integers(arr.size))] = _pick(
                rng, [np.nan, np.inf, -np.inf, F32_MAX, -F32_MAX, 1e-45, -1.0, 0.0, 1e30])
            sd[k] = arr
        elif kind == "consistent_edit":  # another shape/block size, every array to match
            qs = json.loads(bytes(sd[qkey]).decode())
            out_f, in_f = int(rng.integers(1, 20)), int(rng.integers(1, 70))
            bs = _pick(rng, [1, 3, 32, 64, 4096, out_f * in_f, 2 ** 40, 2 ** 62])
            n = out_f * in_f
            groups = -(-n // bs)
            qs.update(shape=[out_f, in_f], blocksize=bs)
            sd[prefix + "weight"] = np.frombuffer(rng.bytes((n + 1) // 2), np.uint8).reshape(-1, 1)
            if "nested_offset" in qs:
                sd[prefix + "weight.absmax"] = np.frombuffer(rng.bytes(groups), np.uint8).copy()
                sd[prefix + "weight.nested_absmax"] = np.abs(
                    rng.standard_normal(-(-groups // 256))).astype(np.float32)
            else:
                sd[prefix + "weight.absmax"] = np.abs(rng.standard_normal(groups)).astype(
                    np.float32)
            if prefix + "bias" in sd or rng.integers(2):
                sd[prefix + "bias"] = rng.standard_normal(out_f).astype(np.float32)
            sd[qkey] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
        else:  # extra_prefix: keys under another prefix, or the prefix missing
            sd = {("other." + k if rng.integers(2) else k[len(prefix):]): v
                  for k, v in sd.items()}
        return prefix, sd

    def run(self, case: tuple[str, dict], seed: int) -> str:
        from qlora import QLoraLinear

        prefix, sd = case
        layer = QLoraLinear.from_bnb(sd, prefix, rank=1, alpha=2.0)
        layer.set_lora_b(self.rng(seed + 7).standard_normal((layer.out_features, 1)))
        return check_layer(layer, self.rng(seed + 1_000_000_007))


class BnbFiles(BnbDicts):
    kinds = ST_KINDS

    def __init__(self, number, tmpdir):
        super().__init__(number, tmpdir)
        self.files = [(p, st_write([(k, _st_dtype(v), list(v.shape), v.tobytes())
                                    for k, v in sd.items()])) for p, sd in self.bases]
        self.path = os.path.join(tmpdir, f"case_{number}.safetensors")

    def make(self, seed: int) -> tuple[str, bytes]:
        rng = self.rng(seed)
        prefix, data = _pick(rng, self.files)
        return prefix, mutate_safetensors(data, rng, self.kind(seed),
                                          [d for _, d in self.files])

    def run(self, case: tuple[str, bytes], seed: int) -> str:
        from safetensors.numpy import load_file

        prefix, data = case
        with open(self.path, "wb") as f:
            f.write(data)
        try:
            sd = load_file(self.path)
        except Exception:  # the third-party reader's own refusal (SafetensorError, ...)
            return "rejected_by_safetensors"
        return super().run((prefix, sd), seed)


def _st_dtype(arr: np.ndarray) -> str:
    return {"float32": "F32", "uint8": "U8", "float16": "F16"}[arr.dtype.name]


PEFT_FIELDS = sorted(set(PEFT_CONFIG) | {"lora_bias", "use_qalora", "layer_replication",
                                         "target_parameters", "unknown_option"})


class PeftFolders(Family):
    kinds = ["cfg_field", "cfg_field", "cfg_pattern", "cfg_text", "cfg_bytes", "tensor_edit",
             "files"] + ST_KINDS

    def __init__(self, number, tmpdir):
        super().__init__(number, tmpdir)
        self.config = json.dumps(PEFT_CONFIG, indent=2)
        self.weights = peft_base_weights()
        self.folder = os.path.join(tmpdir, f"peft_{number}")

    def make(self, seed: int) -> dict:
        """{"config": bytes or None or "dir", "weights": bytes or None or "dir"}."""
        rng = self.rng(seed)
        kind = self.kind(seed)
        cfg = json.loads(self.config)
        case = {"config": self.config.encode(), "weights": self.weights}
        if kind == "cfg_field":
            field = _pick(rng, PEFT_FIELDS)
            cfg[field] = _pick(rng, HOSTILE_VALUES)
            case["config"] = json.dumps(cfg).encode("utf-8", "surrogatepass")
        elif kind == "cfg_pattern":
            field = _pick(rng, ["rank_pattern", "alpha_pattern"])
            key = _pick(rng, ["v_proj", "q_proj", ".*", "(", "[", "a{99999999999}",
                              "a{4294967296}", "(?P<x>", "\\", "*", "v_proj|", "(a+)+",
                              "layers\\.1\\..*", "", "model.layers.0.self_attn.q_proj",
                              "(?i)Q_PROJ", "\\d+", "(?<=x)y", "x" * 1000,
                              "(" * 5000 + ")" * 5000, "(?:" * 300 + "x" + ")" * 300])
            value = _pick(rng, HOSTILE_VALUES + [2, 4, 3.0, 8])
            pats = cfg.get(field) or {}
            pats = {key: value, **pats} if rng.integers(2) else {**pats, key: value}
            cfg[field] = pats
            case["config"] = json.dumps(cfg).encode("utf-8", "surrogatepass")
        elif kind == "cfg_text":
            case["config"] = _hostile_json_text(rng, self.config)
        elif kind == "cfg_bytes":
            case["config"] = _bytes_havoc(self.config.encode(), rng)
        elif kind == "tensor_edit":
            case["weights"] = self._tensor_edit(rng)
        elif kind == "files":
            op = int(rng.integers(6))
            if op == 0:
                case["config"] = None
            elif op == 1:
                case["weights"] = None
            elif op == 2:
                case["config"] = "dir"
            elif op == 3:
                case["weights"] = "dir"
            elif op == 4:
                case["config"] = b""
            else:
                case["weights"] = b""
        else:
            case["weights"] = mutate_safetensors(self.weights, rng, kind, [self.weights])
        return case

    def _tensor_edit(self, rng) -> bytes:
        tensors = []
        gen = np.random.default_rng(int(rng.integers(1 << 30)))
        for module, r, in_f, out_f, dt in PEFT_MODULES:
            tensors.append([f"base_model.model.{module}.lora_A.weight", dt, [r, in_f]])
            tensors.append([f"base_model.model.{module}.lora_B.weight", dt, [out_f, r]])
        t = _pick(rng, tensors)
        op = int(rng.integers(8))
        if op == 0:  # rank mismatch / other shapes
            t[2] = _pick(rng, [[t[2][0] + 1, t[2][1]], [t[2][0], t[2][1] + 1], [0, t[2][1]],
                               [t[2][0], 0], [t[2][0] * t[2][1]], [1, 1, t[2][0] * t[2][1]],
                               [0, 0], []])
        elif op == 1:
            t[1] = _pick(rng, ["F64", "F16", "BF16", "I32", "U8", "I8", "BOOL", "F8_E4M3"])
        elif op == 2:
            tensors.remove(t)
        elif op == 3:
            t[0] = _pick(rng, ["base_model.model.model.embed_tokens.lora_embedding_A",
                               "base_model.model.x.lora_magnitude_vector", "unrelated.weight",
                               t[0].replace("base_model.model.", ""), t[0] + ".x",
                               t[0].replace("lora_A", "lora_B")])
        elif op == 4:  # all modules rank 0 (empty A and B)
            for x in tensors:
                x[2] = [0, x[2][1]] if "lora_A" in x[0] else [x[2][0], 0]
        elif op == 5:  # non-finite values
            t.append(_pick(rng, [np.nan, np.inf, -np.inf, 1e39, 70000.0]))
        elif op == 6:  # a module with a long name (path-like, unicode)
            for x in tensors[:2]:
                x[0] = x[0].replace("model.layers.0.self_attn.q_proj",
                                    _pick(rng, ["a" * 300, "é.ü", "a..b", ".", "1.2.3"]))
        else:  # an extra module of a different rank than r (no pattern for it)
            tensors.append(["base_model.model.extra.lora_A.weight", "F32", [3, 5]])
            tensors.append(["base_model.model.extra.lora_B.weight", "F32", [4, 3]])
        out = []
        for entry in tensors:
            name, dt, shape = entry[:3]
            arr = gen.standard_normal(int(np.prod(shape)) if shape else 1) * 0.1
            if len(entry) > 3:
                arr[0] = entry[3]
            if dt in ("F32", "F16", "F64", "BF16"):
                with np.errstate(over="ignore"):
                    raw = _encode(arr, dt)
            else:
                width = {"I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1}[dt]
                raw = bytes(arr.size * width)
            out.append((name, dt, shape, raw))
        return st_write(out, {"format": "pt"})

    def run(self, case: dict, seed: int) -> str:
        import shutil

        import qlora
        from qlora import QLoraLinear

        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder)
        for name, key in (("adapter_config.json", "config"),
                          ("adapter_model.safetensors", "weights")):
            value = case[key]
            path = os.path.join(self.folder, name)
            if value == "dir":
                os.makedirs(path)
            elif value is not None:
                with open(path, "wb") as f:
                    f.write(value)
        adapters = qlora.load_peft_adapter(self.folder)
        rng = self.rng(seed + 1_000_000_007)
        for name, lw in adapters.items():
            a, b = lw.a, lw.b
            if not (isinstance(lw.scaling, float) and F32_TINY <= lw.scaling <= F32_MAX):
                raise Inconsistent("bad_scaling", f"{name}: scaling {lw.scaling!r} is not a "
                                   "normal float32 > 0")
            if (a.dtype != np.float32 or b.dtype != np.float32 or a.ndim != 2 or b.ndim != 2
                    or b.shape[1] != a.shape[0] or a.shape[0] != lw.rank or lw.rank < 1
                    or not np.isfinite(a).all() or not np.isfinite(b).all()):
                raise Inconsistent("bad_adapter", f"{name}: {a.dtype} {a.shape}, {b.dtype} "
                                   f"{b.shape}, rank {lw.rank}")
            if a.shape[1] == 0 or b.shape[0] == 0:
                continue
            w = rng.standard_normal((b.shape[0], a.shape[1])).astype(np.float32)
            layer = QLoraLinear.from_weight(w, rank=1, group_size=8)
            layer.load_adapter(lw)
            check_layer(layer, rng)
        return "loaded"


class SelfTest(Family):
    """Cases that misbehave on purpose, to prove the harness sees each kind of failure."""

    kinds = ["ok", "rejected", "crash", "hang", "huge_allocation", "type_error"]

    def make(self, seed: int) -> str:
        return self.kind(seed)

    def run(self, case: str, seed: int) -> str:
        if case == "rejected":
            raise ValueError("rejected on purpose")
        if case == "crash":
            import ctypes

            ctypes.string_at(0)  # SIGSEGV
        if case == "hang":
            while True:
                time.sleep(1)
        if case == "huge_allocation":
            np.ones(1 << 31, dtype=np.uint8)  # 2 GiB > the address-space limit
        if case == "type_error":
            raise TypeError("a wrong exception type")
        return "loaded"


def make_family(name: str, tmpdir: str) -> Family:
    if name == "selftest":
        return SelfTest(99, tmpdir)
    number = FAMILIES.index(name)
    if name == "qlora_mmap":
        return QloraFiles(number, tmpdir, mmap=True)
    if name == "qlora_read":
        return QloraFiles(number, tmpdir, mmap=False)
    if name == "bnb_dict":
        return BnbDicts(number, tmpdir)
    if name == "bnb_file":
        return BnbFiles(number, tmpdir)
    return PeftFolders(number, tmpdir)


# ------------------------------------------------------------------------------ one case
def run_case(fam: Family, seed: int) -> tuple[str, str]:
    """(outcome, detail) of one case, in this process."""
    try:
        case = fam.make(seed)
    except Exception as exc:  # a bug in the generator, not in qlora: report it loudly
        return "generator_error", f"{type(exc).__name__}: {exc}"
    try:
        return fam.run(case, seed), ""
    except (ValueError, OSError) as exc:
        return "rejected", f"{type(exc).__name__}: {str(exc)[:200]}"
    except Inconsistent as exc:
        return exc.outcome, str(exc)[:300]
    except MemoryError as exc:
        return "memory", f"MemoryError: {str(exc)[:200]}"
    except Exception as exc:
        return f"exception:{type(exc).__name__}", f"{type(exc).__name__}: {str(exc)[:300]}"


def child_main(family: str, start: int, count: int, verbose: bool = False) -> None:
    """Run cases start..start+count-1 of one family; one JSON line per finished case.

    The address space is limited (a huge allocation becomes MemoryError, reported as the
    ``memory`` outcome) and every case runs under a real-time alarm whose default action kills
    the process (so even a loop in C code ends; the parent reports the case as a hang).
    """
    import faulthandler
    import warnings

    warnings.simplefilter("ignore")  # NumPy overflow warnings on purpose-made extreme values
    faulthandler.enable()
    # Under AddressSanitizer (.ci/sanitize_pytest.sh) the shadow memory cannot live under an
    # address-space limit; there the parent caps single allocations through ASAN_OPTIONS
    # instead (max_allocation_size_mb), so a huge allocation still becomes MemoryError.
    if not asan_loaded():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    sys.setrecursionlimit(1000)
    tmpdir = tempfile.mkdtemp(prefix="qlora-fuzz-")
    fam = make_family(family, tmpdir)
    out = sys.stdout
    for seed in range(start, start + count):
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
        if verbose:
            try:
                print(fam.run(fam.make(seed), seed))
            except Exception:
                traceback.print_exc()
            signal.setitimer(signal.ITIMER_REAL, 0)
            continue
        outcome, detail = run_case(fam, seed)
        signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps({"seed": seed, "kind": fam.kind(seed), "outcome": outcome,
                              "detail": detail, "ms": round(1e3 * (time.perf_counter() - t0),
                                                            2)}) + "\n")
        out.flush()
    with open("/proc/self/status") as f:
        status = {ln.split(":")[0]: ln.split(":")[1].strip() for ln in f}
    out.write(json.dumps({"done": True, "VmPeak": status.get("VmPeak"),
                          "VmHWM": status.get("VmHWM")}) + "\n")
    out.flush()


def write_case(family: str, seed: int, outdir: str) -> None:
    """Write the damaged input of one case into ``outdir`` (to look at or to report)."""
    os.makedirs(outdir, exist_ok=True)
    fam = make_family(family, tempfile.mkdtemp())
    case = fam.make(seed)
    if isinstance(case, bytes):
        path = os.path.join(outdir, f"{family}-{seed}.safetensors")
        with open(path, "wb") as f:
            f.write(case)
    elif isinstance(case, dict) and "config" in case:
        for name, key in (("adapter_config.json", "config"),
                          ("adapter_model.safetensors", "weights")):
            if isinstance(case[key], bytes):
                with open(os.path.join(outdir, name), "wb") as f:
                    f.write(case[key])
        path = outdir
    else:
        prefix, payload = case
        path = os.path.join(outdir, f"{family}-{seed}.txt")
        with open(path, "w") as f:
            f.write(f"prefix={prefix!r}\n{payload!r}\n")
    print(path)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "run":
        child_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "-v" in sys.argv)
    elif cmd == "write":
        write_case(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"unknown command {cmd!r}")
