"""`kiln doctor RUN [--json] [--explain] [--apply K]`: what went wrong in a run, and the command
that would fix it.

`diagnose(run)` reads the run folder only (through RunDir: metrics, events, layer statistics,
evaluations, status, the watchdog's hang dumps, the checkpoints — verified — the config and the
prepared dataset's manifest) and returns findings ranked by severity (critical, warning, info),
then by step:

    {"kind": "divergence", "severity": "critical", "steps": [first, last],
     "evidence": {...numbers, layer names, ranks...}, "summary": "one line a person reads",
     "remedy": {"command": "kiln fork RUN --step N --name RUN-divergence --set optim.lr=...",
                "argv": ["fork", RUN, ...], "why": "..."} or None}

Remedies are `kiln fork` commands from the newest checkpoint that verifies at or before the
trouble (a fresh attempt, `--from-scratch`, when there is none), `kiln train --resume RUN` for
infrastructure faults, and for a swapped tokenizer a shell `cp` (marked "kiln": False).
kiln.runs.doctor_rules holds the run's context and the rules that read the loss curve,
kiln.runs.doctor_layers those of layer statistics; the rules below read evaluations, step times
and the run's files. Nothing here
imports the trainer.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runs import doctor_layers, doctor_moe, doctor_progress  # noqa: F401  (register their rules)
from kiln.runs import doctor_series as series
from kiln.runs.columns import MISSING
from kiln.runs.doctor_rules import RULES, Context, divergence_analysis, finding, finite, rule
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt

# thresholds of the rules below (those of the loss curve are in kiln.runs.doctor_rules)
VAL_MARGIN_ABS, VAL_MARGIN_REL = 0.05, 0.03  # eval_regression: val loss up by > 0.05 nats and > 3%
OVERFIT_GAP_RATIO, OVERFIT_GAP_ABS = 0.6, 0.5  # train loss < 0.6 x val loss and > 0.5 nats below it
OVERFIT_HEALTHY = 0.95  # ... where train >= 0.95 x val, the gap had not opened yet
SLOW_FACTOR = 3.0  # a slow interval costs >= 3 typical steps' time ...
SLOW_MIN_S = 0.3  # ... and >= 0.3 s ...
SLOW_Z = 10.0  # ... and > 10 robust deviations above the median of comparable steps
SLOW_SHARE = 0.5  # information, unless > 3 of them cost half of the run's step time
WARMUP_INTERVALS = 3  # the first logged intervals carry start-up work
SLOW_RANK_RATIO = 1.3  # a rank busy >= 1.3 x the others' median ...
SLOW_RANK_SHARE = 0.75  # ... in >= 75% of the records
SUITE_DROP_ABS, SUITE_DROP_REL = 0.02, 0.10  # a suite metric worse by > 0.02 and > 10%
HIGHER_IS_BETTER = ("acc", "acc_norm", "top5_acc", "masked_acc", "bleu", "chrf", "next_line_exact")
LOWER_IS_BETTER = ("loss", "ppl", "bits_per_byte", "masked_loss")
SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}


def diagnose(run_path: Path) -> list[dict[str, Any]]:
    """Every finding of every rule for the run at `run_path`, most severe first, then by step."""
    ctx = Context(RunDir.open(Path(run_path)))
    findings: list[dict[str, Any]] = []
    for check in RULES:
        findings += check(ctx)
    return rank(findings)


def rank(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(findings, key=lambda f: (SEVERITY_RANK.get(f["severity"], 3), f["steps"][0], f["kind"]))


def findings_json(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `kiln doctor --json` prints: kind, severity, steps, evidence and the remedy's command
    (or null), in the printed order."""
    return [
        {
            "kind": f["kind"],
            "severity": f["severity"],
            "steps": f["steps"],
            "evidence": f["evidence"],
            "remedy": f["remedy"]["command"] if f.get("remedy") else None,
        }
        for f in findings
    ]


def _steps(f: dict[str, Any]) -> str:
    a, b = f["steps"]
    return f"step {a}" if a == b else f"steps {a}-{b}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return str(v)


