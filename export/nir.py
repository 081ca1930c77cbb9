"""The encoder as a NIR graph of integrate-and-fire neurons (ANN-to-SNN conversion), and a
rate-coded spiking run of such a graph.

    to_nir(net, params, calib_x, head=None, percentile=99.9, fold="weights",
           weights=None, scales=None, groups="dense", max_rate=1.0) -> nir.NIRGraph
    write_nir(path, net, params, calib_x, **same) -> nir.NIRGraph      to_nir, then nir.write
    simulate(graph, x, steps, backend="reference"|"norse", reset="zero"|"subtract",
             encoding="current"|"bernoulli", v_init=0.0, record=False) -> SpikeRun
    spiking_predict / spiking_accuracy / spiking_accuracies(graph, x, [y,] T, head=None)
    ann_features(net, params, x), ann_accuracy(net, params, x, y, head)   the ANN reference

Nodes. NIR readers (Lava, SpiNNaker2, Sinabs, snnTorch, Norse, ...) share Conv2d, Affine,
Linear, Flatten, IF, LIF, CubaLIF and SumPool2d; none takes a max-pool, and not every one an
AvgPool2d. So, after BatchNorm is folded into the conv or linear layer before it
(`edge.nets.fold_batchnorm`), the blocks' primitives become one chain
    Input -> conv: Conv2d (bias inside) | linear: Affine | relu, relu6: IF
          -> avgpool: SumPool2d | gap: SumPool2d over the map + Flatten | flatten: Flatten
          -> [Flatten] -> head: Affine -> Output
(`identity` and a ReLU of an already non-negative signal need no node). Residual blocks,
max-pools and BatchNorms that follow no weight layer are refused with one-line errors.
Grouped convs: groups="dense" writes the block-diagonal dense weight they equal (groups 1:
every reader takes it, at G times the weights); groups="keep" writes `groups`, but nir 1.0's
Conv2d reads its input channels off the weight (C/G), so `nir.read` of such a file needs
type_check=False.

Scales. Every signal u in the graph stands for the ANN's value v at that point as v = k u,
with one scalar k per point (the input: k = 1, currents are the normalised pixels). IF output
spikes fire at a rate r ~ clip(u / theta, 0, 1) per step, so an IF that replaces activation l
stands for v = lam_l r, k = lam_l, where lam_l is the `percentile`-th percentile of the
activation's positive outputs on `calib_x` (data-based normalisation, Rueckauer et al. 2017,
"Conversion of continuous-valued deep networks to efficient event-driven networks"; 1 for a
layer that never fires), divided by `max_rate` (default 1): the percentile fires `max_rate`
spikes per step. Values above lam_l saturate at one spike per step. A ReLU6 is an IF too,
with lam capped at 6: its outputs are at most 6, so saturation at rate 1 is its clip at 6
(or, where lam < 6, the same clip at lam as a ReLU's). max_rate < 1 buys headroom against
the reset-to-zero error below (each spike drops up to one step's input, relatively at most
max_rate) for 1 / max_rate times the steps.
  weight layer, real weights W, bias b, input scale k_in, chosen output scale k_out:
      emitted W k_in / k_out and b / k_out
  SumPool2d (kernel kh x kw):  k_out = k_in / (kh kw): the pool emits the window's sum of
      spikes, and the mean's 1/k^2 is carried in k, so it is folded into the NEXT weight layer
      (its W k_in), or into the next IF's threshold in threshold form; after the last layer
      it stays in k, recorded as the graph's `edge_output_scale` (features = scale * output)
  IF:  threshold theta = lam / k_in, reset to 0 (NIR's v_reset), r = 1
Two forms of the same rule (an IF with reset to 0 is invariant under scaling its input and
threshold together, so both fire identical spikes up to float rounding):
  fold="weights"    k_out of a weight layer = lam of the IF it feeds (times the avg-pool
                    windows between): thresholds are 1, the statistics live in the weights
                    (W^l lam_(l-1) / lam^l, b^l / lam^l, as in Rueckauer et al.). Portable:
                    readers that want one threshold per layer (snnTorch) or unit thresholds
                    (hardware) take it.
  fold="threshold"  k_out = k_in s_w: the weight tensors are written exactly as given, every
                    scale goes into biases (b / k_out) and thresholds (lam / k_in).
Integer networks (hook): `weights` replaces parameters of the BN-folded net by key
(`enc.{block}.{j}.w|b`), `scales` gives each a real scale (real value = weights[key] *
scales[key], e.g. int8 codes with power-of-two scales); with fold="threshold" the integer
tensors are written bit-exactly (as float32) and the scales go into biases and thresholds.
The head (a linear readout W (K, F), b (K,) on the flattened encoder output) is an Affine with
k_out = 1 (weights) or k_in (threshold); the graph then outputs its current each step.

Spiking run. Rate coding over T steps: encoding="current" puts x on the input every step
(a constant current, Rueckauer et al.); "bernoulli" sends events sign(x) c z_t with
z_t ~ Bernoulli(|x| / c), c = max |x| over the x given (the same mean input; a device folds c
into the first weights). IF per step: v += u; spike where v > theta; reset="zero" sets v to
v_reset (NIR's IF, and what Norse's `from_nir` runs), reset="subtract" lowers v by theta
(Rueckauer's reset, what Sinabs' IAF does; the reference backend only). The readout is the
output's mean over the first T steps; with reset by subtraction a first-layer rate is within
1/T of clip(u / theta, 0, 1) (v stays in [0, theta] after every step, so the count is T u
minus at most one); reset to 0 drops the overshoot of each spike, so a first-layer rate lies
in [a / (1 + a) - 1/T, a + 1/T] for a = u / theta in [0, 1].
Initial membrane: v starts at v_init theta (default 0, what NIR implies: the format has no
initial state). From 0, every count falls short of T u by v_T in [0, theta): a bias of about
-theta / 2T in every layer, which the readout's bias amplifies at small T. v_init = 0.5 (Bu
et al. 2022, "Optimal ANN-SNN conversion for high-accuracy and ultra-low-latency SNNs") makes
the count T u rounded rather than floored (first layer, subtract: within 0.5/T); a reader
must set that initial state itself (reference backend only here).
Backends: "reference" steps the graph's nodes in torch here (the node types above, chains
only); "norse" runs `norse.torch.from_nir` (Norse's IAFCell; its SumPool2d ignores padding,
and its Flatten keeps NIR's batchless dims, shifted here by one for the batch axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import (
    EAGER,
    AvgPool,
    BatchNorm,
    Conv,
    Flatten,
    GlobalAvgPool,
    Identity,
    Linear,
    MaxPool,
    Primitive,
    ReLU,
    ReLU6,
)
from edge.nets import NetSpec, encode, fold_batchnorm

if TYPE_CHECKING:
    import nir as nir_t

FOLDS = ("weights", "threshold")
GROUPS = ("dense", "keep")
RESETS = ("zero", "subtract")
ENCODINGS = ("current", "bernoulli")
BACKENDS = ("reference", "norse")
Head = tuple[Tensor, Tensor]


def _nir() -> Any:
    try:
        import nir
    except ImportError:
        raise EdgeError("the NIR export needs the nir package: pip install nir") from None
    return nir


def _f32(t: Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return np.ascontiguousarray(a, dtype=np.float32)


# ----------------------------------------------------------------------------- conversion


def _chain(net: NetSpec) -> list[tuple[str, Primitive]]:
    chain = []
    for i, b in enumerate(net.blocks):
        if b.residual:
            raise EdgeError(f"block {i} is a residual block; the NIR export takes plain chains "
                            "(no residual add)")
        for key, p in b.primitives(i):
            if isinstance(p, MaxPool):
                raise EdgeError(f"NIR readers take no max-pool ({key}); use average pooling "
                                "(avgpool)")
            if isinstance(p, Conv) and p.k[0] != p.k[1]:
                raise EdgeError(f"{key} has a {p.k[0]}x{p.k[1]} kernel; NIR's Conv2d infers its "
                                "output shape from one kernel size (weight.shape[2]), so only "
                                "square kernels type-check")
            if isinstance(p, BatchNorm):
                raise EdgeError(f"bn at {key} follows no conv or linear layer; the NIR export "
                                "folds BatchNorm into the layer before it only")
            if not isinstance(p, Conv | Linear | ReLU | ReLU6 | AvgPool | GlobalAvgPool
                              | Flatten | Identity):
                raise EdgeError(f"{p.op} at {key} has no NIR form; valid: conv, linear, relu, "
                                "relu6, avgpool, gap, flatten, identity")
            chain.append((key, p))
    return chain


def _real_params(params: dict[str, Tensor], weights: dict[str, Tensor] | None,
                 scales: dict[str, float] | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(raw tensors as given, real values = raw * scale) after the overrides."""
    raw = {**params, **(weights or {})}
    for k in {**(weights or {}), **(scales or {})}:
        if k not in params:
            raise EdgeError(f"weights/scales name {k!r}, which the BN-folded net does not have")
        if raw[k].shape != params[k].shape:
            raise EdgeError(f"weights[{k!r}] has shape {tuple(raw[k].shape)}, the net needs "
                            f"{tuple(params[k].shape)}")
    real = {k: v.double() * float((scales or {}).get(k, 1.0)) for k, v in raw.items()
            if isinstance(v, Tensor)}
    return raw, real


