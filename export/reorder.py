"""Memory-aware node order: the same graph, its nodes listed so that fewer bytes are live at once.

    reorder_for_memory(model) -> model     ModelProto in, ModelProto out (the pass below)
    live_peak(model, sizes=None) -> int    the measure the order is chosen by
    ReorderForMemoryPass(sizes=None)       the same on an onnx_ir model, in place
    Schedule(graph, size)                  the analysis: who reads what, peaks, candidates

Contract of the pass:

* Only the order of the main graph's nodes changes (`reorder_for_memory`: a copy whose
  `graph.node` is a permutation of the input's, nothing else in the proto touched; the pass:
  the same node objects relisted), and the new order is topological (If / Loop / Scan bodies'
  reads of outer values count as inputs of their node). Same nodes, same arithmetic: outputs
  are bit for bit those of the input order.
* Its live-bytes peak (`Schedule.peak`) is never higher than the input order's; when no
  candidate beats the input order, the input order is kept (the pass reports no change).
  A graph that is not topologically sorted is left as it is (the checker reports it).

Memory model (the simulator's, from `export.onnx_sizes`): a node output is live from the step
of its node to the step of its last reader, inclusive; graph outputs stay live to the end;
graph inputs and initializers belong to the caller and are the same bytes in every order, so
they are not counted. Sizes: `onnx_sizes.tensor_bytes` (ONNX shape inference) at the
ModelProto boundary, the values' own types inside the pass unless sizes are given; a value
of unknown shape counts 0 bytes.

Candidate orders (`Schedule.best`), the lowest peak kept, the input order on ties:

* sink: walk the input order; a node that would add bytes (its outputs outweigh the inputs it
  reads last) waits until a node that needs it runs, then runs just before it, or at the end
  when nothing does. Moves allocating sources (ConstantOfShape splats, a transposed input)
  from the top of the graph to their first reader.
* greedy list scheduling: among ready nodes, the one freeing the most bytes if any frees or
  adds none, else the next one of a given order; run on the input order and on the sunk one,
  and the sink walk once more over the latter.

onnxruntime follows the order only when it runs the file's order
(`ExecutionOrder.PRIORITY_BASED`); its default order is its own sort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import onnx
import onnx_ir as ir

from export.onnx_sizes import static_nbytes, tensor_bytes

SizeOf = Callable[[ir.Value], int]


def value_bytes(v: ir.Value) -> int:
    """Bytes of a value by its own dtype and shape (onnx_sizes' model); 0 when unknown."""
    if v.dtype is None or v.shape is None:
        return 0
    n = static_nbytes(int(v.dtype), v.shape.dims)
    return 0 if n is None else n


def sizes_by_name(sizes: Mapping[str, int]) -> SizeOf:
    return lambda v: sizes.get(v.name or "", 0)


def _body_reads(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing scopes that the node's subgraphs (recursively) read."""
    bodies = [a.as_graph() for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
    for a in node.attributes.values():
        if a.type == ir.AttributeType.GRAPHS:
            bodies.extend(a.as_graphs())
    defined: set[ir.Value] = set()
    read: list[ir.Value] = []
    for body in bodies:
        for g in (body, *body.subgraphs()):
            defined.update(g.inputs)
            defined.update(g.initializers.values())
            read.extend(g.outputs)
        for n in body.all_nodes():
            defined.update(n.outputs)
            read.extend(v for v in n.inputs if v is not None)
    return [v for v in read if v not in defined]


def node_reads(node: ir.Node) -> list[ir.Value]:
    """Every value a node reads, its bodies' outer reads included, each once."""
    reads = [v for v in node.inputs if v is not None] + _body_reads(node)
    return list(dict.fromkeys(reads))


class Schedule:
    """One graph's nodes as a scheduling problem: reads, dependencies, allocations."""

    def __init__(self, graph: ir.Graph, size: SizeOf = value_bytes):
        self.nodes = list(graph)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.reads = [node_reads(n) for n in self.nodes]
        self.outputs = set(graph.outputs)
        self.size = {v: size(v) for n in self.nodes for v in n.outputs}  # caller owns the rest
        self.deps = [
            sorted({index[p] for v in r if (p := v.producer()) in index}) for r in self.reads
        ]
        self.users: list[list[int]] = [[] for _ in self.nodes]
        for i, ds in enumerate(self.deps):
            for d in ds:
                self.users[d].append(i)
        self.readers: dict[ir.Value, int] = {}
        for r in self.reads:
            for v in r:
                if v in self.size:
                    self.readers[v] = self.readers.get(v, 0) + 1

    def is_topological(self, order: Sequence[int]) -> bool:
        pos = {v: k for k, v in enumerate(order)}
        return len(pos) == len(self.nodes) == len(order) and all(
            pos[d] < pos[i] for i, ds in enumerate(self.deps) for d in ds
        )

    def peak(self, order: Sequence[int]) -> int:
        """Most bytes of node outputs live at once when the nodes run in `order`."""
        left = dict(self.readers)
        live = best = 0
        for i in order:
            outs = self.nodes[i].outputs
            live += sum(self.size[o] for o in outs)
            best = max(best, live)
            for v in self.reads[i]:
                if v in left:
                    left[v] -= 1
                    if left[v] == 0 and v not in self.outputs:
                        live -= self.size[v]
            live -= sum(
                self.size[o] for o in outs if o not in self.readers and o not in self.outputs
            )
        return best

    def _net(self, i: int, left: dict[ir.Value, int]) -> int:
        """Bytes node i adds if it runs now: its outputs minus the inputs it reads last."""
        alloc = sum(self.size[o] for o in self.nodes[i].outputs)
        freed = sum(
            self.size[v] for v in self.reads[i] if left.get(v) == 1 and v not in self.outputs
        )
        return alloc - freed

    def _consume(self, i: int, left: dict[ir.Value, int]) -> None:
        for v in self.reads[i]:
            if v in left:
                left[v] -= 1

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
                    self._consume(u, left)
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
            self._consume(v, left)
            for u in self.users[v]:
                missing[u] -= 1
                if missing[u] == 0:
                    ready.add(u)
        return out

    def best(self) -> list[int]:
        """The candidate order of lowest peak (module docstring); the input order on ties."""
        given = list(range(len(self.nodes)))
        if len(given) < 3 or not any(self.size.values()) or not self.is_topological(given):
            return given  # nothing to gain, or not ours to repair
        sunk = self.sink(given)
        candidates = [
            given,
            sunk,
            self.greedy(given),
            self.greedy(sunk),
            self.sink(self.greedy(sunk)),
        ]
        scored = [(self.peak(c), k) for k, c in enumerate(candidates) if self.is_topological(c)]
        return candidates[min(scored)[1]]


def _rank(order: Sequence[int]) -> list[int]:
    rank = [0] * len(order)
    for k, v in enumerate(order):
        rank[v] = k
    return rank


class ReorderForMemoryPass(ir.passes.InPlacePass):
    """The main graph's nodes in the candidate order of lowest live-bytes peak (contract:
    module docstring). `sizes`: bytes by value name; None sizes values by their own types."""

    def __init__(self, sizes: Mapping[str, int] | None = None):
        super().__init__()
        self.size = value_bytes if sizes is None else sizes_by_name(sizes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        s = Schedule(graph, self.size)
        order = s.best()
        if order == list(range(len(s.nodes))):
            return ir.passes.PassResult(model, modified=False)
        graph.remove(s.nodes)
        graph.extend(s.nodes[i] for i in order)
        return ir.passes.PassResult(model, modified=True)


def live_peak(model: onnx.ModelProto, sizes: Mapping[str, int] | None = None) -> int:
    """The contract's measure: most bytes of node outputs live at once in the listed order
    (sizes by value name; None: `onnx_sizes.tensor_bytes`)."""
    graph = ir.serde.deserialize_model(model).graph
    s = Schedule(graph, sizes_by_name(tensor_bytes(model) if sizes is None else sizes))
    return s.peak(range(len(s.nodes)))


def reorder_for_memory(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose `graph.node` is listed in the candidate order of lowest
    live-bytes peak (the pass's order; nothing else in the proto changes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = ir.serde.deserialize_model(model).graph
    order = Schedule(graph, sizes_by_name(tensor_bytes(model))).best()
    if order != list(range(len(order))):
        nodes = list(out.graph.node)
        del out.graph.node[:]
        out.graph.node.extend(nodes[i] for i in order)
    return out