def format_findings(findings: list[dict[str, Any]], explain: bool = False, run: Path | str | None = None) -> str:
    """The findings as numbered text (the numbers `--apply K` takes); `explain` adds the evidence
    and why each remedy helps."""
    head = f"kiln doctor: {run}: " if run is not None else ""
    if not findings:
        return head + "no problems found"
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in SEVERITY_RANK}
    lines = [head + f"{len(findings)} finding(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    width = len(str(len(findings)))
    for i, f in enumerate(findings, 1):
        pad = " " * (width + 2)
        lines.append(f"{i:>{width}}. {f['severity'].upper():8} {f['kind']} ({_steps(f)}): {f['summary']}")
        if explain and f["evidence"]:
            lines.append(pad + "evidence: " + ", ".join(f"{k}={_value(v)}" for k, v in f["evidence"].items()))
        remedy = f.get("remedy")
        if remedy:
            lines.append(pad + "fix: " + remedy["command"])
            if explain and remedy.get("why"):
                lines.append(pad + "     " + remedy["why"])
    if any(f.get("remedy") and f["remedy"].get("kiln", True) for f in findings):
        lines.append("apply a fix with: kiln doctor RUN --apply K (K = the finding's number)")
    return "\n".join(lines)


def remedy_argv(findings: list[dict[str, Any]], k: int) -> list[str]:
    """The kiln argv of finding `k` (1-based, as printed) for `--apply K`."""
    if not findings:
        raise KilnError("--apply: kiln doctor found nothing to fix")
    if not 1 <= k <= len(findings):
        raise KilnError(f"--apply {k}: choose a finding between 1 and {len(findings)} (the numbers kiln doctor prints)")
    f = findings[k - 1]
    remedy = f.get("remedy")
    if not remedy:
        raise KilnError(f"--apply {k}: finding {k} ({f['kind']}) has no remedy to apply")
    if remedy.get("kiln") is False:
        raise KilnError(
            f"--apply {k}: the remedy of finding {k} ({f['kind']}) is not a kiln command; run it "
            f"yourself: {remedy['command']}"
        )
    return list(remedy["argv"])


# ----------------------------------------------------------------------------- evaluations
def overfit_analysis(ctx: Context) -> dict[str, Any] | None:
    if "overfit" not in ctx.cache:
        ctx.cache["overfit"] = _overfit(ctx)
    return ctx.cache["overfit"]


def _overfit(ctx: Context) -> dict[str, Any] | None:
    evals = [(e["step"], e["val_loss"]) for e in ctx.evals if finite(e.get("val_loss"))]
    if not evals:
        return None
    b = min(range(len(evals)), key=lambda i: evals[i][1])
    (best_step, best), (last_step, last) = evals[b], evals[-1]
    train_best, train_last = ctx.train_loss_near(best_step), ctx.train_loss_near(last_step)
    if train_best is None or train_last is None:
        return None
    rising = (
        len(evals) >= 3
        and len(evals) - 1 - b >= 2
        and train_last < train_best - 0.02
        and last - best > max(VAL_MARGIN_ABS / 2, VAL_MARGIN_REL / 2 * best)
    )
    gap = train_last < OVERFIT_GAP_RATIO * last and last - train_last > OVERFIT_GAP_ABS
    if not (rising or gap):
        return None
    fork_step = best_step
    if not rising:  # memorising: go back to the last evaluation before the gap opened
        fork_step = evals[0][0]
        for step, val in evals:
            train = ctx.train_loss_near(step)
            if train is None or train < OVERFIT_HEALTHY * val:
                break
            fork_step = step
    return {
        "best_step": best_step,
        "best_val_loss": best,
        "last_step": last_step,
        "last_val_loss": last,
        "train_loss_at_best": train_best,
        "train_loss_at_last": train_last,
        "val_rising": rising,
        "train_far_below_val": gap,
        "fork_step": fork_step,
    }


@rule
def overfitting(ctx: Context) -> list[dict[str, Any]]:
    d = overfit_analysis(ctx)
    if d is None or divergence_analysis(ctx):
        return []
    sets = [f"model.dropout={round(min((ctx.cfg.model.dropout if ctx.cfg else 0.0) + 0.1, 0.5), 2)}"]
    if d["val_rising"]:
        summary = (
            f"validation loss rose from {d['best_val_loss']:.3f} (step {d['best_step']}) to "
            f"{d['last_val_loss']:.3f} while the training loss fell to {d['train_loss_at_last']:.3f}"
        )
        why = (
            f"the best model is step {d['best_step']}'s (kiln export {shlex.quote(str(ctx.run.path))} --step "
            f"{d['best_step']} --out model.safetensors); to train on from there, more dropout regularises it"
        )
    else:
        summary = (
            f"training loss {d['train_loss_at_last']:.3f} is far below the validation loss "
            f"{d['last_val_loss']:.3f}: the model memorises repeated data"
        )
        why = f"goes back to step {d['fork_step']}, before the training loss parted from the validation loss"
    first = d["best_step"] if d["val_rising"] else d["fork_step"]
    return [
        finding(
            "overfitting",
            "warning",
            (first, d["last_step"]),
            d,
            summary,
            ctx.fork_remedy(
                "overfitting", d["fork_step"], sets, why + "; more (or less repeated) data is the real cure"
            ),
        )
    ]


def _direction(metric: str) -> int:
    name = metric.rsplit("/", 1)[-1]
    return 1 if name in HIGHER_IS_BETTER else -1 if name in LOWER_IS_BETTER else 0


@rule
def eval_regression(ctx: Context) -> list[dict[str, Any]]:
    """The largest rise of the validation loss between two evaluations (a warning), or drop of a
    suite metric whose direction is known (information); not what a divergence or overfitting explains."""
    d, overfit = divergence_analysis(ctx), overfit_analysis(ctx)
    end = d["rise"] if d else math.inf
    out = []
    for metric in ["val_loss"] + sorted({k for e in ctx.evals for k in e if "/" in k and _direction(k)}):
        if metric == "val_loss" and overfit and overfit["val_rising"]:
            continue
        sign = 1 if metric == "val_loss" else -_direction(metric)  # + : a rise is bad
        rel = VAL_MARGIN_REL if sign > 0 else SUITE_DROP_REL
        floor = VAL_MARGIN_ABS if metric == "val_loss" else SUITE_DROP_ABS
        series = [(e["step"], e[metric]) for e in ctx.evals if finite(e.get(metric)) and e["step"] <= end]
        bad = [
            (sign * (v1 - v0), s0, v0, s1, v1)
            for (s0, v0), (s1, v1) in zip(series, series[1:])
            if sign * (v1 - v0) > max(floor, rel * abs(v0))
        ]
        if not bad:
            continue
        _, s0, v0, s1, v1 = max(bad)
        evidence = {"metric": metric, "before": v0, "after": v1, "before_step": s0, "after_step": s1}
        if metric != "val_loss":
            out.append(
                finding(
                    "eval_regression",
                    "info",
                    (s0, s1),
                    evidence,
                    f"{metric} {'rose' if sign > 0 else 'fell'} from {v0:.4g} (step {s0}) to {v1:.4g} (step {s1})",
                )
            )
            continue
        lr, how = ctx.lower_lr(s1)
        out.append(
            finding(
                "eval_regression",
                "warning",
                (s0, s1),
                evidence,
                f"validation loss rose from {v0:.3f} (step {s0}) to {v1:.3f} (step {s1})",
                ctx.fork_remedy(
                    "eval_regression",
                    s0,
                    [f"optim.lr={lr}"],
                    f"retrains from the better evaluation's checkpoint with peak optim.lr = {lr} ({how})",
                ),
            )
        )
    return out


# ----------------------------------------------------------------------------- time
def _interval_times(ctx: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, step, steps in the logged interval, mean seconds per step) of each logged interval,
    from tokens_per_s: arrays, one entry an interval."""
    t, steps = ctx.table, ctx.steps
    if len(steps) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    tokens, rate, counted = t.numbers("tokens"), t.numbers("tokens_per_s"), t.is_number("tokens")
    k = np.diff(steps)
    with np.errstate(invalid="ignore"):
        keep = t.finite("tokens_per_s")[1:] & (rate[1:] > 0) & counted[1:] & counted[:-1] & (k > 0)
        keep &= tokens[1:] > tokens[:-1]
    rows = np.flatnonzero(keep) + 1
    ks = k[keep]
    del k, keep
    seconds = tokens[rows]  # (tokens - previous tokens) / k / tokens_per_s, in place
    seconds -= tokens[rows - 1]
    seconds /= ks
    seconds /= rate[rows]
    return rows, steps[rows], ks, seconds


def _groups(steps: np.ndarray, ks: np.ndarray, every: Any) -> np.ndarray:
    """How many of the steps of each interval (step - k, step] layer_stats sampled (every `every`)."""
    if not every:
        return np.zeros(len(steps), np.int8)
    if isinstance(every, int) and not isinstance(every, bool):
        e = abs(every)
        return steps // e - (steps - ks) // e
    pairs = zip(steps.tolist(), ks.tolist())
    return np.array([sum(1 for s in range(step - k + 1, step + 1) if s % every == 0) for step, k in pairs], np.int64)


@rule
def slow_steps(ctx: Context) -> list[dict[str, Any]]:
    """Steps far slower than comparable ones: per phase when the step_time callback was on (a
    stall in the data phase is a loader stall), else from tokens_per_s. Warm-up intervals are
    left out, and the steps layer_stats samples (slower by design) are judged among themselves.
    Every interval is judged at once on arrays; the few slow ones are described one by one."""
    rows, steps, ks, secs = (a[WARMUP_INTERVALS:] for a in _interval_times(ctx))
    if len(secs) < 5:
        return []
    every = 0
    if ctx.cfg is not None and "layer_stats" in ctx.cfg.callbacks.enabled:
        every = (ctx.cfg.callbacks.options.get("layer_stats") or {}).get("every", 10)
    groups = _groups(steps, ks, every)
    typical = series.median(secs)
    floor = max(SLOW_MIN_S, SLOW_FACTOR * typical)
    phase_keys = [f"step_time/{p}_s" for p in ("data", "forward_backward", "grad_norm", "optimizer")]
    logged = [p for p in phase_keys if p in ctx.table.keys]  # the others have no samples, and no hits
    values = {p: ctx.table.numbers(p)[rows] for p in logged}
    known = {p: ctx.table.finite(p)[rows] for p in logged}
    level: dict[tuple[int, str], tuple[float, float]] = {}  # (median, robust deviation) by (group, phase)
    for g in np.unique(groups).tolist():
        mine = groups == g
        for p in ["total", *logged]:
            v = secs[mine] if p == "total" else values[p][mine & known[p]]  # a copy: worked on in place
            if len(v) >= 3:
                level[(g, p)] = series.median_and_deviation(v)

    def slow(v: np.ndarray, med: float, sigma: float) -> np.ndarray:
        """(v - med) * k >= floor and v - med >= SLOW_Z * sigma, with one temporary array."""
        excess = v - med
        out = excess >= SLOW_Z * sigma
        excess *= ks
        out &= excess >= floor
        return out

    hit = np.zeros(len(secs), bool)
    with np.errstate(invalid="ignore"):
        for g in np.unique(groups).tolist():  # a phase is judged where it was logged and has a level
            mine = groups == g
            judged = np.zeros(len(secs), bool)
            for p in logged:
                if (g, p) in level:
                    rows_p = mine & known[p]
                    judged |= rows_p
                    hit |= rows_p & slow(values[p], *level[(g, p)])
            hit |= mine & ~judged & slow(secs, *level.get((g, "total"), (typical, 0.0)))
    found: dict[str, list[dict[str, Any]]] = {"slow_steps": [], "loader_stall": []}
    for i in np.flatnonzero(hit).tolist():
        step, k, t, row, g = int(steps[i]), int(ks[i]), float(secs[i]), int(rows[i]), int(groups[i])
        rec = {p: v for p in phase_keys if (v := ctx.table.value(p, row)) is not MISSING}
        hits = []
        for p in [p for p in phase_keys if finite(rec.get(p)) and (g, p) in level] or ["total"]:
            value = t if p == "total" else rec[p]
            med, sigma = level.get((g, p), (typical, 0.0))
            if (value - med) * k >= floor and value - med >= SLOW_Z * sigma:
                hits.append(((value - med) * k, p))
        if hits:
            excess, p = max(hits)
            item = {
                "step": step,
                "seconds": t * k,
                "excess_s": excess,
                "data_s": (rec.get(p) or 0.0) * k,
                "phase": p.removeprefix("step_time/").removesuffix("_s"),
            }
            found["loader_stall" if p == "step_time/data_s" else "slow_steps"].append(item)
    out = []
    total = sum(series.blockwise(secs * ks))  # summed in order by Python, as a list of records was
    for kind, items in found.items():
        if not items:
            continue
        hit_steps, lost = [i["step"] for i in items], sum(i["excess_s"] for i in items)
        evidence = {
            "count": len(items),
            "at_steps": hit_steps[:20],
            "seconds": [i["seconds"] for i in items][:20],
            "median_step_s": typical,
            "lost_s": lost,
            "share_of_time": lost / total if total else 0.0,
        }
        phases = sorted({i["phase"] for i in items} - {"total"})
        if kind == "loader_stall":
            evidence["data_s"] = [i["data_s"] for i in items][:20]
            text = "step(s) that spent their extra time reading data"
            hint = "; check the file system the data shards are read from"
        else:
            text, hint = "step(s) far slower than the median", f" (time spent in {', '.join(phases)})" if phases else ""
            if phases:
                evidence["phases"] = phases
        severity = "warning" if len(items) > 3 and evidence["share_of_time"] >= SLOW_SHARE else "info"
        out.append(
            finding(
                kind,
                severity,
                (hit_steps[0], hit_steps[-1]),
                evidence,
                f"{len(items)} {text} ({typical * 1000:.3g} ms a step): {lost:.1f}s lost{hint}",
            )
        )
    return out


RANK_KEY = re.compile(r"^step_time/rank(\d+)_busy_s$")


@rule
def slow_rank(ctx: Context) -> list[dict[str, Any]]:
    """step_time's per-rank busy time: one rank consistently far above the others."""
    t = ctx.table
    rank_keys = [(int(m.group(1)), k) for k in t.keys if (m := RANK_KEY.match(k))]
    if not rank_keys:
        return []
    ranks = sorted({r for r, _ in rank_keys})
    busy = np.full((t.rows, len(ranks)), np.nan)  # a record's finite busy times by rank
    logged = np.zeros(t.rows, bool)
    for rank, key in rank_keys:
        ok = t.finite(key)
        busy[ok, ranks.index(rank)] = t.numbers(key)[ok]
        logged |= t.present(key)
    steps = ctx.steps[logged].tolist()
    busy = busy[(~np.isnan(busy)).sum(axis=1) >= 2]
    out = []
    for c, rank in enumerate(ranks):
        mine = ~np.isnan(busy[:, c])
        if not mine.any():
            continue
        others = busy[mine].copy()
        others[:, c] = np.nan
        level = series.row_medians(others)
        ok = level > 0
        ratios = busy[mine, c][ok] / level[ok]
        share = float((ratios >= SLOW_RANK_RATIO).sum()) / len(ratios) if len(ratios) else 0.0
        if len(ratios) < 5 or share < SLOW_RANK_SHARE or series.median(ratios) < SLOW_RANK_RATIO:
            continue
        per_rank = {
            f"rank{k}_busy_s": series.median(busy[~np.isnan(busy[:, j]), j])
            for j, k in enumerate(ranks)
            if not np.isnan(busy[0, j])
        }
        ratio = series.median(ratios)
        out.append(
            finding(
                "slow_rank",
                "warning",
                (steps[0], steps[-1]),
                {"rank": rank, "ratio_to_others": ratio, "share_of_records": share, **per_rank},
                f"rank {rank} is busy {ratio:.2f}x as long as the other ranks in "
                f"{100 * share:.0f}% of the steps: every rank waits for it (check its GPU, node and "
                "data path)",
            )
        )
    return out


# ----------------------------------------------------------------------------- infrastructure
def _stuck_frame(text: str) -> list[str]:
    """The innermost frame of the deepest thread that is not the watchdog's."""
    best: list[str] = []
    for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("File ")]
        if lines and "watchdog" not in lines[0] and len(lines) > len(best):
            best = lines
    m = re.match(r'File "([^"]+)", line (\d+) in (\S+)', best[0]) if best else None
    return [f"{m.group(3)} ({Path(m.group(1)).name}:{m.group(2)})"] if m else best[:1]


