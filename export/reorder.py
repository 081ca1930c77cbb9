"""Memory-aware node order: the same graph, its nodes listed so that fewer bytes are live at once.

    reorder_for_memory(model) -> model

Contract:

* The result is a copy whose `graph.node` is a permutation of the input's nodes (nothing else
  changes: same nodes, attributes, initializers, inputs, outputs), in a valid topological order
  (If/Loop/Scan bodies' outer reads count as inputs). Same nodes, same arithmetic: outputs are
  bit-for-bit those of the input order.
* Its live-bytes peak (`live_peak`) is never higher than the input order's; when no candidate
  beats the input order, the input order is kept (an unchanged copy is returned).

Memory model (the simulator's, kept local because export sits below `edge.sim`): a node
output is live from the step of its node to the step of its last reader, inclusive; graph
outputs stay live to the end; graph inputs and initializers belong to the caller and are the
same bytes in every order, so they are not counted. Sizes come from ONNX shape inference
(a tensor of unknown shape counts 0 bytes).

Candidate orders (`best_order`), the lowest peak kept, the input order on ties:

* sink: walk the input order; a node that would add bytes (its outputs outweigh the inputs it
  reads last) waits until a node that needs it runs, then runs just before it, or at the end
  when nothing does. Moves allocating sources (ConstantOfShape splats, index ranges, a
  transposed input) from the top of the graph to their first reader.
* greedy list scheduling: among ready nodes, the one freeing the most bytes if any frees or
  adds none, else the next one of a given order; run on the input order and on the sunk one,
  and the sink walk once more over the latter.

Simulated peak of the fp32 CLAPP++ step (host target, AdamW, batch 32): VGG-6 at 1/8 width
40.9 -> 26.0 MiB, digits net 7.3 -> 5.6 MiB. onnxruntime follows it only when it runs the
file's order (`ExecutionOrder.PRIORITY_BASED`); its default order is its own sort
(`benchmarks/sim_vs_measured.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto

_HALF_BYTE = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_HALF_BYTE |= {getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def _outer_reads(g: GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    outer: set[str] = set()
    for node in g.node:
        outer |= {i for i in node.input if i and i not in local}
        for sub in _subgraphs(node):
            outer |= _outer_reads(sub) - local
        local |= set(node.output)
    return outer


def _subgraphs(node: NodeProto) -> list[GraphProto]:
    out: list[GraphProto] = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def node_reads(node: NodeProto) -> list[str]:
    """Every tensor a node reads, its body's outer reads included, each once."""
    names = [i for i in node.input if i]
    for sub in _subgraphs(node):
        names += sorted(_outer_reads(sub))
    return list(dict.fromkeys(names))


