"""A small, defensive reader and writer of the safetensors format, in NumPy only (no torch, no
pickle).

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` of string values, then the data section.

The reader checks every size, offset, dtype and shape against the header and the file size
before it maps or allocates anything, so a damaged or hostile file raises ``ValueError`` naming
the file and the field. With ``mmap=True`` tensors are read-only views of one shared read-only
mapping of the file: nothing is copied, and processes mapping the same file share its pages.
The writer writes to a temporary file in the target directory and renames it over the target,
so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import json
import mmap as _mmap
import os
import stat
import struct
import tempfile
from typing import IO, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

__all__ = ["SafetensorsFile", "TensorInfo", "bf16_to_float32", "bits_of", "nbytes_of",
           "no_duplicates", "require_regular_file", "write_safetensors"]

# Header limits. The format allows 100 MB of header; qlora reads at most 16 MiB and 131,072
# tensors. Parsing JSON costs many times its size in Python objects: ~20x for tensor entries
# kept as dicts and lists (a 100 MB header took > 1 GiB), ~4x now that each entry becomes a
# compact tuple as it is parsed, and up to ~25x for hostile JSON (e.g. a list of empty lists,
# which the parser builds before any check sees it), so the cap bounds a header to ~400 MB in
# the worst case. Real files are far below it: Hugging Face shards of 70B-class models have
# headers of tens of KB (MoE shards with ~1,000 tensors a few hundred KB), and ``qlora
# quantize`` of a whole model in one file writes 3,520 tensors in 0.53 MB of header for a
# Llama-3-70B shape, 5,544 in 0.85 MB for 405B and 5,632 in 0.9 MB for Mixtral-8x7B: 18x
# headroom or more. (A fine-grained MoE merged into one file, e.g. 128 experts x 48 layers,
# would need 18 MB: quantize such models shard by shard.) The writer refuses to write a file
# beyond these limits, so qlora never writes a file it cannot read.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 1 << 17
MAX_NDIM = 16
_WHY_LIMITS = ("qlora reads safetensors headers of at most 16 MiB and 131072 tensors (the format "
               "allows 100 MB) to bound the memory a hostile header can take; real checkpoints "
               "and qlora's own files stay far below")

# safetensors dtype name -> NumPy dtype (little-endian). BF16 has no NumPy dtype: its raw
# 16-bit patterns are exposed as uint16 (see bf16_to_float32).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Every dtype the format defines, by bits per element. Those without a NumPy dtype above (8-,
# 6- and 4-bit floats, complex64) are carried and measured but never interpreted: their bytes
# can be copied (`raw`) byte-exactly. A tensor of `n` elements of `b` bits takes
# ceil(n * b / 8) bytes (sub-byte elements are packed, the last byte padded).
#
# A dtype name not in this table is refused with an error naming the tensor and the dtype: its
# element width is unknown, so its byte size, and thus its offsets, could not be checked, and
# a file we cannot check is not carried through.
_BITS: dict[str, int] = {
    **{name: 8 * dt.itemsize for name, dt in _DTYPES.items()},
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64,
}

_NUMPY_TO_ST = {
    np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64", np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}


def require_regular_file(path: str) -> None:
    """Raise ValueError unless `path` (after symlinks) is a regular file: a FIFO would block
    ``open`` forever and a device such as /dev/zero would be read without end. OSError if it
    does not exist."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path}: is a directory, expected a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket)")


def bits_of(dtype: str) -> int | None:
    """Bits per element of a safetensors dtype name, or None if the name is unknown."""
    return _BITS.get(dtype)