@rule
def hang(ctx: Context) -> list[dict[str, Any]]:
    """The watchdog's hang-rank<r>.txt dumps: which ranks, where they were stuck, for how long."""
    ranks, waited, frames = [], [], []
    for path in sorted(ctx.run.path.glob("hang-rank*.txt")):
        if m := re.fullmatch(r"hang-rank(\d+)\.txt", path.name):
            ranks.append(int(m.group(1)))
            text = path.read_text(errors="replace")
            if head := re.search(r"running for (\d+)s", text.split("\n", 1)[0]):
                waited.append(int(head.group(1)))
            frames += _stuck_frame(text)
    if not ranks:
        return []
    step = max([ctx.status.get("step") or 0] + ([ctx.last_step] if ctx.last_step is not None else []))
    evidence: dict[str, Any] = {
        "ranks": ranks,
        "last_step": step,
        "state": ctx.status.get("state"),
        **({"waited_s": max(waited)} if waited else {}),
        **({"stuck_in": sorted(set(frames))[:4]} if frames else {}),
    }
    who = f"rank(s) {', '.join(map(str, ranks))}" + (f" hung in {evidence['stuck_in'][0]}" if frames else " hung")
    if ctx.status.get("state") == "finished":
        return [
            finding(
                "hang",
                "info",
                (step, step),
                evidence,
                f"{who} once (stacks in hang-rank*.txt); the run was resumed and finished",
            )
        ]
    return [
        finding(
            "hang",
            "critical",
            (step, step + 1),
            evidence,
            f"{who} after step {step}; the watchdog dumped their stacks (hang-rank*.txt) and ended the run",
            ctx.resume_remedy(
                "an infrastructure fault, not the model: resume from the last valid checkpoint "
                "(exactly as if it had not stopped)"
            ),
        )
    ]


