"""IREE: compile an exported step for the host and run it, or cross-compile it for an MCU.

    compile_host(model) -> bytes                     a VM flatbuffer for llvm-cpu on this machine
    IreeModule(vmfb, input_names, output_names).run(feeds) -> {name: ndarray}
    cross_compile(model, cpu, out_dir) -> Artifact   a static library (.o + .h) and its VM module
    compile_bundle(bundle_dir, target) -> dict       all of it for a bundle, with a parity check
    elf_sizes(path) -> {"code", "rodata", "data", "bss"};  elf_undefined(path) -> symbols

The `iree` extra brings iree-base-compiler (with `iree-import-onnx`) and iree-base-runtime.
Graphs go through the npu operator profile first: the plain graph's max-pool backward
(ScatterElements by MaxPool indices) compiles but crashes the llvm-cpu code at run time, and
the profile's rewrite is exact (export/profile.py).

Integer steps: IREE 3.13's ONNX import cannot legalize a Cast to int16 or uint16 (the
int8-w16 plan's 16-bit weight stores), while it takes CastLike to the same type; `prepare`
rewrites every such Cast(x, to=T) into CastLike(x, a T scalar), which ONNX defines as the same
conversion (`cast_like_16`). Everything else of the integer step (int64 elementwise maths,
MatMulInteger, ConvInteger, int8 / uint8 / int16 tensors) compiles as it is, bit-exact with
onnxruntime on the host. On 32-bit MCUs some int64 and float64 maths (the loss) becomes
compiler-rt / libgcc calls (`__muldi3`, `__adddf3`, ...) that the firmware links, like
memcpy: the artifact lists them (`imports`, the object's undefined symbols).

Cross compilation: the target file's `cpu` picks an LLVM triple and *explicit* CPU features
(LLVM cannot derive Arm / RISC-V features from a CPU name here). The result is the dispatch
code as an ELF object for static linking (`--iree-llvmcpu-link-static`) plus the VM module
that schedules it. On chips without an FPU (Cortex-M0+) the float maths calls soft-float
helpers (`__mulsf3`, ...) that the firmware's libgcc / compiler-rt provides at link time,
as it also provides memcpy/memset. Code size = the object's executable sections; the IREE
runtime itself (VM + HAL, linked once per firmware) is not counted.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge.errors import EdgeError

IREE_EXTRA = 'pip install -e ".[iree]"'
IREE_DIR = "iree"
REPORT_FILE = "iree/iree.json"
# IREE llvm-cpu vs onnxruntime CPU on the same fp32 graph: relative L2 per tensor after the
# check's steps (reassociated reductions and fused multiply-adds: measured ~1e-7)
TOLERANCE = 1e-5
CRASHERS = ("ScatterElements", "MaxPool with Indices")  # crash IREE's llvm-cpu code: refused


@dataclass(frozen=True)
class CpuSpec:
    triple: str  # LLVM target triple
    features: str  # explicit LLVM CPU features
    abi: str | None = None
    float_abi: str | None = None  # "soft" for chips without an FPU


# -mcpu style names of targets/devices/*.toml -> how LLVM is told about them
CPUS: dict[str, CpuSpec] = {
    "cortex-m4": CpuSpec("thumbv7em-none-eabihf", "+armv7e-m,+thumb-mode,+dsp,+vfp4d16sp"),
    "cortex-m7": CpuSpec("thumbv7em-none-eabihf", "+armv7e-m,+thumb-mode,+dsp,+fp-armv8d16sp"),
    "cortex-m55": CpuSpec("thumbv8.1m.main-none-eabihf",
                          "+armv8.1-m.main,+thumb-mode,+dsp,+mve.fp,+fp-armv8d16sp"),
    "cortex-m0plus": CpuSpec("thumbv6m-none-eabi", "+armv6-m,+thumb-mode,+soft-float",
                              float_abi="soft"),
    "rv32imafc": CpuSpec("riscv32-unknown-elf", "+m,+a,+f,+c", abi="ilp32f"),
}


@dataclass(frozen=True)
class Artifact:
    cpu: str
    triple: str
    features: str
    library: str  # the static library object, relative to the bundle (or out_dir)
    header: str
    module: str  # the VM flatbuffer that calls into the library
    code_bytes: int  # executable sections of the object
    rodata_bytes: int
    data_bytes: int
    bss_bytes: int
    module_bytes: int
    seconds: float
    imports: tuple[str, ...] = ()  # symbols the firmware links in (compiler-rt / libgcc helpers)

    @property
    def flash_bytes(self) -> int:
        """What the step adds to flash: code, constants, initialised data, the VM module."""
        return self.code_bytes + self.rodata_bytes + self.data_bytes + self.module_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flash_bytes": self.flash_bytes}


def available() -> bool:
    try:
        _compiler()
        _runtime()
    except EdgeError:
        return False
    return True


def _compiler() -> Any:
    try:
        import iree.compiler.tools as tools
        import iree.compiler.tools.import_onnx  # noqa: F401
    except ImportError:
        raise EdgeError(f"the IREE compiler is not installed; {IREE_EXTRA}") from None
    return tools


def _runtime() -> Any:
    try:
        import iree.runtime as rt
    except ImportError:
        raise EdgeError(f"the IREE runtime is not installed; {IREE_EXTRA}") from None
    return rt


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph IREE gets: the npu profile, and nothing it is known to crash on."""
    from export.profile import npu_profile, npu_violations

    model = npu_profile(model)
    bad = [v for v in npu_violations(model) if v.startswith(CRASHERS)]
    if bad:
        raise EdgeError(f"IREE cannot run this graph safely: {', '.join(bad)}")
    return cast_like_16(model)


