"""Run exported graphs: one `Runner` over onnxruntime or OpenVINO, and steppers on top.

    Runner(model_or_path, runtime="onnxruntime", provider="CPUExecutionProvider", threads=2)
    Runner(model_or_path, runtime="openvino", device="CPU", threads=2)
    Runner(model_or_path, runtime="qnn-htp")   # QNN HTP, no CPU fallback (export.qnn): fp16,
                                               # or an integer step's int32 form (export.int32)
    Runner(model_or_path, runtime="iree")      # IREE llvm-cpu on this machine (export.iree)
    runner.run({name: ndarray}) -> {name: ndarray}

    OnnxStepper(net, rule, program, runtime=...)(params, state, x1, x2, noise=None)
        -> (params', state', metrics)         the step (or its per-block graphs) on a runtime
    make_stepper(runtime, net, rule, opt)  # "torch" gives edge.step.train_step itself
    integer_stepper(runtime, net, rule, plan, qparams)   integer mode's step_fn

OpenVINO is imported lazily (an optional extra) and compiled with INFERENCE_PRECISION_HINT
f32: its CPU default is bf16, far from torch's numbers. QNN HTP and IREE (optional extras
too) get the npu operator profile of the step by default (export.profile: same numbers).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from edge.optim import OptimConfig
from export.manifest import NEW_PARAMS, NEW_STATE, NOISE, PARAMS, STATE, GraphIO
from export.step import StepProgram, fp32_program, require_local

RUNTIMES = ("torch", "onnxruntime", "openvino", "qnn-htp", "iree")
NPU_RUNTIMES = ("qnn-htp", "iree")  # the npu operator profile by default
OPENVINO_EXTRA = 'pip install -e ".[openvino]"'
Arrays = dict[str, np.ndarray]


def _model_bytes(model: onnx.ModelProto | str | Path) -> bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    path = Path(model)
    if not path.is_file():
        raise EdgeError(f"no ONNX model at {path}")
    return path.read_bytes()


def ort_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def check_provider(provider: str) -> None:
    available = ort_providers()
    if provider not in available:
        raise EdgeError(
            f"onnxruntime execution provider {provider!r} is not available; "
            f"available: {', '.join(available)}"
        )


def openvino_devices() -> list[str]:
    return list(_openvino().Core().available_devices)


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise EdgeError(f"the openvino runtime is not installed; {OPENVINO_EXTRA}") from None
    return openvino


class Runner:
    """One compiled graph on one runtime; `run` maps input names to arrays and back."""

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        runtime: str = "onnxruntime",
        provider: str | None = None,
        device: str | None = None,
        threads: int = 2,
        options: dict[str, Any] | None = None,
    ):
        if runtime not in RUNTIMES[1:]:
            raise EdgeError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES[1:])}")
        if threads < 1:
            raise EdgeError(f"threads must be positive, got {threads}")
        self.runtime, self.threads = runtime, threads
        blob = _model_bytes(model)
        self.placement: Any = None  # where the nodes went, for accelerator runtimes
        if runtime == "onnxruntime":
            self._init_ort(blob, provider or "CPUExecutionProvider")
        elif runtime == "qnn-htp":
            self._init_qnn(blob, options or {})
        elif runtime == "iree":
            self._init_iree(blob)
        else:
            self._init_openvino(blob, device or "CPU")

    def _init_ort(self, blob: bytes, provider: str) -> None:
        import onnxruntime

        check_provider(provider)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle pool threads sleep instead of spinning (like OMP_WAIT_POLICY=PASSIVE for torch):
        # a step's kernels run for milliseconds, and spinning threads steal the cores the next
        # kernel needs on a shared or power-limited device (1.7x slower on 2 busy cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider"
                                  else [])
        self.device = provider
        self._sess = onnxruntime.InferenceSession(blob, opts, providers=providers)
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self._shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                        for i in self._sess.get_inputs()}
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def _init_qnn(self, blob: bytes, options: dict[str, Any]) -> None:
        from export.qnn import integer_session, is_integer_graph, qnn_session

        model = onnx.load_model_from_string(blob)
        self._form = None  # integer steps: the int32 form, which converts at its interface
        if is_integer_graph(model):
            self._sess, self.placement, self._form = integer_session(model,
                                                                     threads=self.threads)
        else:
            self._sess, self.placement = qnn_session(blob, threads=self.threads, **options)
        self.device = "QNN HTP"
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self._shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                        for i in self._sess.get_inputs()}
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def _init_iree(self, blob: bytes) -> None:
        from export.iree import IreeModule, compile_host

        graph = onnx.load_model_from_string(blob).graph
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self._shapes = {i.name: tuple(d.dim_value if d.HasField("dim_value") else None
                                      for d in i.type.tensor_type.shape.dim)
                        for i in graph.input}
        self.device = "IREE llvm-cpu (local-sync)"
        dtypes = [onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
                  for o in graph.output]
        self._module = IreeModule(compile_host(onnx.load_model_from_string(blob)),
                                  self.input_names, self.output_names, output_dtypes=dtypes)

    def _init_openvino(self, blob: bytes, device: str) -> None:
        ov = _openvino()
        core = ov.Core()
        available = list(core.available_devices)
        if device not in available:
            raise EdgeError(
                f"OpenVINO device {device!r} is not available; available: {', '.join(available)}"
            )
        with tempfile.TemporaryDirectory() as tmp:  # read_model wants a file for ONNX
            path = Path(tmp) / "model.onnx"
            path.write_bytes(blob)
            model = core.read_model(str(path))
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads}
        if device != "CPU":
            config.pop("INFERENCE_NUM_THREADS")
        self.device = device
        self._compiled = core.compile_model(model, device, config)
        self._request = self._compiled.create_infer_request()
        graph = onnx.load_model_from_string(blob).graph
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        # a port may carry several tensor names (OpenVINO merges names when it fuses ops)
        self._in_ports = _ports(self._compiled.inputs, self.input_names)
        self._out_ports = _ports(self._compiled.outputs, self.output_names)
        self._shapes = {
            n: tuple(d.get_length() if d.is_static else None
                     for d in self._compiled.inputs[i].get_partial_shape())
            for n, i in self._in_ports.items()
        }

    def run(self, feeds: dict[str, Any]) -> Arrays:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise EdgeError(f"missing graph inputs: {', '.join(missing)}")
        arrays = {n: np.asarray(_numpy(feeds[n]), order="C") for n in self.input_names}
        for n, a in arrays.items():
            want = self._shapes[n]
            ok = len(want) == a.ndim and all(
                w in (None, s) for w, s in zip(want, a.shape, strict=True)
            )
            if not ok:
                shown = [w if w is not None else "?" for w in want]
                raise EdgeError(f"input {n} has shape {list(a.shape)}, the graph wants {shown}")
        if self.runtime == "qnn-htp" and self._form is not None:
            outs = self._sess.run(self.output_names, self._form.feed(arrays))
            return self._form.restore(dict(zip(self.output_names, outs, strict=True)))
        if self.runtime in ("onnxruntime", "qnn-htp"):
            outs = self._sess.run(self.output_names, arrays)
            return dict(zip(self.output_names, outs, strict=True))
        if self.runtime == "iree":
            return self._module.run(arrays)
        self._request.infer({self._in_ports[n]: a for n, a in arrays.items()})
        return {
            name: np.array(self._request.get_output_tensor(i).data, copy=True)
            for name, i in self._out_ports.items()
        }


def _ports(ports: Any, names: list[str]) -> dict[str, int]:
    """Graph tensor name -> index of the compiled model's port that carries it."""
    out = {}
    for name in names:
        found = [i for i, p in enumerate(ports) if name in p.get_names()]
        if not found:
            raise EdgeError(f"OpenVINO lost the graph tensor {name!r} while compiling")
        out[name] = found[0]
    return out


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def apply_bindings(carried: Arrays, outputs: Arrays, io: GraphIO) -> None:
    """Feed a graph's new_* outputs back under the input names they replace."""
    for out, inp in io.bindings:
        carried[inp] = outputs[out]