@rule
def corrupt_checkpoint(ctx: Context) -> list[dict[str, Any]]:
    paths, out = ctx.checkpoints(), []
    for i, path in enumerate(paths):
        if (problem := ctx.problem(path)) is None:
            continue
        step, previous = ckpt.checkpoint_step(path), ctx.fork_point(ckpt.checkpoint_step(path) - 1)
        before = previous.name if previous is not None else None
        if all(ctx.problem(p) is not None for p in paths[i:]) and ctx.status.get("state") != "finished":
            remedy = ctx.resume_remedy(f"resuming skips the damaged checkpoint and continues from {before or 'step 0'}")
        else:
            remedy = ctx.fork_remedy(
                "corrupt_checkpoint",
                step - 1,
                [],
                f"a fork with no change repeats its parent's steps bit for bit, recreating step {step}'s checkpoint",
            )
        out.append(
            finding(
                "corrupt_checkpoint",
                "critical",
                (step, step),
                {"checkpoint": path.name, "problem": problem, "previous_valid": before},
                f"checkpoint {path.name} does not verify ({problem}); "
                + (f"{before} is the newest valid one before it" if before else "no valid checkpoint precedes it"),
                remedy,
            )
        )
    return out


def dataset_folder(ctx: Context) -> Path | None:
    """The prepared dataset the run trained on: the one whose content key its checkpoints name,
    else the one its data config maps to; None when it is not in the cache."""
    if ctx.cfg is None:
        return None
    raw = Path(ctx.cfg.data.cache_dir).expanduser()
    caches = [
        c
        for c in ([raw] if raw.is_absolute() else [raw, ctx.run.path.parent / raw, ctx.run.path.parent.parent / raw])
        if c.is_dir()
    ]
    keys: set[str] = set()
    for path in ctx.checkpoints():
        try:
            keys.add(ckpt.read_state(path)["trainer"]["data_key"])
        except (OSError, ValueError, KeyError):
            pass
    for folder in (f for cache in caches for f in sorted(cache.iterdir())):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if keys & {manifest.get("content_key"), manifest.get("key")}:
            return folder
    try:
        from kiln.data.corpora import resolve_corpus
        from kiln.data.shards import dataset_key

        key = dataset_key(ctx.cfg.data, resolve_corpus(ctx.cfg.data))
    except Exception:  # the corpus or the tokenizer file is not here: nothing to compare with
        return None
    return next((c / key for c in caches if (c / key / "manifest.json").is_file()), None)


