"""Executors: which kernels run a primitive's sums, passed explicitly (never a global flag).

    EAGER    torch eager, the fastest kernels for the laptop loop (e.g. the conv weight
             gradient through aten's convolution_backward, max-pool routing by aten's backward)
    TRACED   kernels that trace into plain ai.onnx graphs (the same sums: the conv weight
             gradient as one GEMM per kernel offset, routing by Where + concatenations)
    quantized executors (defined in `quant`): `quant.qat.QATExecutor` (eager or traced, with
             fake-quantizing hooks) and `quant.integer.IntegerExecutor` (integer forms,
             `integer=True`)

A primitive asks `ex.traced` which kernel to use and calls the hooks below at its
quantization points; the float executors' hooks do nothing. `chunk_rows` bounds how many
rows (samples of all streams together) one adjoint call handles: the weight gradient is a sum
over rows, so the loop body may split it into chunks to keep the full-size error maps of one
chunk alive at a time (the lower peak of a device), with the same sums.
"""

from __future__ import annotations

import copy

from torch import Tensor


class Executor:
    def __init__(self, name: str, traced: bool = False, integer: bool = False,
                 quantized: bool = False, chunk_rows: int | None = None):
        self.name, self.traced, self.integer = name, traced, integer
        self.quantized = quantized  # requantization points exist (QAT, integer): nets.block
        self.chunk_rows = chunk_rows  # None: the whole batch in one adjoint call

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, traced={self.traced})"

    def weight(self, key: str, name: str, w: Tensor) -> Tensor:
        """A parameter as the forward pass multiplies by it (QAT: fake-quantized)."""
        return w

    def prim_params(self, key: str, prim, params: dict, x) -> dict:
        """Primitive `key`'s parameters under their short names, as its forms take them
        (the integer executor gives forward values as QT; `x` is the primitive's input)."""
        return {s: self.weight(key, s, params[f"{key}.{s}"]) for s in prim.param_shapes()}

    def act(self, key: str, y: Tensor, signed: bool) -> Tensor:
        """An activation at a quantization point (QAT: fake-quantized at its exponent)."""
        return y

    def with_chunks(self, rows: int | None) -> Executor:
        out = copy.copy(self)
        out.chunk_rows = rows
        return out


EAGER = Executor("eager")
TRACED = Executor("traced", traced=True)
