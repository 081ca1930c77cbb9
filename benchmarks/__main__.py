"""`python -m benchmarks PROFILE`: the paper's question, answered side by side on this machine.

Profiles (each writes benchmarks/results/PROFILE/{results.json, results.md, *.png}):
  quick  CIFAR-10, best local rule (CLAPP++) vs BP-InfoNCE vs the random encoder, 2 seeds,
         plus memory, speed, the exported step's speed and quantization; about 45 min on
         2 CPU cores
  rules  every rule at the quick budget (hours; resumable: rerun the same command)
  full   the paper's scale (VGG-6 at full width, 100 epochs) for a GPU: --device cuda
  smoke  every section in a few minutes on digits; its numbers mean nothing

Provenance. Every section is stamped when it is measured (`provenance`: run id, date,
machine, git commit, whether the tree was modified, a digest of the code) and the stamp is
never rewritten. A section already in results.json is reused only under `--reuse`:
  same-code  (default) only if it was measured by this very code (same code digest): an
             interrupted run resumes, nothing older stands in for a new figure
  any        whatever is there, however old (its own stamp says when and where)
  none       measure everything (also `--fresh`)
The same policy decides which trained runs of the accuracy section may be reused. The
results say, per section and in the headline, which figures were measured in this run and
which were reused from which run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import code_digest, machine, provenance, run_id
from benchmarks.accuracy import REUSE
from edge.app.config import TrainConfig

# the quantization comparison: a CIFAR-10 subset at the accuracy section's width
QUANT_CIFAR = dict(data="cifar10", net="vgg6", width=0.0625, subset=10000, epochs=2, batch_size=32)
LOCAL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]
CIFAR = dict(data="cifar10", net="vgg6")
SECTIONS = ("accuracy", "memory", "speed", "export_speed", "quant")
PROFILES = {
    "quick": dict(
        CIFAR,
        rules=["clapp++", "bp-infonce"],
        seeds=[0, 1],
        width=0.0625,
        epochs=2,
        subset=None,
        quant=QUANT_CIFAR,
        alignment_every=20,
    ),
    "rules": dict(
        CIFAR,
        rules=LOCAL + ["bp-infonce", "bp-clapp++"],
        seeds=[0, 1],
        width=0.0625,
        epochs=2,
        subset=None,
        quant=QUANT_CIFAR,
        alignment_every=20,
    ),
    "full": dict(
        CIFAR,
        rules=LOCAL + ["bp-infonce", "bp-clapp++"],
        seeds=[0, 1],
        width=1.0,
        epochs=100,
        subset=None,
        quant=dict(data="cifar10", net="vgg6", width=1.0, subset=None, epochs=5,
                   batch_size=64),
        alignment_every=100,
    ),
    # exercises every section in a few minutes; its numbers mean nothing
    "smoke": dict(
        data="digits",
        net="digits",
        rules=["clapp++", "bp-infonce"],
        seeds=[0],
        width=0.25,
        epochs=1,
        subset=512,
        quant=dict(data="digits", net="digits", width=0.25, subset=512, epochs=1,
                   batch_size=32),
        alignment_every=2,
    ),
}


def quant_section(data_dir: str | None, q: dict, runs: Path) -> dict:
    """fp32 CLAPP++ against int8-w16 integer mode, same images, views and epochs, each at its
    own default rate (benchmarks/quant_accuracy.py; int8 and qat are in its own results)."""
    from benchmarks import quant_accuracy as qa
    from edge.data import load

    args = argparse.Namespace(**q, lr=None, integer_lr=None, rule="clapp++", seed=0,
                              data_dir=data_dir)
    qa.defaults(args)
    ds = load(q["data"], data_dir, q["subset"])
    out = {**q, "lr": args.lr, "integer_lr": args.integer_lr,
           "random_probe": qa.random_probe(args, ds), "runs": {}}
    for config in ("fp32", "int8-w16"):
        out["runs"][config] = qa.run(config, args, ds, runs)
    return out


def simulated_step_bytes(width: float, batch: int, rule_name: str = "clapp++",
                         net: str = "vgg6", data: str = "cifar10") -> dict:
    """The simulator's peak for a local rule's exported fp32 step (as `edge simulate --rule`
    builds it: in-place bindings, the host target)."""
    from edge.app.commands.sim_sources import from_rule
    from edge.app.commands.simulate import run_simulation

    cfg = TrainConfig(rule=rule_name, data=data, net=net, width=width)
    model, manifest = from_rule(cfg, batch)
    report = run_simulation(model, "host", manifest=manifest)
    return {
        "peak_bytes": report.peak_bytes,
        "arena_bytes": report.arena_bytes,
        "lower_bound_bytes": report.lower_bound_bytes,
    }


def headline(sec: dict) -> dict:
    """The figures against the goals from the sections at hand (None: no such section)."""
    acc, mem = sec.get("accuracy"), sec.get("memory")
    spd, ort, quant = sec.get("speed"), sec.get("export_speed"), sec.get("quant")
    h: dict = {"best_local_rule": None, "accuracy_ratio": None,
               "accuracy_ratio_last_layer": None, "accuracy_ratio_adam_probe": None,
               "memory_ratio": None, "memory_floor_ratio": None, "speed_ratio_local_vs_bp": None,
               "speed_ratio_onnxruntime_vs_torch": None, "quant_gap_points": None}
    if acc:
        summary = acc["summary"]
        local = {k: v for k, v in summary.items()
                 if k not in ("bp-infonce", "bp-clapp++", "random")}
        if local and "bp-infonce" in summary:
            best = max(local, key=lambda k: local[k]["all"]["mean"])
            bp = summary["bp-infonce"]
            h["best_local_rule"] = best
            h["accuracy_ratio"] = local[best]["all"]["mean"] / bp["all"]["mean"]
            h["accuracy_ratio_last_layer"] = local[best]["last"]["mean"] / bp["last"]["mean"]
            if "all_adam" in local[best] and "all_adam" in bp:
                h["accuracy_ratio_adam_probe"] = (local[best]["all_adam"]["mean"]
                                                  / bp["all_adam"]["mean"])
    if mem:
        rows = {r["rule"]: r for r in mem["rows"]}
        h["memory_ratio"] = rows["clapp++"]["peak_bytes"] / rows["bp-infonce"]["peak_bytes"]
        h["memory_floor_ratio"] = rows["clapp++"]["peak_bytes"] / rows["clapp++"]["floor_bytes"]
    if spd:
        h["speed_ratio_local_vs_bp"] = spd["ratio_vs_bp"]["clapp++"]["median"]
    if ort:
        h["speed_ratio_onnxruntime_vs_torch"] = ort["ratio_onnxruntime_vs_torch"]["median"]
    if quant:
        r = quant["runs"]  # quant_accuracy reports probe accuracy in percent already
        h["quant_gap_points"] = r["fp32"]["probe"]["all"] - r["int8-w16"]["probe"]["all"]
    return h


# which section each headline figure comes from
FIGURE_SECTION = {"best_local_rule": "accuracy", "accuracy_ratio": "accuracy",
                  "accuracy_ratio_last_layer": "accuracy",
                  "accuracy_ratio_adam_probe": "accuracy", "memory_ratio": "memory",
                  "memory_floor_ratio": "memory", "speed_ratio_local_vs_bp": "speed",
                  "speed_ratio_onnxruntime_vs_torch": "export_speed",
                  "quant_gap_points": "quant"}


def reusable_section(old: dict | None, reuse: str) -> bool:
    if old is None or "error" in old:
        return False
    if reuse == "any":
        return True
    prov = old.get("provenance") or {}
    return reuse == "same-code" and prov.get("code_digest") == code_digest()


def status_of(name: str, data: dict | None, measured_now: bool, skipped: bool,
              file_date: str | None) -> dict:
    if data is None:
        return {"status": "skipped" if skipped else "not measured"}
    prov = data.get("provenance")
    if "error" in data:
        return {"status": "failed", "error": data["error"], "run": prov and prov["run"]}
    if measured_now:
        return {"status": "measured", "run": prov["run"], "measured": prov["measured"]}
    if prov:
        return {"status": "reused", "run": prov["run"], "measured": prov["measured"],
                "commit": prov.get("commit"), "same_code": prov.get("code_digest") ==
                code_digest()}
    return {"status": "reused", "run": None, "measured": None,
            "note": "no provenance recorded (written before sections kept their own); the "
            f"file it came from was dated {file_date or 'unknown'}"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="edge benchmarks",
                                 epilog="Reuse and provenance: see `python -m benchmarks` "
                                 "module docstring (benchmarks/__main__.py).")
    ap.add_argument("profile", choices=sorted(PROFILES))
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="results dir (default benchmarks/results/PROFILE)")
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {SECTIONS}")
    ap.add_argument("--reuse", default="same-code", choices=REUSE,
                    help="which sections (and trained runs) already in the results may stand "
                    "in for new ones (default: only those this very code measured)")
    ap.add_argument("--fresh", action="store_true", help="measure everything (--reuse none)")
    a = ap.parse_args(argv)
    reuse = "none" if a.fresh else a.reuse
    torch.set_num_threads(
        min(2, os.cpu_count() or 1) if a.device == "cpu" else torch.get_num_threads()
    )
    p = PROFILES[a.profile]
    out = Path(a.out or Path(__file__).parent / "results" / a.profile)
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    if bad := skip - set(SECTIONS):
        ap.error(f"unknown section(s) in --skip: {', '.join(sorted(bad))}")
    base = TrainConfig(data=p["data"], net=p["net"], width=p["width"], epochs=p["epochs"],
                       batch_size=64, subset=p["subset"], device=a.device)
    old_sections, file_date = {}, None
    previous = out / "results.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("profile") == a.profile:
            old_sections = old.get("sections", {})
            file_date = (old.get("machine") or {}).get("date")
    res: dict = {"profile": a.profile, "run": run_id(), "reuse": reuse, "machine": machine(),
                 "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None
                                                               else argv),
                 "sections": {}, "status": {}}
    t0 = time.perf_counter()
    measured: set[str] = set()

    def save() -> None:
        res["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))

    def section(name: str, fn):
        old = old_sections.get(name)
        if name in skip:
            res["status"][name] = {"status": "skipped"}
            return None
        if reusable_section(old, reuse):
            res["sections"][name] = old
            print(f"[{time.perf_counter() - t0:7.0f} s] {name}: reused from run "
                  f"{(old.get('provenance') or {}).get('run', '(no provenance)')}",
                  file=sys.stderr, flush=True)
            res["status"][name] = status_of(name, old, False, False, file_date)
            return old
        print(f"[{time.perf_counter() - t0:7.0f} s] {name}: measuring ...", file=sys.stderr,
              flush=True)
        s0 = time.perf_counter()
        try:
            data = fn()
        except Exception as e:  # one broken section must not lose the others' figures
            traceback.print_exc()
            data = {"error": f"{type(e).__name__}: {e}"}
        data["provenance"] = provenance(s0)
        res["sections"][name] = data
        measured.add(name)
        res["status"][name] = status_of(name, data, True, False, file_date)
        save()
        return None if "error" in data else data

    from benchmarks import accuracy, memory

    section("accuracy", lambda: accuracy.run(
        p["rules"], p["seeds"], base, runs, a.data_dir, alignment_every=p["alignment_every"],
        reuse=reuse))
    small = a.profile == "smoke"
    w = 0.03125 if small else 0.125
    # every rule of the profile, plus clapp++ and both backprop baselines (the headline's
    # memory ratios are clapp++ against bp-infonce); the simulator's figure for each local
    # rule's exported step
    mem_rules = list(dict.fromkeys([*p["rules"], "clapp++", "bp-infonce", "bp-clapp++"]))
    section("memory", lambda: {
        **memory.run(mem_rules, batch=32, width=w),
        "simulated": {r: simulated_step_bytes(w, 32, r) for r in mem_rules
                      if not r.startswith("bp-")},
    })

    def speed_section() -> dict:
        from benchmarks import speed

        return speed.run(width=w, batch=32, rules=("clapp++",), repeats=2 if small else 5,
                         steps=3, export_repeats=0)

    def export_speed_section() -> dict:
        from benchmarks import export_speed

        return export_speed.run("vgg6", w, 32, repeats=3, steps=5)

    section("speed", speed_section)
    section("export_speed", export_speed_section)
    section("quant", lambda: quant_section(a.data_dir, p["quant"], runs / "quant"))
    good = {k: v for k, v in res["sections"].items() if "error" not in v}
    res["headline"] = headline(good)
    res["headline_sources"] = {k: res["status"].get(FIGURE_SECTION[k], {}).get("status")
                               for k in res["headline"]}
    res["measured_this_run"] = sorted(measured - {k for k, v in res["sections"].items()
                                                  if "error" in v})
    res["reused"] = sorted(k for k, s in res["status"].items() if s["status"] == "reused")
    save()
    from benchmarks.report import write_report

    write_report(res, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
