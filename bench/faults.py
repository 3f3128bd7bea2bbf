"""The fault benchmark: how often the guard and `kiln doctor` are right.

Trains many short tiny runs, clean and with one injected fault each (the `[faults]` section),
each as a real `kiln train` process (a hang ends its process; a slow rank needs two), then reads
what the guard did (events.jsonl) and what the doctor says (kiln.runs.doctor.diagnose), and
prints:

    guard    interventions on clean runs (false alarms; target 0), recall on injected loss
             spikes and non-finite steps (target >= 95%)
    doctor   per fault class: right class as the top finding, and a correct remedy (target
             >= 90%); critical findings on clean runs (target 0)

    python bench/faults.py [--quick] [--jobs 1] [--out bench/results/faults.json]

`--quick` runs one variant per class and 4 clean runs (the test suite's subset is smaller still).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASE = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.seq_len=64",
    "data.vocab_size=2048",
    "train.steps=160",
    "train.time_budget_s=0",
    "train.batch_size=8",
    "schedule.warmup_steps=10",
    "eval.every=40",
    "eval.batches=2",
    "eval.sample_tokens=4",
    "checkpoint.every=20",
    "checkpoint.keep=0",
    "log.every=1",
    "log.plot=false",
    "train.device=cpu",
    "guard.hang_min_s=0",
    'callbacks.enabled=["layer_stats", "step_time"]',
    "callbacks.layer_stats.every=5",
    "callbacks.layer_stats.heatmap=false",
]
ENCODER = ["preset=bert-tiny"]  # the masked objective on a BERT-style encoder

# fault class -> (config overrides, the doctor kinds accepted as the right class)
FAULTS: dict[str, tuple[list[str], set[str]]] = {
    "nonfinite_loss": (["faults.nonfinite_loss=[90]"], {"nonfinite"}),
    "nonfinite_grad": (["faults.nonfinite_grad=[90]"], {"nonfinite"}),
    "corrupt_batch": (["faults.corrupt_batch=[100]"], {"loss_spike"}),
    "lr_high": (
        ["faults.lr_high=60", "faults.lr_high_factor=100", "guard.on_persistent=skip", "guard.max_interventions=1000"],
        {"divergence"},
    ),
    "lr_low": (["faults.lr_low=12", "faults.lr_low_factor=0.0001"], {"plateau"}),
    # no injected fault: a configured LR 100x too high from the first step (the loss rises during
    # warm-up, then the model learns token frequencies only); the others start healthy
    "lr_wrecked": (["optim.lr=0.3"], {"no_learning"}),
    "repeat_batch": (["faults.repeat_batch=40"], {"overfitting"}),
    "entropy_collapse": (
        ["faults.entropy_collapse=60", "faults.layer=1"],
        {"entropy_collapse", "attention_logit_blowup"},
    ),
    "dead_units": (["faults.dead_units=60", "faults.layer=0", "faults.dead_fraction=0.6"], {"dead_units"}),
    "slow_steps": (["faults.slow_steps=[80, 81, 120]", "faults.slow_s=1.5"], {"slow_steps"}),
    "loader_stall": (["faults.loader_stall=[90, 130]", "faults.stall_s=1.5"], {"loader_stall"}),
    "hang": (["faults.hang=100", "faults.hang_s=120", "guard.hang_min_s=3", "guard.hang_factor=5"], {"hang"}),
    "corrupt_checkpoint": (["faults.corrupt_checkpoint=140"], {"corrupt_checkpoint"}),
    "tokenizer_mismatch": (["faults.tokenizer_mismatch=true"], {"tokenizer_mismatch"}),
    "slow_rank": (["faults.slow_rank=1", "faults.slow_rank_s=0.15", "train.steps=80"], {"slow_rank"}),
}
GUARD_FAULTS = {"nonfinite_loss": (90,), "nonfinite_grad": (90,), "corrupt_batch": (100,)}
DISTRIBUTED = {"slow_rank"}


@dataclass
class Result:
    name: str
    fault: str | None  # None: a clean run
    variant: list[str]
    seconds: float = 0.0
    exit_code: int = 0
    interventions: list[dict] = field(default_factory=list)
    caught: bool | None = None  # guard faults: an intervention at the injected step(s)
    findings: list[dict] = field(default_factory=list)
    right_class: bool | None = None
    right_remedy: bool | None = None


def _lr(run: Path) -> float:
    from kiln.runs.rundir import RunDir

    return RunDir(run).config().optim.lr


def remedy_ok(fault: str, finding: dict, run: Path) -> bool:
    """Whether the top finding's remedy is one that addresses the fault."""
    remedy = finding.get("remedy") or {}
    argv = remedy.get("argv") or []
    sets: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--set" and "=" in value:
            k, v = value.split("=", 1)
            sets[k] = v
    skips = [v for flag, v in zip(argv, argv[1:]) if flag == "--skip-batches"]
    step = int(argv[argv.index("--step") + 1]) if "--step" in argv else None
    fork = bool(argv) and argv[0] == "fork"
    if fault in ("nonfinite_loss", "nonfinite_grad", "corrupt_batch"):
        at = GUARD_FAULTS[fault][0]
        covered = any(int(s.split(":")[0]) <= at - 1 <= int(s.split(":")[1]) for s in skips)
        return fork and step is not None and step < at and covered
    if fault == "lr_high":
        return fork and step is not None and step < 60 + 20 and float(sets.get("optim.lr", "inf")) < _lr(run)
    if fault == "lr_wrecked":  # a fresh attempt: the wrecked weights are not worth forking
        return fork and "--from-scratch" in argv and float(sets.get("optim.lr", "inf")) <= _lr(run) / 10
    if fault == "lr_low":
        return fork and float(sets.get("optim.lr", "0")) > _lr(run) * 0.0001 * 10
    if fault == "repeat_batch":
        return fork and step is not None  # go back to the best checkpoint (and fix the data)
    if fault in ("entropy_collapse",):
        return fork and (sets.get("model.qk_norm") == "true" or float(sets.get("optim.lr", "inf")) < _lr(run))
    if fault == "dead_units":
        return fork and float(sets.get("optim.lr", "inf")) < _lr(run)
    if fault in ("slow_steps", "loader_stall", "slow_rank"):
        return True  # infrastructure: there is nothing to fork; the finding is the answer
    if fault == "hang":
        return bool(argv) and argv[0] in ("train", "fork")
    if fault == "corrupt_checkpoint":
        return bool(argv) and argv[0] in ("fork", "train") and (step is None or step < 140)
    if fault == "tokenizer_mismatch":
        return True  # the remedy is to restore the tokenizer; the finding names it
    return False