def _percentile_of_positive(parts: list[Tensor], percentile: float) -> float:
    pos = torch.cat([p[p > 0].flatten() for p in parts]).numpy()
    return float(np.percentile(pos, percentile)) if pos.size else 1.0


def _calibrate(chain, real, calib_x: Tensor, percentile: float, batch: int) -> dict[str, float]:
    """lam of every activation: the percentile of its positive outputs on calib_x."""
    seen: dict[str, list[Tensor]] = {k: [] for k, p in chain if isinstance(p, ReLU | ReLU6)}
    with torch.no_grad():
        for s in range(0, calib_x.shape[0], batch):
            u = calib_x[s : s + batch].double()
            for key, p in chain:
                sub = {n: real[f"{key}.{n}"] for n in p.param_shapes()}
                u, _ = p.forward(EAGER, sub, u)
                if key in seen:
                    seen[key].append(u.float())
    return {k: _percentile_of_positive(v, percentile) for k, v in seen.items()}


@dataclass
class _Emitter:
    """Builds the chain of NIR nodes, tracking the signal's shape, scale k and sign."""

    nir: Any
    shape: tuple[int, ...]
    nodes: dict[str, Any]
    order: list[str]
    dense_groups: bool = True
    k: float = 1.0
    nonneg: bool = False

    def add(self, name: str, node: Any, shape: tuple[int, ...]) -> None:
        self.nodes[name] = node
        self.order.append(name)
        self.shape = shape

    def flatten(self, name: str) -> None:
        n = math.prod(self.shape)
        self.add(name, self.nir.Flatten(input_type={"input": np.array(self.shape)},
                                        start_dim=0, end_dim=-1), (n,))

    def weight_layer(self, name: str, p: Primitive, w: Tensor, b: Tensor, s_w: float,
                     k_out: float | None, raw_w: Tensor) -> None:
        """k_out None: threshold form (weights as given, k_out = k_in s_w)."""
        if k_out is None:
            k_out = self.k * s_w
            we = _f32(raw_w)
        else:
            we = _f32(w * (self.k / k_out))
        be = _f32(b / k_out)
        if isinstance(p, Conv):
            groups = p.groups
            if groups > 1 and self.dense_groups:
                we, groups = _block_diagonal(we, groups), 1
            node = self.nir.Conv2d(input_shape=tuple(self.shape[1:]), weight=we,
                                   stride=p.stride, padding=p.padding, dilation=(1, 1),
                                   groups=groups, bias=be)
            node.input_type = {"input": np.array(self.shape)}  # nir reads C off the weight
        else:
            node = self.nir.Affine(weight=we, bias=be)
        self.add(name, node, p.out_shape(self.shape))
        self.k, self.nonneg = k_out, False

    def neuron(self, name: str, lam: float) -> None:
        theta = lam / self.k
        ones = np.ones(self.shape, np.float32)
        self.add(name, self.nir.IF(r=ones, v_threshold=ones * np.float32(theta),
                                   v_reset=np.zeros(self.shape, np.float32),
                                   metadata={"edge_lambda": lam}), self.shape)
        self.k, self.nonneg = lam, True

    def sumpool(self, name: str, k: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], shape: tuple[int, ...]) -> None:
        self.add(name, self.nir.SumPool2d(kernel_size=np.array(k), stride=np.array(stride),
                                          padding=np.array(padding)), shape)
        self.k /= k[0] * k[1]