def draw_noise(ios: list[GraphIO], rng: np.random.Generator, low: int, high: int) -> Arrays:
    """Uniform integers in [low, high) for every noise/* input of the graphs."""
    specs = {t.name: t for io in ios for t in io.inputs if t.name.startswith(NOISE)}
    return {n: rng.integers(low, high, t.shape, dtype=t.dtype) for n, t in sorted(specs.items())}


def run_layer_chain(
    runners: list[Runner], ios: list[GraphIO], carried: Arrays, x1: Any, x2: Any,
    noise: Arrays | None = None,
) -> tuple[Arrays, np.ndarray]:
    """One whole step through the per-block graphs: block 0 takes the views, every later
    block the previous one's `y`; the bindings apply after the last block. Returns (new
    carried inputs, per-block losses)."""
    new, losses, noise = dict(carried), [], noise or {}
    x = None
    for runner, io in zip(runners, ios, strict=True):
        feeds = {n: carried[n] for n in runner.input_names if n in carried}
        feeds.update({n: noise[n] for n in runner.input_names if n in noise})
        feeds.update({"x1": x1, "x2": x2} if "x1" in runner.input_names else {"x": x})
        outs = runner.run(feeds)
        x = outs["y"]
        losses.append(outs["loss"])
        apply_bindings(new, outs, io)
    return new, np.stack(losses)