def tensor_bytes(model: ModelProto) -> dict[str, int]:
    """Bytes of every value shape inference sizes (0 for unknown shapes)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # sizes only steer the heuristic; without them keep the order
        return {}
    sizes: dict[str, int] = {}
    g = inferred.graph
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d < 0 for d in dims):
            continue
        n = math.prod(dims)
        if tt.elem_type in _HALF_BYTE:
            sizes[vi.name] = (n + 1) // 2
            continue
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except Exception:
            item = 1
        sizes[vi.name] = n * item
    return sizes


class _Graph:
    """Node-level view: who reads what, who depends on whom, what each node allocates."""

    def __init__(self, model: ModelProto, sizes: dict[str, int]):
        g = model.graph
        self.nodes = list(g.node)
        self.reads = [node_reads(n) for n in self.nodes]
        producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.outputs = {o.name for o in g.output}
        self.size = {t: sizes.get(t, 0) for t in producer}  # node outputs only: caller owns
        self.deps = [sorted({producer[t] for t in r if t in producer}) for r in self.reads]
        self.users: list[list[int]] = [[] for _ in self.nodes]
        for i, ds in enumerate(self.deps):
            for d in ds:
                self.users[d].append(i)
        self.readers: dict[str, int] = {}
        for r in self.reads:
            for t in r:
                if t in self.size:
                    self.readers[t] = self.readers.get(t, 0) + 1

    def is_topological(self, order: Sequence[int]) -> bool:
        pos = {v: k for k, v in enumerate(order)}
        return len(pos) == len(self.nodes) == len(order) and all(
            pos[d] < pos[i] for i, ds in enumerate(self.deps) for d in ds
        )

    def peak(self, order: Sequence[int]) -> int:
        """Most bytes of node outputs live at once when the nodes run in `order`."""
        left = dict(self.readers)
        live = best = 0
        for v in order:
            outs = [o for o in self.nodes[v].output if o in self.size]
            live += sum(self.size[o] for o in outs)
            best = max(best, live)
            for t in self.reads[v]:
                if t in left:
                    left[t] -= 1
                    if left[t] == 0 and t not in self.outputs:
                        live -= self.size[t]
            live -= sum(
                self.size[o] for o in outs if o not in self.readers and o not in self.outputs
            )
        return best

    def _net(self, v: int, left: dict[str, int]) -> int:
        """Bytes node v adds if it runs now: its outputs minus the inputs it reads last."""
        alloc = sum(self.size.get(o, 0) for o in self.nodes[v].output)
        freed = sum(
            self.size[t] for t in self.reads[v] if left.get(t) == 1 and t not in self.outputs
        )
        return alloc - freed

    @staticmethod
    def _consume(reads: list[str], left: dict[str, int]) -> None:
        for t in reads:
            if t in left:
                left[t] -= 1

    def sink(self, order: Sequence[int]) -> list[int]:
        """Walk `order`; a node that would add bytes waits until a node that needs it runs
        (then it runs just before), or to the end when nothing does."""
        left = dict(self.readers)
        done = [False] * len(self.nodes)
        waiting: set[int] = set()
        out: list[int] = []
        rank = _rank(order)

        def emit(v: int) -> None:  # post-order: waiting producers first, earliest first
            stack = [(v, False)]
            while stack:
                u, ready = stack.pop()
                if done[u]:
                    continue
                if ready:
                    done[u] = True
                    waiting.discard(u)
                    out.append(u)
                    self._consume(self.reads[u], left)
                    continue
                stack.append((u, True))
                pending = [d for d in self.deps[u] if d in waiting and not done[d]]
                stack.extend((d, False) for d in sorted(pending, key=lambda d: -rank[d]))

        for v in order:
            if not done[v]:
                if self._net(v, left) > 0:
                    waiting.add(v)
                else:
                    emit(v)
        for v in sorted(waiting, key=lambda d: rank[d]):
            emit(v)
        return out

    def greedy(self, order: Sequence[int]) -> list[int]:
        """Forward list scheduling: a ready node that frees bytes (or adds none) runs first,
        the one freeing most; otherwise the next ready node of `order`."""
        left = dict(self.readers)
        rank = _rank(order)
        missing = [len(d) for d in self.deps]
        ready = {v for v, m in enumerate(missing) if m == 0}
        out: list[int] = []
        while ready:
            nets = {v: self._net(v, left) for v in ready}
            shrink = [v for v, x in nets.items() if x <= 0]
            v = (
                min(shrink, key=lambda u: (nets[u], rank[u]))
                if shrink
                else min(ready, key=lambda u: rank[u])
            )
            ready.remove(v)
            out.append(v)
            self._consume(self.reads[v], left)
            for u in self.users[v]:
                missing[u] -= 1
                if missing[u] == 0:
                    ready.add(u)
        return out


def _rank(order: Sequence[int]) -> list[int]:
    rank = [0] * len(order)
    for k, v in enumerate(order):
        rank[v] = k
    return rank


def live_peak(model: ModelProto, sizes: dict[str, int] | None = None) -> int:
    """The contract's measure: most bytes of node outputs live at once in the listed order."""
    g = _Graph(model, tensor_bytes(model) if sizes is None else sizes)
    return g.peak(range(len(g.nodes)))


def best_order(g: _Graph) -> list[int]:
    """The candidate order (module docstring) with the lowest peak; the input order on ties."""
    given = list(range(len(g.nodes)))
    if len(given) < 3 or not any(g.size.values()) or not g.is_topological(given):
        return given  # nothing to gain, or not ours to repair (the checker reports it)
    sunk = g.sink(given)
    candidates = [given, sunk, g.greedy(given), g.greedy(sunk), g.sink(g.greedy(sunk))]
    scored = [(g.peak(c), k) for k, c in enumerate(candidates) if g.is_topological(c)]
    return candidates[min(scored)[1]]


def reorder_for_memory(model: ModelProto) -> ModelProto:
    """A copy of `model` with its nodes in the candidate order of lowest live-bytes peak."""
    out = ModelProto()
    out.CopyFrom(model)
    g = _Graph(model, tensor_bytes(model))
    order = best_order(g)
    if order != list(range(len(g.nodes))):
        del out.graph.node[:]
        out.graph.node.extend(g.nodes[v] for v in order)
    return out