@rule
def tokenizer_mismatch(ctx: Context) -> list[dict[str, Any]]:
    """RUN/tokenizer.json against the tokenizer_sha256 of the dataset's manifest (skipped when the
    dataset is not in the cache)."""
    folder = dataset_folder(ctx) if ctx.run.tokenizer_path.is_file() else None
    if folder is None:
        return []
    from kiln.data.tokenizer import load_tokenizer

    expected = json.loads((folder / "manifest.json").read_text()).get("tokenizer_sha256") or ""
    try:
        actual = load_tokenizer(ctx.run.tokenizer_path).sha256
    except Exception as e:  # an unreadable tokenizer.json is a mismatch too
        actual = f"unreadable ({type(e).__name__})"
    if actual == expected:
        return []
    remedy = None
    try:
        if load_tokenizer(folder / "tokenizer.json").sha256 == expected:
            argv = ["cp", str(folder / "tokenizer.json"), str(ctx.run.tokenizer_path)]
            remedy = {
                "command": shlex.join(argv),
                "argv": argv,
                "kiln": False,
                "why": "puts back the tokenizer the shards (and so the model) were made with",
            }
    except Exception:  # the dataset's own tokenizer is unreadable too: report without a remedy
        remedy = None
    return [
        finding(
            "tokenizer_mismatch",
            "critical",
            (0, ctx.last_step or 0),
            {"run_tokenizer_sha256": actual[:16], "dataset_tokenizer_sha256": expected[:16], "dataset": str(folder)},
            f"{ctx.run.tokenizer_path.name} is not the tokenizer of the run's prepared data ({folder.name}): "
            "token ids mean other tokens, so sampling, evaluation and resuming read the model wrongly",
            remedy,
        )
    ]


