"""A local block: the unit a rule trains, with its loss at the block's output.

    Block(body, shortcut=None, post=())
        body      primitives in order (conv, bn, activations, pools, ...)
        shortcut  None: no residual; (): identity residual; else primitives (e.g. 1x1 conv)
        post      primitives after the residual add (e.g. the ReLU of a ResNet basic block)

    y = post( body(x) [+ shortcut(x)] )

The presets' blocks: conv+BN+activation(+pool); a depthwise-separable pair; an inverted
residual (expand, depthwise, project, identity add); a ResNet basic block.

Adjoint: closed form, the chain rule written out through the block's own primitives (no
autograd): g = dL/dy goes back through post, then down both branches; each primitive gives
its parameter gradients and, except the first of a branch, the gradient of its input. Nothing
reaches the previous block.

Saved tensors. Every primitive keeps what its adjoint reads (conv: its input; an activation:
its output; a max-pool: its argmax, as 2-byte flat indices eager and 1-byte window offsets
traced and integer). An activation directly followed by a max-pool
keeps nothing: its derivative is applied at the pool's (pooled) output, which equals the
activation's output at every argmax, so the full-size map dies in the forward. Every saved
tensor has the batch as its first axis, so the adjoint may run on row chunks (`take_rows`).

Quantized executors (`ex.quantized`: QAT and integer) requantize to 8 bits after every conv,
linear or residual add that no activation follows: an `Identity` is inserted there (key
`<key>.q`), so the QAT and integer forms have the same quantization points.

Keys: block i's body primitive j is `enc.{i}.{j}`, shortcut j `enc.{i}.s{j}`, post j
`enc.{i}.p{j}`; parameter `w` of `enc.3.1` is named `enc.3.1.w`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import Activation, Identity, MaxPool, Primitive
from edge.layers import from_dict as prim_from_dict
from edge.layers.add import add, int_add
from edge.layers.base import QT, Shape

FUSED = "fused"  # saved marker: an activation whose derivative its max-pool applies
Chain = list[tuple[str, Primitive]]


@dataclass(frozen=True)
class Block:
    body: tuple[Primitive, ...]
    shortcut: tuple[Primitive, ...] | None = None
    post: tuple[Primitive, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", tuple(self.body))
        object.__setattr__(self, "post", tuple(self.post))
        if self.shortcut is not None:
            object.__setattr__(self, "shortcut", tuple(self.shortcut))
        if not self.body:
            raise EdgeError("a block needs at least one primitive")
        if self.post and self.shortcut is None:
            raise EdgeError("post primitives follow a residual add; put them in the body")

    @property
    def residual(self) -> bool:
        return self.shortcut is not None

    # ------------------------------------------------------------------ spec
    def chains(self, i: int) -> dict[str, Chain]:
        c = {"body": [(f"enc.{i}.{j}", p) for j, p in enumerate(self.body)]}
        if self.residual:
            c["shortcut"] = [(f"enc.{i}.s{j}", p) for j, p in enumerate(self.shortcut)]
        c["post"] = [(f"enc.{i}.p{j}", p) for j, p in enumerate(self.post)]
        return c

    def primitives(self, i: int) -> Chain:
        return [kp for chain in self.chains(i).values() for kp in chain]

    def _through(self, chain: tuple[Primitive, ...], shape: Shape, what: str) -> Shape:
        for j, p in enumerate(chain):
            try:
                shape = p.out_shape(shape)
            except EdgeError as e:
                raise EdgeError(f"{what} {j} ({p.op}): {e}") from None
        return shape

    def out_shape(self, shape: Shape) -> Shape:
        h = self._through(self.body, shape, "layer")
        if self.residual:
            s = self._through(self.shortcut, shape, "shortcut layer")
            if s != h:
                raise EdgeError(f"residual add of shapes {h} and {s}; the shortcut must match")
        return self._through(self.post, h, "post layer")

    def param_shapes(self, i: int) -> dict[str, Shape]:
        return {f"{key}.{s}": shape for key, p in self.primitives(i)
                for s, shape in p.param_shapes().items()}

    def trainable(self, i: int) -> list[str]:
        return [f"{key}.{s}" for key, p in self.primitives(i) for s in p.trainable]

    def init(self, i: int, gen: torch.Generator) -> dict[str, Tensor]:
        out = {}
        for key, p in self.primitives(i):
            out.update({f"{key}.{s}": v for s, v in p.init(gen).items()})
        return out

    def macs(self, shape: Shape) -> int:
        total = 0
        for chain, start in ((self.body, shape), (self.shortcut or (), shape)):
            s = start
            for p in chain:
                total += p.macs(s)
                s = p.out_shape(s)
        s = self._through(self.body, shape, "layer")
        for p in self.post:
            total += p.macs(s)
            s = p.out_shape(s)
        return total

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": [p.to_dict() for p in self.body]}
        if self.residual:
            d["shortcut"] = [p.to_dict() for p in self.shortcut]
        if self.post:
            d["post"] = [p.to_dict() for p in self.post]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "block") -> Block:
        if not isinstance(d, dict):
            raise EdgeError(f"{where}: must be a table with a 'layers' list")
        unknown = sorted(set(d) - {"layers", "shortcut", "post"})
        if unknown:
            raise EdgeError(f"{where}: unknown field {unknown[0]!r}; valid: layers, shortcut, post")
        if not isinstance(d.get("layers"), list) or not d["layers"]:
            raise EdgeError(f"{where}: needs a non-empty 'layers' list")

        def prims(key: str) -> tuple[Primitive, ...]:
            items = d[key]
            if items == "identity":
                return ()
            if not isinstance(items, list):
                raise EdgeError(f"{where}: {key!r} must be a list of layers"
                                + (" or \"identity\"" if key == "shortcut" else ""))
            return tuple(prim_from_dict(x, f"{where}, {key} {j}") for j, x in enumerate(items))

        return Block(prims("layers"), prims("shortcut") if "shortcut" in d else None,
                     prims("post") if "post" in d else ())

    # ------------------------------------------------------------------ execution
    def forward(self, ex, i: int, params: dict[str, Tensor], x):
        """(y, saved): y the block output (QT under the integer executor)."""
        chains = self.chains(i)
        h, saved_body = _run(ex, params, _lower(ex, chains["body"]), x)
        saved: dict[str, Any] = {"body": saved_body}
        if self.residual:
            s, saved["shortcut"] = _run(ex, params, _lower(ex, chains["shortcut"]), x)
            h = int_add(h, s) if ex.integer else add(h, s)
            post = _lower(ex, chains["post"], after_add=f"enc.{i}.add")
        else:
            post = _lower(ex, chains["post"])
        y, saved["post"] = _run(ex, params, post, h)
        return y, saved

    def adjoint(self, ex, i: int, params: dict[str, Tensor], saved: dict[str, Any], g) -> dict:
        """Parameter gradients (full names) from g = dL/dy; under the integer executor g
        and the gradients are QT."""
        chains = self.chains(i)
        after = f"enc.{i}.add" if self.residual else None
        grads, g = _adjoint(ex, params, _lower(ex, chains["post"], after), saved["post"], g,
                            True)
        if self.residual:
            more, _ = _adjoint(ex, params, _lower(ex, chains["shortcut"]), saved["shortcut"],
                               g, False)
            grads.update(more)
        more, _ = _adjoint(ex, params, _lower(ex, chains["body"]), saved["body"], g, False)
        grads.update(more)
        return grads


def _lower(ex, chain: Chain, after_add: str | None = None) -> Chain:
    """The chain as the executor runs it: quantized executors requantize after every
    weight layer (and residual add) that no activation follows (an Identity `<key>.q`)."""
    if not ex.quantized:
        return chain
    out: Chain = []
    if after_add is not None and not (chain and chain[0][1].is_activation):
        out.append((f"{after_add}.q", Identity()))
    for j, (key, p) in enumerate(chain):
        out.append((key, p))
        nxt = chain[j + 1][1] if j + 1 < len(chain) else None
        if p.has_weights and not (nxt is not None and nxt.is_activation):
            out.append((f"{key}.q", Identity()))
    return out


def _fused(chain: Chain, j: int) -> bool:
    """Whether primitive j is an activation whose max-pool (j + 1) applies its derivative."""
    return (chain[j][1].is_activation and j + 1 < len(chain)
            and isinstance(chain[j + 1][1], MaxPool))


def _run(ex, params, chain: Chain, x):
    saved = []
    for j, (key, prim) in enumerate(chain):
        p = ex.prim_params(key, prim, params, x)
        if ex.integer:
            y, s = prim.int_forward(ex, key, p, x)
        elif prim.is_activation:
            y, _ = prim.forward(ex, p, x, inplace=j > 0)
            y = s = ex.act(key, y, prim.signed)
        else:
            y, s = prim.forward(ex, p, x)
        saved.append(FUSED if _fused(chain, j) else s)
        x = y
    return x, saved


def _through_act(ex, key: str, act: Activation, y, g):
    """The activation's own adjoint, reading its derivative off the (pooled) output y."""
    if ex.integer:
        return act.int_adjoint(ex, key, {}, y, g, True)[1]
    return act.adjoint(ex, {}, y, g, True)[1]


