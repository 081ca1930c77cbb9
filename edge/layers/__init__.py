"""The layer library: one file per primitive kind, each with all of its forms side by side
(see `edge.layers.base`), and the executors that choose their kernels (`executor`).

Adding a primitive: one file here with a `Primitive` subclass that sets `op` (every module of
this package is imported below, so the class registers itself); specs, TOML files and
`from_torch` read it from the registry. (The NumPy integer reference in `quant.reference` is
independent on purpose: a new integer form gets its reference there too.)"""

import importlib
import pkgutil

from edge.layers.act import Activation, Identity, ReLU, ReLU6
from edge.layers.base import PRIMITIVES, QT, Primitive, from_dict
from edge.layers.bn import BatchNorm
from edge.layers.conv import Conv
from edge.layers.executor import EAGER, TRACED, Executor
from edge.layers.linear import Linear
from edge.layers.pool import AvgPool, GlobalAvgPool, MaxPool
from edge.layers.shape import Flatten

for _m in pkgutil.iter_modules(__path__):  # every primitive file registers its classes
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "EAGER", "PRIMITIVES", "QT", "TRACED", "Activation", "AvgPool", "BatchNorm", "Conv",
    "Executor", "Flatten", "GlobalAvgPool", "Identity", "Linear", "MaxPool", "Primitive",
    "ReLU", "ReLU6", "from_dict",
]