@rule
def run_state(ctx: Context) -> list[dict[str, Any]]:
    """A failed or interrupted run (a hang says more), failed checkpoint writes, broken invariants."""
    out, status = [], ctx.status
    step = status.get("step") or (ctx.last_step or 0)
    reason = f" ({status['reason']})" if status.get("reason") else ""
    if not any(ctx.run.path.glob("hang-rank*.txt")):
        if status.get("state") == "failed":
            out.append(
                finding(
                    "run_failed",
                    "critical",
                    (step, step),
                    {"reason": status.get("reason")},
                    f"the run failed at step {step}{reason}",
                    ctx.resume_remedy("once the cause is fixed, resume from the last valid checkpoint"),
                )
            )
        elif status.get("state") == "interrupted":
            out.append(
                finding(
                    "interrupted",
                    "info",
                    (step, step),
                    {"reason": status.get("reason")},
                    f"the run stopped at step {step} without finishing{reason}",
                    ctx.resume_remedy("continues from the last valid checkpoint"),
                )
            )
    for kind, severity, what in (
        ("checkpoint_failed", "warning", "failed checkpoint write"),
        ("invariant", "critical", "broken runtime invariant"),
    ):
        events = [e for e in ctx.events if e.get("kind") == kind]
        if events:
            e = events[-1]
            detail = e.get("error") or e.get("message") or e.get("reason") or e.get("check") or ""
            out.append(
                finding(
                    kind,
                    severity,
                    (events[0].get("step", 0), e.get("step", 0)),
                    {
                        "count": len(events),
                        **{k: v for k, v in e.items() if k != "kind" and isinstance(v, (int, float, str))},
                    },
                    f"{len(events)} {what}(s), the last at step {e.get('step')}: {detail}",
                )
            )
    return out