def run_one(name: str, overrides: list[str], runs: Path, cache: Path, nproc: int = 1) -> tuple[int, float]:
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("preset=")), "tiny")
    sets = [a for o in [f"data.cache_dir={cache}", *overrides] if not o.startswith("preset=") for a in ("--set", o)]
    args = ["train", "--preset", preset, "--runs-dir", str(runs), "--name", name, *sets]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "kiln",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "kiln", *args]
    env = dict(os.environ, KILN_QUIET="1", OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, time.perf_counter() - t0


def judge(result: Result, run: Path) -> None:
    from kiln.runs.doctor import diagnose
    from kiln.runs.rundir import RunDir

    events = RunDir(run).events()
    result.interventions = [e for e in events if e.get("action") in ("skip", "rollback", "stop")]
    if result.fault in GUARD_FAULTS:
        steps = set(GUARD_FAULTS[result.fault])
        result.caught = any(e["step"] in steps for e in result.interventions)
    result.findings = diagnose(run)
    if result.fault is not None:
        accepted = FAULTS[result.fault][1]
        top = next((f for f in result.findings if f["kind"] in accepted), None)
        first = result.findings[0] if result.findings else None
        result.right_class = first is not None and first["kind"] in accepted
        result.right_remedy = bool(result.right_class and top is not None and remedy_ok(result.fault, top, run))


def plan(quick: bool) -> list[tuple[str, str | None, list[str]]]:
    """(name, fault, overrides) for every run of the benchmark."""
    seeds = [0, 1] if quick else [0, 1, 2]
    lrs = ["optim.lr=3e-3"] if quick else ["optim.lr=1e-3", "optim.lr=3e-3", "optim.lr=6e-3"]
    precisions = ["train.precision=fp32"] if quick else ["train.precision=fp32", "train.precision=bf16"]
    jobs: list[tuple[str, str | None, list[str]]] = []
    clean = list(itertools.product(seeds, lrs, precisions))
    for seed, lr, prec in clean:
        jobs.append((f"clean-s{seed}-{lr[9:]}-{prec[16:]}", None, [f"train.seed={seed}", lr, prec]))
    encoder_clean = seeds if not quick else seeds[:1]
    for seed in encoder_clean:
        jobs.append((f"clean-mlm-s{seed}", None, [f"train.seed={seed}", "optim.lr=3e-3", *ENCODER]))
    variants = (
        [["train.seed=0", "optim.lr=3e-3"]]
        if quick
        else [
            ["train.seed=0", "optim.lr=3e-3"],
            ["train.seed=1", "optim.lr=1e-3", "train.precision=bf16"],
            ["train.seed=2", "optim.lr=6e-3"],
        ]
    )
    for fault, (overrides, _) in FAULTS.items():
        for i, variant in enumerate(variants[:1] if fault in DISTRIBUTED else variants):
            jobs.append((f"{fault}-{i}", fault, [*variant, *overrides]))
    if not quick:  # both objectives: the masked objective meets the guard's faults too (its loss is noisier)
        for fault in ("nonfinite_loss", "corrupt_batch", "lr_high"):
            for i, variant in enumerate(variants if fault == "corrupt_batch" else variants[:1]):
                jobs.append((f"{fault}-mlm" + (f"-{i}" if i else ""), fault, [*variant, *ENCODER, *FAULTS[fault][0]]))
    return jobs


def table(results: list[Result]) -> str:
    clean = [r for r in results if r.fault is None]
    injected = [r for r in results if r.fault is not None]
    lines = ["| class | runs | doctor right class | right remedy | guard caught |", "|---|---|---|---|---|"]
    for fault in FAULTS:
        rs = [r for r in injected if r.fault == fault]
        if not rs:
            continue
        caught = [r.caught for r in rs if r.caught is not None]
        lines.append(
            f"| {fault} | {len(rs)} | {sum(r.right_class for r in rs)}/{len(rs)} | "
            f"{sum(r.right_remedy for r in rs)}/{len(rs)} | "
            + (f"{sum(caught)}/{len(caught)}" if caught else "—")
            + " |"
        )
    guard_rs = [r for r in injected if r.caught is not None]
    critical = sum(any(f["severity"] == "critical" for f in r.findings) for r in clean)
    warnings = sum(any(f["severity"] == "warning" for f in r.findings) for r in clean)
    false_alarms = sum(len(r.interventions) for r in clean)
    lines += [
        "",
        f"clean runs: {len(clean)}; guard interventions on them: {false_alarms}; runs with critical "
        f"findings: {critical}; with warnings: {warnings}",
        f"guard recall on injected spikes and non-finite steps: {sum(r.caught for r in guard_rs)}/{len(guard_rs)}",
        f"doctor: right class {sum(r.right_class for r in injected)}/{len(injected)}, right class with a "
        f"correct remedy {sum(r.right_remedy for r in injected)}/{len(injected)}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", default=[], help="run only jobs whose name starts with this")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    ap.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    args = ap.parse_args()
    jobs = [j for j in plan(args.quick) if not args.only or any(j[0].startswith(o) for o in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        runs, cache = root / "runs", root / "cache"
        results = []
        t_all = time.perf_counter()
        for i, (name, fault, overrides) in enumerate(jobs, 1):
            result = Result(name, fault, overrides)
            code, seconds = run_one(name, [*BASE, *overrides], runs, cache, 2 if fault in DISTRIBUTED else 1)
            result.exit_code, result.seconds = code, seconds
            judge(result, runs / name)
            results.append(result)
            top = result.findings[0]["kind"] if result.findings else "-"
            print(
                f"[{i}/{len(jobs)}] {name:<28} exit {code:<3} {seconds:5.1f}s  interventions "
                f"{len(result.interventions)}  top finding {top:<22} class {result.right_class}  remedy "
                f"{result.right_remedy}  guard {result.caught}",
                flush=True,
            )
        print(f"\n{len(jobs)} runs in {time.perf_counter() - t_all:.0f}s\n")
        print(table(results))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
        print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
