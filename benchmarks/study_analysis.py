"""What a tuned ``samkit bench --trials K`` sweep says beyond its report: the stability of
the choice with half the trials, the validation targets a tuned reference sets, and whether
the methods' flatness claims hold at the end of their tuned runs.

    python benchmarks/study_analysis.py DIR --out benchmarks/results/study_analysis.json

``DIR`` is the sweep's ``--out`` (``tuning.json`` and the run directories). Three parts, each
read from the run directories only (nothing is retrained):

1. **K/2 versus K trials.** The trials are the first K points of one scrambled Sobol sequence,
   so the first K/2 trials are exactly what ``--trials K/2`` would have run. For every (task,
   method): the choice among the first K/2 trials and among all K (on validation accuracy,
   as ``samkit bench`` chooses), whether they differ, and the validation accuracy the extra
   trials bought. Only validation figures are read.
2. **Targets from the tuned reference.** Each task's reference optimizer (the base optimizer
   of the sharpness-aware runs: SGD, or AdamW on ``modular-add``) at its chosen setting: the
   validation accuracy at 80 % of its epochs, per final seed and their median (AlgoPerf sets
   its targets from tuned reference runs). The recipes' ``val_target`` is this median
   rounded down to two decimals.
3. **Flatness at the end of training.** For every final run (the chosen setting at every
   seed), the top Hessian eigenvalue λ₁ (Lanczos) and the trace (Hutch++) of the training loss
   at the last checkpoint, on the first ``--batches × --batch-size`` training samples in eval
   mode (`samkit sharpness`'s subset). Per method: the ratio to the reference paired by seed
   (the geometric mean of ``value / reference`` over seeds with its 95 % Student-t interval
   on the logarithm), and whether the method ends flatter, with Holm's correction over the
   methods of a task (fewer than 3 seeds: not judged).

Prints three tables and saves everything to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samkit.bench.stats import ALPHA, MIN_SEEDS, holm, paired_difference
from samkit.bench.tuning import TRIAL_SEED, choose, read_tuning
from samkit.sharpness import hessian_trace, top_eigenvalues
from samkit.train.measure import measure_subset


def _summary(run: Path) -> dict[str, Any] | None:
    try:
        s = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("completed") else None


def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = []
    with (run / "metrics.jsonl").open() as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def final_runs(out: Path, task: str, spec: str, chosen: int) -> dict[int, Path]:
    """The chosen trial's runs at the sweep's seeds (equal-epochs budget: the trial's epochs)."""
    trial0 = None
    record = read_tuning(out)["tasks"][task][spec]
    trial0 = out / record["trials"][chosen]["run"]
    epochs = trial0.name.rsplit("-", 1)[1]
    runs = {}
    for run in sorted((out / task / spec).glob(f"trial{chosen}-seed*-{epochs}")):
        seed = int(run.name.split("-")[1].removeprefix("seed"))
        if seed != TRIAL_SEED and _summary(run) is not None:
            runs[seed] = run
    return runs


def stability(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, specs in record["tasks"].items():
        for spec, entry in specs.items():
            accs = [t["val_acc"] for t in entry["trials"]]
            k = len(accs)
            half = choose(accs[: k // 2])
            full = choose(accs)
            gain = None
            if half is not None and full is not None:
                gain = accs[full] - accs[half]
            rows.append({
                "task": task, "method": spec, "k": k,
                "chosen_half": half, "chosen_full": full, "same": half == full,
                "val_half": None if half is None else accs[half],
                "val_full": None if full is None else accs[full],
                "val_gain": gain,
            })  # fmt: skip
    return rows


def reference_of(out: Path, task: str, record: dict[str, Any]) -> str:
    """The task's reference: the base optimizer its sharpness-aware runs wrap."""
    for spec, entry in record["tasks"][task].items():
        if spec in ("sgd", "adamw") or entry["chosen"] is None:
            continue
        s = _summary(out / entry["trials"][entry["chosen"]]["run"])
        if s is not None and s.get("base"):
            return str(s["base"])
    return "sgd"


def targets(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    result = {}
    for task in record["tasks"]:
        ref = reference_of(out, task, record)
        entry = record["tasks"][task].get(ref)
        if entry is None or entry["chosen"] is None:
            continue
        per_seed = {}
        epoch = None
        for seed, run in final_runs(out, task, ref, entry["chosen"]).items():
            rows = [r for r in _metrics(run) if r.get("val_acc") is not None]
            epochs = max(int(r["epoch"]) for r in rows)
            epoch = math.ceil(0.8 * epochs)
            at = [r["val_acc"] for r in rows if int(r["epoch"]) == epoch]
            if at:
                per_seed[seed] = float(at[0])
        if per_seed:
            median = statistics.median(per_seed.values())
            result[task] = {
                "reference": ref, "chosen_trial": entry["chosen"],
                "params": entry["trials"][entry["chosen"]]["params"], "epoch": epoch,
                "val_acc_at_80pct": per_seed, "median": median,
                "target": math.floor(median * 100) / 100,
            }  # fmt: skip
    return result


def recipe_tables(record: dict[str, Any]) -> dict[str, str]:
    """Each task's ``[methods.NAME]`` tables: the chosen trial's values (validation only)."""
    tables = {}
    for task, specs in record["tasks"].items():
        lines = []
        for spec, entry in specs.items():
            if entry["chosen"] is None or ":" in spec:
                continue
            params = entry["trials"][entry["chosen"]]["params"]
            lines.append(f"[methods.{spec}]")
            for key, value in params.items():
                if isinstance(value, float):
                    value = float(f"{value:.3g}")
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        tables[task] = "\n".join(lines)
    return tables


def measure(run: Path, batches: int, batch_size: int, iters: int, probes: int) -> dict:
    model, subset, _, _ = measure_subset(run / "checkpoint.pt", batches, batch_size)
    loss_fn = nn.CrossEntropyLoss()
    eig = top_eigenvalues(model, loss_fn, subset, k=1, max_iter=iters, seed=0)
    trace = hessian_trace(model, loss_fn, subset, num_samples=probes, seed=0)
    return {"lambda_max": float(eig.eigenvalues[0]), "trace": float(trace.trace)}


def flatness(out: Path, record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for task, specs in record["tasks"].items():
        ref = reference_of(out, task, record)
        values: dict[str, dict[str, dict[int, float]]] = {}
        excluded: dict[str, list[int]] = {}
        known = args.known.get(task, {})
        for spec, entry in specs.items():
            if entry["chosen"] is None:
                continue
            for seed, run in final_runs(out, task, spec, entry["chosen"]).items():
                summary = _summary(run)
                trained = summary.get("final_train_acc")  # None where not counted (AUSAM)
                if (trained if trained is not None else summary["val_acc"]) < MIN_TRAIN_ACC:
                    excluded.setdefault(spec, []).append(seed)
                    continue
                m = {key: known[spec][key][str(seed)] for key in ("lambda_max", "trace")
                     if str(seed) in known.get(spec, {}).get(key, {})}  # fmt: skip
                if len(m) < 2:
                    m = measure(run, args.batches, args.batch_size, args.iters, args.probes)
                for key, v in m.items():
                    values.setdefault(spec, {}).setdefault(key, {})[seed] = v
                print(f"  {task} {spec} seed {seed}: λ1 {m['lambda_max']:.4g}, "
                      f"trace {m['trace']:.4g}", file=sys.stderr, flush=True)  # fmt: skip
        rows: dict[str, Any] = {}
        for key in ("lambda_max", "trace"):
            pvals = {}
            for spec in values:
                if spec == ref or ref not in values:
                    continue
                d = _log_ratio(values[spec][key], values[ref][key])
                if d is None:
                    continue  # a non-positive estimate, or no common seed: no ratio
                rows.setdefault(spec, {})[key] = d
                if d["judged"]:
                    pvals[spec] = d["p"]
            for spec, rejected in holm(pvals, ALPHA).items():
                ratio = rows[spec][key]["ratio"]
                rows[spec][key]["verdict"] = (
                    ("flatter" if ratio < 1 else "sharper") if rejected else "no difference"
                )
        claims: dict[str, Any] = {}
        for key in ("lambda_max", "trace"):
            pvals = {}
            for method, against, says in CLAIMS:
                against = ref if against == "base" else against
                if method not in values or against not in values:
                    continue
                d = _log_ratio(values[method][key], values[against][key])
                if d is None:
                    continue
                name = f"{method} vs {against}"
                claims.setdefault(name, {"claim": says})[key] = d
                if d["judged"]:
                    pvals[name] = d["p"]
            for name, rejected in holm(pvals, ALPHA).items():
                d = claims[name][key]
                d["verdict"] = (("flatter" if d["ratio"] < 1 else "sharper") if rejected
                                else "no difference shown")  # fmt: skip
        result[task] = {"reference": ref, "values": values, "vs_reference": rows,
                        "claims": claims, "excluded": excluded}  # fmt: skip
    return result


#: A run whose final training accuracy (validation accuracy where a method does not count
#: training accuracy: AUSAM) is below this did not train (it diverged): its curvature is that
#: of a point it was thrown to, not of a minimum, and it is left out.
MIN_TRAIN_ACC = 0.5

#: The seed papers' flatness claims: (method, against, what the paper says). "base": the
#: task's base optimizer (SGD, or AdamW on modular-add).
CLAIMS = (
    ("sam", "base", "SAM (Foret et al. 2021) finds flatter minima than its base optimizer"),
    ("bsam", "sam", "Bilateral SAM (Deng et al.) finds flatter minima than SAM"),
    ("fsam", "sam", "F-SAM (Li et al. 2024) finds flatter minima than SAM"),
    ("esam", "sam", "ESAM (Du et al. 2022) reaches minima as flat as SAM's"),
)


def _log_ratio(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """The geometric mean of ``a/b`` paired by seed with its 95 % interval (t on the logs)."""
    if not all(v > 0 for v in [*a.values(), *b.values()]):
        return None
    d = paired_difference({s: math.log(v) for s, v in a.items()},
                          {s: math.log(v) for s, v in b.items()})  # fmt: skip
    if d is None:
        return None
    return {"ratio": math.exp(d.mean), "ci": [math.exp(d.mean - d.ci), math.exp(d.mean + d.ci)],
            "p": d.p, "n": d.n, "judged": d.n >= MIN_SEEDS}  # fmt: skip


def _ratio_cells(row: dict[str, Any]) -> list[str]:
    """A table row's λ1 and trace cells: ratio [95 % CI] and verdict."""
    cells = []
    for key in ("lambda_max", "trace"):
        c = row.get(key)
        if c is None:
            cells += ["n/a", ""]
        else:
            cells += [f"{c['ratio']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]",
                      c.get("verdict", "not judged")]  # fmt: skip
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=30, help="Lanczos iterations at most")
    p.add_argument("--probes", type=int, default=30, help="Hutch++ HVPs")
    p.add_argument("--skip-flatness", action="store_true")
    p.add_argument("--tasks", nargs="+", help="only these tasks (default: all the sweep's)")
    p.add_argument("--reuse", nargs="+", type=Path, default=[],
                   help="earlier outputs of this script: their measurements (same settings) "
                        "are reused instead of measured again")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.known = {}
    for path in args.reuse:
        for task, f in json.loads(path.read_text()).get("flatness", {}).items():
            args.known.setdefault(task, {}).update(f["values"])
    record = read_tuning(args.dir)
    if args.tasks:
        record["tasks"] = {t: v for t, v in record["tasks"].items() if t in args.tasks}
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/study_analysis.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.machine(), "torch": torch.__version__},
        "stability": stability(record),
        "targets": targets(args.dir, record),
        "recipe_tables": recipe_tables(record),
    }
    if not args.skip_flatness:
        result["flatness"] = flatness(args.dir, record, args)
    result["seconds"] = time.perf_counter() - started

    print("\nK/2 versus K trials (choice on validation accuracy)")
    print("| task | method | chosen of K/2 | chosen of K | same | val. acc. gained |")
    print("|---|---|---|---|---|---|")
    for r in result["stability"]:
        gain = "" if r["val_gain"] is None else f"{r['val_gain']:+.4f}"
        print(f"| {r['task']} | {r['method']} | {r['chosen_half']} | {r['chosen_full']} | "
              f"{'yes' if r['same'] else 'no'} | {gain} |")  # fmt: skip
    same = sum(r["same"] for r in result["stability"])
    print(f"\nsame choice in {same} of {len(result['stability'])} (task, method) pairs")
    print("\nValidation targets from the tuned reference (80 % of its epochs)")
    for task, t in result["targets"].items():
        accs = ", ".join(f"{v:.4f}" for v in t["val_acc_at_80pct"].values())
        print(
            f"  {task}: {t['reference']} trial {t['chosen_trial']} {t['params']}: epoch "
            f"{t['epoch']}, {accs} -> median {t['median']:.4f}, target {t['target']:.2f}"
        )
    for task, f in result.get("flatness", {}).items():
        print(f"\nFlatness at the end, {task}: ratio to {f['reference']} (95 % CI), Holm")
        print("| method | λ1 ratio | verdict | trace ratio | verdict |")
        print("|---|---|---|---|---|")
        for spec, row in f["vs_reference"].items():
            print(f"| {spec} | " + " | ".join(_ratio_cells(row)) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for task, f in result.get("flatness", {}).items():
        if f["excluded"]:
            print(f"\n{task}: left out (final training accuracy < {MIN_TRAIN_ACC}): "
                  + "; ".join(f"{m} seeds {v}" for m, v in f["excluded"].items()))  # fmt: skip
        print(f"\nThe papers' claims, {task}: ratio (95 % CI), Holm over the claims")
        print("| claim | λ1 ratio | verdict | trace ratio | verdict |")
        print("|---|---|---|---|---|")
        for name, row in f["claims"].items():
            print(f"| {name} | " + " | ".join(_ratio_cells(row)) + " |")
    print(f"\nsaved {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