_LIKE_16 = {onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16}


def cast_like_16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Cast to int16 / uint16 as CastLike to a scalar of that type (the same
    conversion by the ONNX definition of CastLike; IREE's importer refuses the Cast)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    likes: dict[int, str] = {}
    for node in out.graph.node:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to = onnx.helper.get_attribute_value(node.attribute[0])
        if to not in _LIKE_16:
            continue
        if to not in likes:
            likes[to] = f"cast_like/{np.dtype(_LIKE_16[to]).name}"
            out.graph.initializer.append(
                onnx.numpy_helper.from_array(np.zeros((), _LIKE_16[to]), likes[to]))
        node.op_type = "CastLike"
        del node.attribute[:]
        node.input.append(likes[to])
    if likes and max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) < 15:
        raise EdgeError("CastLike needs opset 15; the graph's is older")
    return out


def import_onnx(model: onnx.ModelProto, work: Path) -> Path:
    """ONNX -> MLIR (torch dialect) with iree-import-onnx."""
    _compiler()
    src, mlir = work / "step.onnx", work / "step.mlir"
    onnx.save(model, src)
    proc = subprocess.run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(src),
                           "-o", str(mlir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgeError(f"iree-import-onnx failed: {_last_error(proc.stderr)}")
    return mlir


def _compile(mlir: Path, args: list[str], out: Path) -> None:
    tools = _compiler()
    try:
        tools.compile_file(str(mlir), target_backends=["llvm-cpu"], output_file=str(out),
                           extra_args=args)
    except tools.CompilerToolError as e:
        raise EdgeError(f"iree-compile failed: {_last_error(str(e))}") from None


def compile_host(model: onnx.ModelProto, prepared: bool = False) -> bytes:
    """A VM flatbuffer of the graph for this machine's CPU (llvm-cpu, embedded ELF)."""
    _compiler()  # a missing extra is the error, whatever the graph
    model = model if prepared else prepare(model)
    with tempfile.TemporaryDirectory() as tmp:
        mlir = import_onnx(model, Path(tmp))
        out = Path(tmp) / "step.vmfb"
        _compile(mlir, ["--iree-llvmcpu-target-cpu=host"], out)
        return out.read_bytes()


def cpu_spec(cpu: str) -> CpuSpec:
    if cpu not in CPUS:
        raise EdgeError(f"no IREE cross-compilation recipe for cpu {cpu!r}; known: "
                        f"{', '.join(CPUS)}")
    return CPUS[cpu]


def cross_compile(model: onnx.ModelProto, cpu: str, out_dir: Path, rel_to: Path | None = None,
                  prepared: bool = False) -> Artifact:
    """The step as a static library for `cpu` (out_dir/step.o, step.h) and its VM module."""
    spec = cpu_spec(cpu)
    model = model if prepared else prepare(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib, module = out_dir / "step.o", out_dir / "step.vmfb"
    args = [f"--iree-llvmcpu-target-triple={spec.triple}",
            f"--iree-llvmcpu-target-cpu-features={spec.features}",
            "--iree-llvmcpu-link-embedded=false", "--iree-llvmcpu-link-static",
            f"--iree-llvmcpu-static-library-output-path={lib}"]
    if spec.abi:
        args.append(f"--iree-llvmcpu-target-abi={spec.abi}")
    if spec.float_abi:
        args.append(f"--iree-llvmcpu-target-float-abi={spec.float_abi}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _compile(import_onnx(model, Path(tmp)), args, module)
    seconds = time.perf_counter() - start
    sizes = elf_sizes(lib)
    base = rel_to or out_dir
    return Artifact(cpu, spec.triple, spec.features, str(lib.relative_to(base)),
                    str(lib.with_suffix(".h").relative_to(base)), str(module.relative_to(base)),
                    sizes["code"], sizes["rodata"], sizes["data"], sizes["bss"],
                    module.stat().st_size, round(seconds, 2), elf_undefined(lib))


class IreeModule:
    """A compiled step in the IREE runtime (local-sync: one thread, deterministic)."""

    def __init__(self, vmfb: bytes, input_names: list[str], output_names: list[str],
                 function: str = "main_graph", output_dtypes: list[Any] | None = None):
        rt = _runtime()
        self.input_names, self.output_names = list(input_names), list(output_names)
        # the runtime hands unsigned tensors back as signed ones of the same width
        self.output_dtypes = [np.dtype(d) for d in output_dtypes] if output_dtypes else None
        config = rt.Config(device=rt.get_device("local-sync"))
        self._ctx = rt.SystemContext(config=config)
        self._ctx.add_vm_module(rt.VmModule.copy_buffer(self._ctx.instance, vmfb))
        self._fn = self._ctx.modules.module[function]

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        # np.array(copy=True) keeps 0-d tensors 0-d (ascontiguousarray makes them 1-d)
        args = [np.array(feeds[n], order="C", copy=True) for n in self.input_names]
        res = self._fn(*args)
        res = res if isinstance(res, list | tuple) else [res]
        out = {n: np.asarray(r.to_host()) for n, r in zip(self.output_names, res, strict=True)}
        if self.output_dtypes:
            for (n, a), d in zip(out.items(), self.output_dtypes, strict=True):
                if a.dtype != d and a.dtype.itemsize == d.itemsize:
                    out[n] = a.view(d)
        return out


# ------------------------------------------------------------------------------ ELF sizes

_SHF_WRITE, _SHF_ALLOC, _SHF_EXEC = 0x1, 0x2, 0x4
_SHT_NOBITS = 8


def elf_sizes(path: str | Path) -> dict[str, int]:
    """Section sizes of an ELF object by kind (what `size` prints as text/data/bss, with
    read-only data apart): code = allocated executable, rodata = allocated read-only,
    data = allocated writable with contents, bss = allocated writable without."""
    out = {"code": 0, "rodata": 0, "data": 0, "bss": 0}
    for kind, flags, _, size, _, _ in _sections(*_elf(path)):
        if not flags & _SHF_ALLOC:
            continue
        if flags & _SHF_EXEC:
            out["code"] += size
        elif not flags & _SHF_WRITE:
            out["rodata"] += size
        elif kind == _SHT_NOBITS:
            out["bss"] += size
        else:
            out["data"] += size
    return out


_SHT_SYMTAB = 2


def _elf(path: str | Path) -> tuple[bytes, bool, str]:
    """(the file's bytes, 64-bit?, struct byte order) of an ELF object, or EdgeError."""
    blob = Path(path).read_bytes()
    if blob[:4] != b"\x7fELF":
        raise EdgeError(f"{path} is not an ELF object")
    return blob, blob[4] == 2, "<" if blob[5] == 1 else ">"


def _sections(blob: bytes, is64: bool, e: str) -> list[tuple[int, int, int, int, int, int]]:
    """Every section header as (type, flags, offset, size, link, entsize)."""
    if is64:
        shoff, = struct.unpack_from(e + "Q", blob, 0x28)
        shentsize, shnum = struct.unpack_from(e + "HH", blob, 0x3A)
        fmt = e + "IIQQQQIIQQ"
    else:
        shoff, = struct.unpack_from(e + "I", blob, 0x20)
        shentsize, shnum = struct.unpack_from(e + "HH", blob, 0x2E)
        fmt = e + "IIIIIIIIII"
    out = []
    for i in range(shnum):
        _, kind, flags, _, off, size, link, _, _, ent = struct.unpack_from(
            fmt, blob, shoff + i * shentsize)
        out.append((kind, flags, off, size, link, ent))
    return out


def elf_undefined(path: str | Path) -> tuple[str, ...]:
    """The undefined global symbols of an ELF object (what the firmware's link provides)."""
    blob, is64, e = _elf(path)
    sections = _sections(blob, is64, e)
    names: set[str] = set()
    for kind, _, off, size, link, ent in sections:
        if kind != _SHT_SYMTAB or not ent:
            continue
        str_off = sections[link][2]
        for k in range(1, size // ent):
            at = off + k * ent
            if is64:
                name, info, _, shndx = struct.unpack_from(e + "IBBH", blob, at)
            else:
                name, _, _, info, _, shndx = struct.unpack_from(e + "IIIBBH", blob, at)
            if shndx == 0 and info >> 4 != 0:  # undefined, not local
                end = blob.index(b"\0", str_off + name)
                names.add(blob[str_off + name:end].decode())
    return tuple(sorted(names))


# ------------------------------------------------------------------------------ bundles


def parity(model: onnx.ModelProto, io: Any, state: dict[str, np.ndarray], module: IreeModule,
           steps: int = 3, seed: int = 0, noise: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `steps` steps from `state` in onnxruntime and in IREE on the same random views;
    the worst relative L2 and max |difference| over every bound tensor, and whether every
    integer tensor is equal."""
    from export.runner import Runner, apply_bindings, draw_noise

    ort = Runner(model)
    rng = np.random.default_rng(seed)
    a, b = dict(state), dict(state)
    x = io.input("x1")
    worst_rel, worst_abs, int_equal = 0.0, 0.0, True
    for _ in range(steps):
        if np.issubdtype(np.dtype(x.dtype), np.integer):
            views = {v: rng.integers(-64, 64, x.shape).astype(x.dtype) for v in ("x1", "x2")}
        else:
            views = {v: rng.standard_normal(x.shape).astype(x.dtype) for v in ("x1", "x2")}
        bits = draw_noise([io], rng, *(noise or {"low": 0, "high": 1 << 16}).values())
        apply_bindings(a, ort.run({**a, **views, **bits}), io)
        apply_bindings(b, module.run({**b, **views, **bits}), io)
    for name in a:
        ref, got = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        if np.issubdtype(np.asarray(a[name]).dtype, np.integer):
            int_equal &= bool(np.array_equal(ref, got))
        worst_abs = max(worst_abs, float(np.abs(ref - got).max()) if ref.size else 0.0)
        norm = float(np.linalg.norm(ref))
        worst_rel = max(worst_rel, float(np.linalg.norm(ref - got)) / max(norm, 1e-30))
    return {"steps": steps, "max_rel_l2": worst_rel, "max_abs_diff": worst_abs,
            "integers_equal": int_equal, "tolerance": TOLERANCE}


def compile_bundle(bundle: str | Path, target: Any = None, steps: int = 3) -> dict[str, Any]:
    """Compile a bundle's whole-step graph with IREE: host module + parity check against
    onnxruntime, and a static library for the target's cpu if it has one. Writes the
    artifacts and iree/iree.json into the bundle and adds them to the manifest's hashes."""
    from export.bundle import MANIFEST, check_bundle, load_state, sha256

    bundle = Path(bundle)
    manifest = check_bundle(bundle)
    plain = onnx.load(str(bundle / manifest.step.file))
    model = prepare(plain)
    out = bundle / IREE_DIR
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    vmfb = compile_host(model, prepared=True)
    host_seconds = time.perf_counter() - start
    (out / "host.vmfb").write_bytes(vmfb)
    io = manifest.step
    module = IreeModule(vmfb, [t.name for t in io.inputs], [t.name for t in io.outputs],
                        output_dtypes=[t.dtype for t in io.outputs])
    check = parity(plain, io, load_state(bundle), module, steps=steps, noise=manifest.noise)
    if check["max_rel_l2"] > TOLERANCE or not check["integers_equal"]:
        raise EdgeError(f"IREE's step differs from onnxruntime's: relative L2 "
                        f"{check['max_rel_l2']:.2e} (tolerance {TOLERANCE:.0e}), integers "
                        f"equal: {check['integers_equal']}")
    report: dict[str, Any] = {
        "profile": "npu", "host": {"module": "iree/host.vmfb", "bytes": len(vmfb),
                                   "seconds": round(host_seconds, 2)},
        "parity": check, "cross": None, "versions": _versions(),
        "graph_sha256": hashlib.sha256(plain.SerializeToString()).hexdigest(),
    }
    cpu = getattr(target, "cpu", None) if target is not None else None
    if cpu is not None:
        art = cross_compile(model, cpu, out / cpu, rel_to=bundle, prepared=True)
        report["cross"] = {**art.to_dict(), "target": target.name,
                           "flash": _flash_figure(target, art.flash_bytes)}
    (bundle / REPORT_FILE).write_text(json.dumps(report, indent=2))
    files = dict(manifest.files)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(bundle))] = sha256(p)
    (bundle / MANIFEST).write_text(manifest.with_(files=files).to_json())
    return report


def _flash_figure(target: Any, need: int) -> dict[str, Any] | None:
    flash = target.largest("flash") if hasattr(target, "largest") else None
    if flash is None:
        return None
    return {"tier": flash.name, "capacity": flash.bytes, "used": need,
            "fraction": need / flash.bytes, "fits": need <= flash.bytes}


def read_report(bundle: str | Path) -> dict[str, Any] | None:
    """The bundle's iree/iree.json, if `edge export --compile iree` wrote one."""
    path = Path(bundle) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("iree-base-compiler", "iree-base-runtime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower()]
    errors += [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[0][:300]