Step = Callable[..., tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]]


class OnnxStepper:
    """A step program (fp32 by default, or `program`) run as exported graphs on a runtime.

    The graphs are exported at the first call (the batch size and the parameter and state
    shapes fixed from that call) and re-exported if they ever change. `per_layer=True` runs
    the per-block graphs in a chain instead of the whole-step graph. Random bits, where the
    program rounds stochastically, are the caller's (`noise=`, keyed like the graph inputs
    without the `noise/` prefix) or drawn from `seed`.
    """

    def __init__(
        self, net: NetSpec, rule: Any, opt: OptimConfig | None = None,
        runtime: str = "onnxruntime", provider: str | None = None, device: str | None = None,
        threads: int = 2, per_layer: bool = False, program: StepProgram | None = None,
        seed: int = 0, profile: str | None = None, options: dict[str, Any] | None = None,
    ):
        if runtime not in RUNTIMES[1:]:
            raise EdgeError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES[1:])}")
        self.net, self.rule = net, rule
        self.program = program or fp32_program(net, rule, opt)
        self.runner_args = {"runtime": runtime, "provider": provider, "device": device,
                            "threads": threads, "options": options}
        self.profile = profile or ("npu" if runtime in NPU_RUNTIMES else "plain")
        self.per_layer = per_layer
        self.rng = np.random.default_rng(seed)
        self._key: tuple | None = None
        self._fixed = False  # graphs given by from_graphs: never re-exported
        self._runners: list[Runner] = []
        self._ios: list[GraphIO] = []
        if runtime == "openvino":
            _openvino()  # fail now, not at the first step
        elif runtime == "qnn-htp":
            from export.qnn import _register, check_optimizer

            _register()
            if opt is not None:
                check_optimizer(opt.name, (options or {}).get("precision", "fp16"))
        elif runtime == "iree":
            from export.iree import _compiler, _runtime

            _compiler()
            _runtime()
        elif provider is not None:
            check_provider(provider)

    def describe(self) -> dict[str, Any]:
        """What runs the step: runtime, device, operator profile, graphs and, on
        accelerators, where each graph's nodes went."""
        placed = [r.placement.to_dict() for r in self._runners if r.placement is not None]
        return {"name": self.runner_args["runtime"], "profile": self.profile,
                "device": self._runners[0].device if self._runners else None,
                "per_layer": self.per_layer, "graphs": len(self._runners),
                "placement": placed or None}

    @classmethod
    def from_graphs(
        cls, net: NetSpec, rule: Any, opt: OptimConfig | None, models: list[onnx.ModelProto],
        ios: list[GraphIO], **kwargs: Any,
    ) -> OnnxStepper:
        """A stepper over graphs already exported: one whole-step graph, or the per-block
        graphs in order (then the stepper chains them)."""
        per_layer = any(t.name == "y" for t in ios[0].outputs)  # block graphs pass y on
        stepper = cls(net, rule, opt, per_layer=per_layer, **kwargs)
        from export.profile import apply_profile

        models = [apply_profile(m, stepper.profile) for m in models]
        stepper._runners = [Runner(m, **stepper.runner_args) for m in models]
        stepper._ios, stepper._fixed = list(ios), True
        return stepper

    def _build(self, params: dict[str, Tensor], state: dict[str, Tensor], batch: int) -> None:
        from export.step import block_graphs, step_graph

        if self.per_layer:
            models, self._ios = block_graphs(self.net, self.rule, self.program, params, state,
                                             batch, profile=self.profile)
        else:
            model, manifest = step_graph(self.net, self.rule, self.program, params, state,
                                         batch, profile=self.profile)
            models, self._ios = [model], [manifest.step]
        self._runners = [Runner(m, **self.runner_args) for m in models]

    def __call__(
        self, params: dict[str, Tensor], state: dict[str, Tensor], x1: Tensor, x2: Tensor,
        donate: bool = False, noise: dict[str, Tensor] | None = None,
        labels: Tensor | None = None, head: Any = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """One step; `donate` and `head` are accepted for train_step's signature (the runtime
        always returns fresh tensors; the head is the program's); `labels` feed a step that
        has a head."""
        key = (tuple((k, tuple(v.shape)) for k, v in params.items()),
               tuple((k, tuple(v.shape)) for k, v in state.items()), tuple(x1.shape))
        if key != self._key and not self._fixed:
            self._build(params, state, int(x1.shape[0]))
            self._key = key
        carried = {PARAMS + k: _numpy(v) for k, v in params.items()}
        carried.update({STATE + k: _numpy(v) for k, v in state.items()})
        if noise is not None:
            bits = {NOISE + k: _numpy(v) for k, v in noise.items()}
        else:
            bits = draw_noise(self._ios, self.rng, 0, 1 << 16)
        if labels is not None:
            bits["labels"] = _numpy(labels)
        if self.per_layer:
            new, layer_loss = run_layer_chain(self._runners, self._ios, carried, _numpy(x1),
                                              _numpy(x2), bits)
            metrics = {"loss": torch.from_numpy(np.asarray(layer_loss.sum())),
                       "layer_loss": torch.from_numpy(layer_loss)}
        else:
            outs = self._runners[0].run({**carried, **bits, "x1": x1, "x2": x2})
            new = dict(carried)
            apply_bindings(new, outs, self._ios[0])
            metrics = {k: torch.from_numpy(np.asarray(v)) for k, v in outs.items()
                       if not k.startswith((NEW_PARAMS, NEW_STATE))}
        new_params = {k: torch.from_numpy(np.asarray(new[PARAMS + k])) for k in params}
        new_state = {k: torch.from_numpy(np.asarray(new[STATE + k])) for k in state}
        return new_params, new_state, metrics


def integer_stepper(runtime: str, net: NetSpec, rule: Any, plan: Any,
                    qparams: dict[str, Tensor], **kwargs: Any) -> Callable:
    """Integer mode's `step_fn` (`quant.engine.QuantEngine`) on a runtime: the exported
    integer step graph, fed the engine's own random bits."""
    from export.step import integer_program

    head = kwargs.pop("head", None)
    stepper = OnnxStepper(net, rule, None, runtime=runtime,
                          program=integer_program(net, rule, plan, qparams, head), **kwargs)

    def step_fn(stores, state, x1, x2, noise, labels=None):
        return stepper(stores, state, x1, x2, noise=noise, labels=labels)

    step_fn.stepper = stepper  # where the nodes went, for the CLI's report
    return step_fn


def make_stepper(
    runtime: str, net: NetSpec, rule: Any, opt: OptimConfig, **kwargs: Any
) -> Step:
    """`stepper(params, state, x1, x2)` on the named runtime: torch is the eager step."""
    if runtime == "torch":
        from edge.step import train_step

        return functools.partial(train_step, net, rule, opt)
    if runtime not in RUNTIMES:
        raise EdgeError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    require_local(rule)  # a backprop baseline has no forward-only graph: say so before training
    head = kwargs.pop("head", None)
    program = fp32_program(net, rule, opt, head) if head is not None else None
    return OnnxStepper(net, rule, opt, runtime=runtime, program=program, **kwargs)