def nbytes_of(dtype: str, count: int) -> int:
    """Bytes of `count` elements of a known dtype: ``ceil(count * bits / 8)``."""
    return -(-count * _BITS[dtype] // 8)


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32, exactly (bf16 is the top half)."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class TensorInfo(NamedTuple):
    """One header entry, validated: dtype name, shape, and [begin, end) in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def no_duplicates(pairs: list) -> dict:
    """``object_pairs_hook`` for json.loads: a key given twice is a ValueError."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(v: object) -> bool:
    return type(v) is int


class _TooManyTensors(Exception):
    pass


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
# The table's own strings, so every entry shares one "F32" object instead of holding a copy.
_DTYPE_NAMES = {name: name for name in _BITS}


class _Entry(NamedTuple):
    """A header entry checked as it was parsed: ``info`` is (dtype, shape, begin, end), or
    ``problem`` is (field suffix, message) for the caller to report under the entry's name."""

    info: tuple | None
    problem: tuple[str, str] | None


class _EntryHook:
    """``object_pairs_hook`` that turns each tensor entry into a compact checked :class:`_Entry`
    while ``json.loads`` parses (so no dict and lists per tensor stay alive), counts entries
    (stopping the parse beyond :data:`MAX_TENSORS`) and refuses duplicate keys."""

    def __init__(self, data_size: int) -> None:
        self.data_size = data_size
        self.count = 0

    def __call__(self, pairs: list) -> object:
        if len(pairs) != 3 or {k for k, _ in pairs} != _ENTRY_KEYS:
            return no_duplicates(pairs)
        self.count += 1
        if self.count > MAX_TENSORS:
            raise _TooManyTensors
        entry = dict(pairs)
        try:
            return _Entry(self.check(entry["dtype"], entry["shape"], entry["data_offsets"]),
                          None)
        except _EntryProblem as exc:
            return _Entry(None, exc.args)

    def check(self, dtype: object, shape: object, offsets: object) -> tuple:
        if not isinstance(dtype, str):
            raise _EntryProblem(" dtype", f"must be a string, got {dtype!r:.80}")
        bits = bits_of(dtype)
        if bits is None:
            raise _EntryProblem(" dtype", f"unknown dtype {dtype!r:.80}: its element size is "
                                f"unknown, so its data_offsets cannot be checked (known: "
                                f"{', '.join(sorted(_BITS))})")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise _EntryProblem(" shape", f"must be a list of at most {MAX_NDIM} non-negative "
                                f"integers, got {shape!r:.200}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise _EntryProblem(" data_offsets", f"must be [begin, end] non-negative integers, "
                                f"got {offsets!r:.200}")
        begin, end = offsets
        if begin > end or end > self.data_size:
            raise _EntryProblem(" data_offsets", f"[{begin}, {end}] is not a range inside the "
                                f"{self.data_size} bytes of data")
        count = nonzero = 1
        for d in shape:  # Python ints: no overflow (at most 16 factors)
            count *= d
            nonzero *= max(d, 1)
        if nonzero * bits >= 2 ** 66:  # NumPy cannot even describe such an array
            raise _EntryProblem(" shape", f"{shape} is too large")
        need = nbytes_of(dtype, count)
        if need != end - begin:
            raise _EntryProblem(" shape", f"shape {shape} of {dtype} needs {need} bytes, but "
                                f"data_offsets give {end - begin}")
        return _DTYPE_NAMES[dtype], tuple(shape), begin, end


class _EntryProblem(Exception):
    pass


class SafetensorsFile:
    """A validated safetensors file: its header, metadata and (lazily) its tensors.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    mmap : bool, default True
        Map the file read-only and return zero-copy views; otherwise read the data section into
        memory once (after the header has been validated against the file size).
    header_only : bool, default False
        Read and validate the header only; :meth:`array` is then unavailable.

    Raises
    ------
    OSError
        If the file cannot be opened or read (missing, a directory, permissions).
    ValueError
        If anything in it is inconsistent; the message names the file and the field.
    """

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True,
                 header_only: bool = False) -> None:
        self.path = os.fspath(path)
        require_regular_file(self.path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.file_size = size
            self._parse_header(f, size)
            if header_only:
                self._buffer, self._base = None, 0
            elif mmap:
                if self.data_size:
                    self._buffer: object = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
                else:
                    self._buffer = b""
                self._base = self.data_start
            else:
                f.seek(self.data_start)
                data = f.read(self.data_size)
                if len(data) != self.data_size:
                    raise self.error("data", f"file shrank while reading: expected "
                                     f"{self.data_size} bytes of data, read {len(data)}")
                self._buffer = data
                self._base = 0

    # ------------------------------------------------------------------ header
    def error(self, field: str, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {field}: {msg}")

    def _parse_header(self, f: IO[bytes], size: int) -> None:
        if size < 8:
            raise self.error("header length", f"file is {size} bytes, too short to be a "
                             "safetensors file (needs at least the 8-byte header length)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2:
            raise self.error("header length", f"{n} is below 2; not a safetensors file or a "
                             "damaged one")
        if n > MAX_HEADER_BYTES:
            raise self.error("header length", f"{n} bytes is above qlora's limit of "
                             f"{MAX_HEADER_BYTES} ({_WHY_LIMITS}); not a safetensors file, a "
                             "damaged one, or one with an unusually large header")
        if n > size - 8:
            raise self.error("header length", f"header of {n} bytes does not fit in a file of "
                             f"{size} bytes (truncated?)")
        raw = f.read(n)
        if len(raw) != n:
            raise self.error("header", f"expected {n} bytes, read {len(raw)}")
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        hook = _EntryHook(self.data_size)
        try:
            text = raw.decode("utf-8")
            del raw
            header = json.loads(text, object_pairs_hook=hook)
        except _TooManyTensors:
            raise self.error("header", f"holds more than {MAX_TENSORS} tensors "
                             f"({_WHY_LIMITS})") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self.error("header", f"not valid UTF-8 JSON ({exc})") from None
        del text
        if not isinstance(header, dict):
            raise self.error("header", f"must be a JSON object, got {type(header).__name__}")

        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self.error("__metadata__", "must be an object of string values")
        self.metadata: dict[str, str] = meta

        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if not isinstance(entry, _Entry):
                raise self.error(f"tensor {name!r}", "must be an object with exactly dtype, "
                                 "shape, data_offsets")
            if entry.problem is not None:
                field, msg = entry.problem
                raise self.error(f"tensor {name!r}{field}", msg)
            tensors[name] = TensorInfo(name, *entry.info)
        del header
        # The data section must be exactly covered by the tensors, in order, without gaps or
        # overlaps (as the reference implementation requires).
        pos = 0
        for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
            if info.begin != pos:
                what = "overlaps the previous tensor" if info.begin < pos else "leaves a gap"
                raise self.error(f"tensor {info.name!r} data_offsets",
                                 f"begins at {info.begin}, expected {pos} ({what})")
            pos = info.end
        if pos != self.data_size:
            raise self.error("data", f"tensors cover {pos} bytes but the file holds "
                             f"{self.data_size} bytes of data (truncated or padded file)")
        self.tensors = tensors

    # ------------------------------------------------------------------ data
    def array(self, name: str) -> np.ndarray:
        """A read-only NumPy view of tensor ``name`` (BF16 as raw uint16).

        Raises
        ------
        KeyError
            If there is no such tensor.
        ValueError
            If its dtype has no NumPy equivalent (8-, 6- and 4-bit floats, complex64).
        """
        info = self.tensors[name]
        if self._buffer is None:
            raise RuntimeError("opened with header_only=True")
        if info.dtype not in _DTYPES:
            raise self.error(f"tensor {name!r} dtype", f"{info.dtype} cannot be read as NumPy")
        dt = _DTYPES[info.dtype]
        count = info.nbytes // dt.itemsize
        if count == 0:
            arr = np.empty(info.shape, dtype=dt)
            arr.setflags(write=False)
            return arr
        arr = np.frombuffer(self._buffer, dtype=dt, count=count, offset=self._base + info.begin)
        arr = arr.reshape(info.shape)
        if not arr.flags.aligned:  # a foreign writer may misalign; the C++ core needs alignment
            arr = arr.copy()
        arr.setflags(write=False)
        return arr

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor ``name`` as a read-only uint8 view (any dtype, sub-byte ones too)."""
        info = self.tensors[name]
        if self._buffer is None:
            raise RuntimeError("opened with header_only=True")
        if info.nbytes == 0:
            arr = np.empty(0, dtype=np.uint8)
        else:
            arr = np.frombuffer(self._buffer, dtype=np.uint8, count=info.nbytes,
                                offset=self._base + info.begin)
        arr.setflags(write=False)
        return arr


def _st_dtype(arr: np.ndarray, declared: str | None) -> str:
    if declared is not None:
        return declared
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    try:
        return _NUMPY_TO_ST[np.dtype(dt)]
    except KeyError:
        raise TypeError(f"cannot store dtype {arr.dtype} in safetensors") from None


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray, str | None]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write tensors to ``path`` atomically (temporary file in the same directory + rename).

    Parameters
    ----------
    path : str or os.PathLike
    tensors : iterable of (name, array, dtype_name_or_None) or (name, array, dtype_name, shape)
        ``dtype_name`` overrides the stored dtype name (e.g. ``"BF16"`` for raw uint16 data);
        with a ``shape`` the array is raw bytes of that shape and dtype (``ceil(elements *
        bits / 8)`` bytes). Tensors are laid out widest dtype first, so every tensor of a
        NumPy dtype is aligned to its itemsize.
    metadata : mapping of str to str, optional

    Returns
    -------
    int
        The size of the file written.

    Raises
    ------
    ValueError
        If a name or a size is invalid, or the header would exceed :data:`MAX_TENSORS` or
        :data:`MAX_HEADER_BYTES` (the reader's limits); nothing is written then.
    """
    items = []
    for entry in tensors:
        name, arr, declared = entry[:3]
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        arr = np.asarray(arr)
        st = _st_dtype(arr, declared)
        shape = tuple(int(d) for d in (entry[3] if len(entry) > 3 else arr.shape))
        bits = bits_of(st)
        if bits is None or nbytes_of(st, int(np.prod(shape, dtype=object))) != arr.nbytes:
            raise ValueError(f"tensor {name!r}: {arr.nbytes} bytes do not make {st} {shape}")
        items.append((name, arr, st, shape, bits))
    names = [t[0] for t in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    items.sort(key=lambda t: (-t[4], t[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, arr, st, shape, _ in items:
        header[name] = {"dtype": st, "shape": list(shape),
                        "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
    if len(items) > MAX_TENSORS or len(blob) > MAX_HEADER_BYTES:
        raise ValueError(f"{os.fspath(path)}: {len(items)} tensors in a header of {len(blob)} "
                         f"bytes: {_WHY_LIMITS}, so this file could not be read back; write "
                         "fewer tensors per file")

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".qlora-", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for item in items:
                for chunk in _chunks(item[1]):
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return 8 + len(blob) + pos


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _chunks(arr: np.ndarray, chunk: int = 1 << 24) -> Iterator[memoryview]:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, chunk):
        yield memoryview(flat[i:i + chunk])