def _adjoint(ex, params, chain: Chain, saved: list, g, need_first_gx: bool):
    grads: dict[str, Any] = {}
    for j in range(len(chain) - 1, -1, -1):
        key, prim = chain[j]
        if saved[j] is FUSED:
            continue
        if j > 0 and saved[j - 1] is FUSED:  # the max-pool of a fused pair
            g = _through_act(ex, chain[j - 1][0], chain[j - 1][1], saved[j][2], g)
        # an input gradient only where a primitive before this one has parameters to train
        need_gx = need_first_gx or any(p.trainable for _, p in chain[:j])
        p = ex.prim_params(key, prim, params, None) if prim.param_shapes() else {}
        if ex.integer:
            gp, g = prim.int_adjoint(ex, key, p, saved[j], g, need_gx)
        else:
            gp, g = prim.adjoint(ex, p, saved[j], g, need_gx)
        grads.update({f"{key}.{s}": v for s, v in gp.items() if s in prim.trainable})
        if not need_gx:
            break
    return grads, g


def take_rows(saved: Any, start: int, stop: int) -> Any:
    """`saved` restricted to batch rows [start, stop) (tensors and QT; shapes unchanged)."""
    if isinstance(saved, Tensor):
        return saved[start:stop]
    if isinstance(saved, QT):
        return QT(saved.t[start:stop], saved.f, saved.c)
    if isinstance(saved, dict):
        return {k: take_rows(v, start, stop) for k, v in saved.items()}
    if isinstance(saved, list | tuple):
        return type(saved)(take_rows(v, start, stop) for v in saved)
    return saved

