"""
qlora C++ core: NF4 quantization and the fused QLoRA forward (private module).
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['BATCH_CHUNK', 'BLOCK_COLS', 'NESTED_BLOCK', 'NF4_CODEBOOK', 'Nf4Tensor', 'active_isa', 'available_isas', 'backward', 'codes_from_bnb', 'codes_to_bnb', 'compiled_isas', 'default_num_threads', 'dequantize_nf4', 'dropout_mask', 'forward', 'forward_adapters', 'forward_train', 'gemm_choice', 'get_num_threads', 'group_count', 'input_grad', 'kernel_info', 'packed_bytes', 'quantize_nf4', 'set_isa', 'set_num_threads', 'thread_pool_info']
class Nf4Tensor:
    def __init__(self, codes: numpy.typing.NDArray[numpy.uint8], scales: numpy.typing.NDArray[numpy.float32] | None, qscales: numpy.typing.NDArray[numpy.uint8] | None, nested_scales: numpy.typing.NDArray[numpy.float32] | None, nested_map: numpy.typing.NDArray[numpy.float32] | None, nested_offset: typing.SupportsFloat | typing.SupportsIndex, out_features: typing.SupportsInt | typing.SupportsIndex, in_features: typing.SupportsInt | typing.SupportsIndex, group_size: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def group_size(self) -> int:
        ...
    @property
    def in_features(self) -> int:
        ...
    @property
    def num_groups(self) -> int:
        ...
    @property
    def out_features(self) -> int:
        ...
def active_isa() -> str:
    ...
def available_isas() -> list[str]:
    ...
def backward(tensor: Nf4Tensor, x: numpy.typing.NDArray[numpy.float32] | None, lora_a: numpy.typing.NDArray[numpy.float32], lora_b: numpy.typing.NDArray[numpy.float32], scaling: typing.SupportsFloat | typing.SupportsIndex, u: numpy.typing.NDArray[numpy.float32] | None, grad_y: numpy.typing.NDArray[numpy.float32], dx: numpy.typing.NDArray[numpy.float32] | None = None, da: numpy.typing.NDArray[numpy.float32] | None = None, db: numpy.typing.NDArray[numpy.float32] | None = None, dbias: numpy.typing.NDArray[numpy.float32] | None = None, dropout: typing.SupportsFloat | typing.SupportsIndex = 0.0, seed: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
    """
    LoRA backward: writes each gradient given (dx, da, db, dbias) for upstream grad_y.
    """
def codes_from_bnb(flat: numpy.typing.NDArray[numpy.uint8], out_features: typing.SupportsInt | typing.SupportsIndex, in_features: typing.SupportsInt | typing.SupportsIndex, codes: numpy.typing.NDArray[numpy.uint8]) -> None:
    """
    Convert bitsandbytes flat packing into qlora's packed rows.
    """
def codes_to_bnb(codes: numpy.typing.NDArray[numpy.uint8], out_features: typing.SupportsInt | typing.SupportsIndex, in_features: typing.SupportsInt | typing.SupportsIndex, flat: numpy.typing.NDArray[numpy.uint8]) -> None:
    """
    Convert qlora's packed rows into bitsandbytes flat packing.
    """
def compiled_isas() -> list[str]:
    ...
def default_num_threads() -> int:
    ...
def dequantize_nf4(tensor: Nf4Tensor, out: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    Write the dequantized float32 weight into out.
    """
def dropout_mask(batch: typing.SupportsInt | typing.SupportsIndex, in_features: typing.SupportsInt | typing.SupportsIndex, dropout: typing.SupportsFloat | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex, out: numpy.typing.NDArray[numpy.uint8]) -> None:
    """
    The training forward's dropout keep mask (uint8).
    """
def forward(tensor: Nf4Tensor, x: numpy.typing.NDArray[numpy.float32], lora_a: numpy.typing.NDArray[numpy.float32], lora_b: numpy.typing.NDArray[numpy.float32], scaling: typing.SupportsFloat | typing.SupportsIndex, bias: numpy.typing.NDArray[numpy.float32] | None, out: numpy.typing.NDArray[numpy.float32], precision: str = 'fp32', isa: str | None = None) -> None:
    """
    Fused x @ deq(W).T + scaling * (x @ A.T) @ B.T + bias into out, in the given precision (isa: run that instruction set's own product kernel, for tests).
    """
def forward_adapters(tensor: Nf4Tensor, x: numpy.typing.NDArray[numpy.float32], segments: collections.abc.Sequence[tuple[typing.Annotated[numpy.typing.ArrayLike, numpy.float32], typing.Annotated[numpy.typing.ArrayLike, numpy.float32], typing.SupportsFloat | typing.SupportsIndex, typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None]], bias: numpy.typing.NDArray[numpy.float32] | None, out: numpy.typing.NDArray[numpy.float32], precision: str = 'fp32', isa: str | None = None) -> None:
    """
    x @ deq(W).T + bias plus, for each (lora_a, lora_b, scaling, rows, row_scale) segment, its LoRA term on its rows (all rows when rows is None), into out.
    """
def forward_train(tensor: Nf4Tensor, x: numpy.typing.NDArray[numpy.float32], lora_a: numpy.typing.NDArray[numpy.float32], lora_b: numpy.typing.NDArray[numpy.float32], scaling: typing.SupportsFloat | typing.SupportsIndex, bias: numpy.typing.NDArray[numpy.float32] | None, out: numpy.typing.NDArray[numpy.float32], u: numpy.typing.NDArray[numpy.float32], dropout: typing.SupportsFloat | typing.SupportsIndex = 0.0, seed: typing.SupportsInt | typing.SupportsIndex = 0, precision: str = 'fp32') -> None:
    """
    Training forward: out = x @ deq(W).T + bias + scaling * u @ lora_b.T with u = dropout(x) @ lora_a.T written for backward.
    """
def gemm_choice(tensor: Nf4Tensor, precision: str, batch: typing.SupportsInt | typing.SupportsIndex) -> dict:
    """
    The product kernel a forward of this tensor at this batch uses.
    """
def get_num_threads() -> int:
    ...
def group_count(n: typing.SupportsInt | typing.SupportsIndex, group_size: typing.SupportsInt | typing.SupportsIndex) -> int:
    ...
def input_grad(tensor: Nf4Tensor, grad_y: numpy.typing.NDArray[numpy.float32], dx: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    dx = grad_y @ deq(W), decoding the codes on the fly.
    """
def kernel_info() -> dict:
    """
    The kernels serving each precision and batch regime.
    """
def packed_bytes(out_features: typing.SupportsInt | typing.SupportsIndex, in_features: typing.SupportsInt | typing.SupportsIndex) -> int:
    ...
def quantize_nf4(weight: numpy.typing.NDArray[numpy.float32], group_size: typing.SupportsInt | typing.SupportsIndex, codes: numpy.typing.NDArray[numpy.uint8], absmax: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    Quantize a float32 (out, in) weight into packed codes and per-group absmax.
    """
def set_isa(name: str) -> None:
    ...
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    ...
def thread_pool_info() -> dict:
    """
    The core's thread pool: requested and running threads, and why it runs serially (or None).
    """
BATCH_CHUNK: int = 256
BLOCK_COLS: int = 32
NESTED_BLOCK: int = 256
NF4_CODEBOOK: tuple = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
__version__: str = '0.1.0'