def _block_diagonal(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight (O, C/G, kh, kw) as the dense (O, C, kh, kw) it equals."""
    o, cg = w.shape[:2]
    og = o // groups
    out = np.zeros((o, cg * groups, *w.shape[2:]), np.float32)
    for g in range(groups):
        out[g * og : (g + 1) * og, g * cg : (g + 1) * cg] = w[g * og : (g + 1) * og]
    return out


def _next_scale(chain, j: int, lams: dict[str, float]) -> float:
    """Weights form: the k_out that gives the next IF a threshold of 1 (lam times the pool
    windows between); 1 where no activation follows."""
    factor = 1.0
    for key, p in chain[j + 1 :]:
        if isinstance(p, ReLU | ReLU6):
            return lams[key] * factor
        if isinstance(p, AvgPool):
            factor *= p.k[0] * p.k[1]
        elif isinstance(p, Conv | Linear | GlobalAvgPool):
            break
    return factor


def to_nir(net: NetSpec, params: dict[str, Tensor], calib_x: Tensor, *,
           head: Head | None = None, percentile: float = 99.9, fold: str = "weights",
           weights: dict[str, Tensor] | None = None, scales: dict[str, float] | None = None,
           groups: str = "dense", max_rate: float = 1.0, batch: int = 256) -> nir_t.NIRGraph:
    """The encoder (and `head`) as a NIR graph of IF neurons; see the module docstring."""
    nir = _nir()
    if fold not in FOLDS:
        raise EdgeError(f"unknown fold {fold!r}; valid: {', '.join(FOLDS)}")
    if groups not in GROUPS:
        raise EdgeError(f"unknown groups {groups!r}; valid: {', '.join(GROUPS)}")
    if not 0 < percentile <= 100:
        raise EdgeError(f"percentile must be in (0, 100], got {percentile}")
    if not 0 < max_rate <= 1:
        raise EdgeError(f"max_rate must be in (0, 1] spikes per step, got {max_rate}")
    if tuple(calib_x.shape[1:]) != net.in_shape:
        raise EdgeError(f"calib_x has sample shape {tuple(calib_x.shape[1:])}, the net takes "
                        f"{net.in_shape}")
    net, params = fold_batchnorm(net, params)
    chain = _chain(net)
    raw, real = _real_params(params, weights, scales)
    six = {k for k, p in chain if isinstance(p, ReLU6)}
    lams = {k: min(v / max_rate, 6.0) if k in six else v / max_rate
            for k, v in _calibrate(chain, real, calib_x, percentile, batch).items()}
    em = _Emitter(nir, net.in_shape, {"input": nir.Input(
        input_type={"input": np.array(net.in_shape)})}, ["input"], groups == "dense")
    for j, (key, p) in enumerate(chain):
        if isinstance(p, Conv | Linear):
            s_w = float((scales or {}).get(f"{key}.w", 1.0))
            k_out = None if fold == "threshold" else _next_scale(chain, j, lams)
            em.weight_layer(key, p, real[f"{key}.w"], real[f"{key}.b"], s_w, k_out,
                            raw[f"{key}.w"])
        elif isinstance(p, ReLU | ReLU6):
            if em.nonneg and isinstance(p, ReLU):
                continue  # the ReLU of spikes (or of their pooled sums) is the identity
            if em.nonneg:
                raise EdgeError(f"relu6 at {key} follows another activation; put it right "
                                "after a conv or linear layer")
            em.neuron(key, lams[key])
        elif isinstance(p, AvgPool):
            em.sumpool(key, p.k, p.stride, p.padding, p.out_shape(em.shape))
        elif isinstance(p, GlobalAvgPool):
            c, h, w = em.shape
            em.sumpool(key, (h, w), (h, w), (0, 0), (c, 1, 1))
            em.flatten(f"{key}.flatten")
        elif isinstance(p, Flatten):
            em.flatten(key)
    if head is not None:
        hw, hb = head
        if len(em.shape) > 1:
            em.flatten("head.flatten")
        if hw.dim() != 2 or hw.shape[1] != em.shape[0] or hb.shape != (hw.shape[0],):
            raise EdgeError(f"head must be W (K, {em.shape[0]}) and b (K,), got "
                            f"{tuple(hw.shape)} and {tuple(hb.shape)}")
        k_out = None if fold == "threshold" else 1.0
        em.weight_layer("head", Linear(hw.shape[1], hw.shape[0]), hw.double(), hb.double(),
                        1.0, k_out, hw)
    em.add("output", nir.Output(output_type={"output": np.array(em.shape)}), em.shape)
    edges = list(zip(em.order[:-1], em.order[1:], strict=True))
    meta = {"edge_output_scale": em.k, "edge_percentile": percentile, "edge_fold": fold,
            "edge_max_rate": max_rate,
            "edge_head": head is not None, "edge_net": net.name}
    return nir.NIRGraph(em.nodes, edges, metadata=meta)


def write_nir(path: str | Path, net: NetSpec, params: dict[str, Tensor], calib_x: Tensor,
              **kw: Any) -> nir_t.NIRGraph:
    """`to_nir` written to `path` (HDF5, NIR's file format); returns the graph."""
    graph = to_nir(net, params, calib_x, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _nir().write(str(path), graph)
    return graph


# ----------------------------------------------------------------------------- spiking run


@dataclass
class SpikeRun:
    """outputs[T]: the output's mean over the first T steps (N, ...); rates[node]: each IF
    node's spikes per step over all steps (when recorded)."""

    outputs: dict[int, Tensor]
    rates: dict[str, Tensor]


def _meta(graph: Any, name: str, default: Any) -> Any:
    v = (graph.metadata or {}).get(name, default)
    v = v.decode() if isinstance(v, bytes) else v
    return v.item() if isinstance(v, np.generic) else v


def output_scale(graph: Any) -> float:
    """k of the graph's output: ANN value = output_scale * output (1 without edge metadata)."""
    return float(_meta(graph, "edge_output_scale", 1.0))


def _chain_order(graph: Any) -> list[str]:
    nir = _nir()
    nxt: dict[str, str] = {}
    for a, b in graph.edges:
        if a in nxt:
            raise EdgeError(f"node {a!r} has several successors; the reference backend runs "
                            "chains only")
        nxt[a] = b
    starts = [n for n, v in graph.nodes.items() if isinstance(v, nir.Input)]
    if len(starts) != 1:
        raise EdgeError(f"the graph needs exactly one Input node, has {len(starts)}")
    order = [starts[0]]
    while order[-1] in nxt and len(order) <= len(graph.nodes):
        order.append(nxt[order[-1]])
    if not isinstance(graph.nodes[order[-1]], nir.Output) or len(order) != len(graph.nodes):
        raise EdgeError("the graph is not one chain from Input to Output")
    return order


def _t(a: Any) -> Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def _pair(v: Any) -> tuple[int, int]:
    a = np.atleast_1d(np.asarray(v)).astype(int)
    return (int(a[0]), int(a[-1]))


class _Reference:
    """Steps a chain graph's nodes in torch: the node types `to_nir` emits."""

    def __init__(self, graph: Any, reset: str, v_init: float = 0.0) -> None:
        nir = _nir()
        self.reset, self.v_init = reset, v_init
        self.ops: list[tuple[str, str, tuple]] = []
        for name in _chain_order(graph):
            n = graph.nodes[name]
            if isinstance(n, nir.Input | nir.Output):
                continue
            if isinstance(n, nir.Conv2d):
                if isinstance(n.padding, str):
                    raise EdgeError(f"conv {name!r} has padding {n.padding!r}; the reference "
                                    "backend takes integer padding")
                w, b = _t(n.weight), _t(n.bias)
                self.ops.append((name, "conv", (w, b, _pair(n.stride), _pair(n.padding),
                                                _pair(n.dilation), int(n.groups))))
            elif isinstance(n, nir.Affine | nir.Linear):
                b = _t(n.bias) if isinstance(n, nir.Affine) else None
                self.ops.append((name, "linear", (_t(n.weight), b)))
            elif isinstance(n, nir.SumPool2d):
                self.ops.append((name, "sumpool", (_pair(n.kernel_size), _pair(n.stride),
                                                   _pair(n.padding))))
            elif isinstance(n, nir.Flatten):
                end = int(n.end_dim)
                self.ops.append((name, "flatten", (int(n.start_dim) + 1,
                                                   end if end < 0 else end + 1)))
            elif isinstance(n, nir.IF):
                self.ops.append((name, "if", (_t(n.r), _t(n.v_threshold), _t(n.v_reset))))
            else:
                raise EdgeError(f"node {name!r} is a {type(n).__name__}; the reference backend "
                                "runs Conv2d, Affine, Linear, SumPool2d, Flatten and IF")
        self.v: dict[str, Tensor] = {}

    def reset_state(self) -> None:
        self.v = {}

    def step(self, u: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        spikes = {}
        for name, kind, a in self.ops:
            if kind == "conv":
                u = F.conv2d(u, a[0], a[1], a[2], a[3], a[4], a[5])
            elif kind == "linear":
                u = F.linear(u, a[0], a[1])
            elif kind == "sumpool":
                u = F.avg_pool2d(u, a[0], a[1], a[2], count_include_pad=True,
                                 divisor_override=1)
            elif kind == "flatten":
                u = u.flatten(*a)
            else:
                r, th, vr = a
                v = self.v[name] if name in self.v else self.v_init * th.expand_as(u)
                v = v + r * u
                z = v > th
                v = torch.where(z, vr if self.reset == "zero" else v - th, v)
                self.v[name] = v
                u = spikes[name] = z.to(u.dtype)
        return u, spikes


class _Norse:
    """`norse.torch.from_nir`, its Flatten shifted for the batch axis, spikes hooked."""

    def __init__(self, graph: Any, reset: str, v_init: float = 0.0) -> None:
        if reset != "zero":
            raise EdgeError("Norse's IF (IAFCell) resets to v_reset; reset='subtract' runs on "
                            "the reference backend only")
        if v_init:
            raise EdgeError("Norse's from_nir starts every IF at v = 0; v_init runs on the "
                            "reference backend only")
        try:
            import norse.torch as nt
            from norse.torch.module.iaf import IAFCell
        except ImportError:
            raise EdgeError("backend 'norse' needs the norse package: pip install norse") from None
        nir = _nir()
        for name, n in graph.nodes.items():
            if isinstance(n, nir.SumPool2d) and np.any(np.asarray(n.padding) != 0):
                raise EdgeError(f"Norse's SumPool2d ignores padding (node {name!r}); use "
                                "backend='reference'")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = nt.from_nir(graph)
        from nirtorch.utils import sanitize_name

        names = {sanitize_name(n): n for n in graph.nodes}
        self._z: dict[str, Tensor] = {}
        self.state: Any = None
        for mname, m in self.module.named_modules():
            if isinstance(m, torch.nn.Flatten):
                m.start_dim += 1
                m.end_dim += 1 if m.end_dim >= 0 else 0
            if isinstance(m, IAFCell):
                m.register_forward_hook(self._hook(names.get(mname, mname)))

    def _hook(self, name: str) -> Any:
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            self._z[name] = out[0]

        return hook

    def reset_state(self) -> None:
        self.state = None

    def step(self, u: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out, self.state = self.module(u, self.state)
        return out, dict(self._z)


def simulate(graph: Any, x: Tensor, steps: int | Sequence[int], *, backend: str = "reference",
             reset: str = "zero", encoding: str = "current", v_init: float = 0.0,
             record: bool = False, batch: int = 256, seed: int = 0) -> SpikeRun:
    """Rate-coded run of `graph` on inputs x over max(steps) steps; the output's mean is
    read at every T in `steps` (the runs are causal: the first T steps of a longer run are
    the run of T steps)."""
    ts = sorted({int(t) for t in ([steps] if isinstance(steps, int) else steps)})
    if not ts or ts[0] < 1:
        raise EdgeError(f"steps must be positive, got {steps!r}")
    for name, valid, v in (("backend", BACKENDS, backend), ("reset", RESETS, reset),
                           ("encoding", ENCODINGS, encoding)):
        if v not in valid:
            raise EdgeError(f"unknown {name} {v!r}; valid: {', '.join(valid)}")
    x = x.float()
    c = float(x.abs().max()) if encoding == "bernoulli" else 1.0
    gen = torch.Generator().manual_seed(seed)
    outs: dict[int, list[Tensor]] = {t: [] for t in ts}
    rates: dict[str, list[Tensor]] = {}
    if not 0 <= v_init < 1:
        raise EdgeError(f"v_init is a fraction of the threshold in [0, 1), got {v_init}")
    sim = (_Reference if backend == "reference" else _Norse)(graph, reset, v_init)
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            xb = x[s : s + batch]
            sim.reset_state()
            total, counts = None, {}
            for t in range(1, ts[-1] + 1):
                u = xb
                if encoding == "bernoulli" and c > 0:
                    u = torch.sign(xb) * c * torch.bernoulli(xb.abs() / c, generator=gen)
                y, spikes = sim.step(u)
                total = y.clone() if total is None else total + y
                if record:
                    for k, z in spikes.items():
                        counts[k] = z.clone() if k not in counts else counts[k] + z
                if t in outs:
                    outs[t].append(total / t)
            for k, n in counts.items():
                rates.setdefault(k, []).append(n / ts[-1])
    return SpikeRun({t: torch.cat(v) for t, v in outs.items()},
                    {k: torch.cat(v) for k, v in rates.items()})


def _logits(graph: Any, out: Tensor, head: Head | None) -> Tensor:
    if head is None:
        if not _meta(graph, "edge_head", True):
            raise EdgeError("the graph has no head; pass head=(W, b) for the readout")
        return out
    if _meta(graph, "edge_head", False):
        raise EdgeError("the graph already ends in its head; pass head=None")
    w, b = head
    return (out.flatten(1) * output_scale(graph)) @ w.float().T + b.float()


def spiking_predicts(graph: Any, x: Tensor, steps: Sequence[int], *, head: Head | None = None,
                     **sim: Any) -> dict[int, Tensor]:
    """Predicted classes after each T in `steps`: argmax of the readout of the output's mean
    (the graph's own head, or `head` on output_scale * output)."""
    run = simulate(graph, x, steps, **sim)
    return {t: _logits(graph, o, head).argmax(1) for t, o in run.outputs.items()}


def spiking_accuracies(graph: Any, x: Tensor, y: Tensor, steps: Sequence[int], *,
                       head: Head | None = None, **sim: Any) -> dict[int, float]:
    """Accuracy of the spiking network after each T in `steps` (see `spiking_predicts`)."""
    preds = spiking_predicts(graph, x, steps, head=head, **sim)
    return {t: float((p == y).float().mean()) for t, p in preds.items()}


def spiking_accuracy(graph: Any, x: Tensor, y: Tensor, T: int, *, head: Head | None = None,
                     **sim: Any) -> float:
    """Accuracy of the spiking network after T steps."""
    return spiking_accuracies(graph, x, y, [T], head=head, **sim)[T]


def ann_features(net: NetSpec, params: dict[str, Tensor], x: Tensor, batch: int = 256) -> Tensor:
    """The ANN encoder's flattened last output: the features the readout is fitted on."""
    return torch.cat([encode(net, params, x[s : s + batch])[-1].flatten(1)
                      for s in range(0, x.shape[0], batch)])


def ann_accuracy(net: NetSpec, params: dict[str, Tensor], x: Tensor, y: Tensor,
                 head: Head) -> float:
    """The ANN reference: the same linear readout on the ANN's features."""
    w, b = head
    pred = (ann_features(net, params, x) @ w.float().T + b.float()).argmax(1)
    return float((pred == y).float().mean())
