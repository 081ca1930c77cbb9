"""The layer library: one file per primitive kind, each with all of its forms side by side
(see `edge.layers.base`), and the executors that choose their kernels (`executor`).

Adding a primitive: one file here with a `Primitive` subclass that sets `op`, imported below;
specs, TOML files, `from_torch` and the integer reference read it from the registry."""

from edge.layers.act import Activation, Identity, ReLU, ReLU6
from edge.layers.base import PRIMITIVES, QT, Primitive, from_dict
from edge.layers.bn import BatchNorm
from edge.layers.conv import Conv
from edge.layers.executor import EAGER, TRACED, Executor
from edge.layers.linear import Linear
from edge.layers.pool import AvgPool, GlobalAvgPool, MaxPool
from edge.layers.shape import Flatten

__all__ = [
    "EAGER", "PRIMITIVES", "QT", "TRACED", "Activation", "AvgPool", "BatchNorm", "Conv",
    "Executor", "Flatten", "GlobalAvgPool", "Identity", "Linear", "MaxPool", "Primitive",
    "ReLU", "ReLU6", "from_dict",
]
