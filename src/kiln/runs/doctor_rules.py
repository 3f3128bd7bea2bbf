"""What `kiln doctor` (kiln.runs.doctor) reads a run with: the `Context` (the run folder's files,
read once through RunDir; checkpoints verified once), the remedies it builds, the rule registry,
and the rules that read the loss curve (divergence, non-finite values, spikes, plateau, gradient
growth); the others are in kiln.runs.doctor.

Detection uses robust statistics (medians, MADs, Theil-Sen slopes) plus minimum relative
effects, because healthy tiny runs are noisy: the thresholds are the smallest effects worth a
person's attention, chosen so that clean runs (the test suite's, bench/faults.py's) report
nothing. Remedies are `kiln fork` commands from the run's own verified checkpoints: the newest
valid one at or before the trouble, with the change the finding calls for (and the injected
`[faults]` switched off, so the fork tests the fix and not the fault again), checked as
`kiln fork` checks them before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shlex
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.config import FAULT_TRIGGERS
from kiln.data.skips import add_range, data_index, skipped_ranges
from kiln.errors import KilnError
from kiln.runs import doctor_series as series
from kiln.runs.columns import INT, Table
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt

if TYPE_CHECKING:
    from kiln.config import Config

# ----------------------------------------------------------------------------- thresholds
SPIKE_WINDOW = 20  # trailing logged points that define the loss's recent level
SPIKE_MIN_HISTORY = 8  # ... and how many are needed before judging (the first steps are never spikes)
SPIKE_Z = 6.0  # a spike is > 6 robust standard deviations (1.4826 MAD) of log loss above the median
SPIKE_MIN_JUMP = math.log(1.3)  # ... and at least 30% above it
SPIKE_RECOVERY = 5  # it must come back (halfway) within this many logged points
SPIKE_MARGIN = 2  # batches skipped on each side of a spike's batches (PaLM skipped a few hundred)
SPIKE_CLUSTER = 5  # spikes this few steps apart are one incident
REPEATED_INTERVENTIONS = 3  # this many guard interventions mean instability, not bad luck
DIVERGE_RATIO = 1.25  # divergence: the smoothed loss >= 1.25 x its best so far ...
DIVERGE_MIN_GAP = 0.3  # ... and at least 0.3 nats above it, to the end (>= 3 logged points) ...
EXCURSION_MIN = 8  # ... or for >= 8 logged points in a row (a spike lasts 1-3)
GIVE_BACK = 0.25  # ... or it gave back this share of its progress from the first loss, plus
GIVE_BACK_NOISE = 3.0  # this many deviations of the smoothed loss (a noisy loss has a low best),
GIVE_BACK_MIN_PROGRESS = 1.0  # once that progress is this many nats (near the unigram entropy a wrecked
# model stays < 1.25x its best: bench/faults.py, lr_high at LR 6e-3)
SANE_LR = 1e-2  # AdamW peak LRs above this are far outside what transformers train with
TINY_LR = 1e-5  # a configured peak LR at or below this is too low for pretraining
LR_CUT = 0.05  # logged LR below 5% of the schedule's: the LR was cut while running
PLATEAU_DROP = 0.03  # plateau: the loss fell by less than 3% over the segment
GRAD_GROWTH = 4.0  # grad_growth: the Theil-Sen trend multiplies the norm by >= 4 ...
GRAD_GROWTH_QUARTERS = 3.0  # ... and the last quarter's median is >= 3 x the first quarter's

INTERVENTION_KINDS = ("nonfinite", "loss_spike", "persistent_spike", "grad_spike")


# ----------------------------------------------------------------------------- small helpers
def num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def finite(x: Any) -> bool:
    v = num(x)
    return v is not None and math.isfinite(v)


def sig(x: Any, digits: int = 4) -> Any:
    """A number rounded for people (and JSON): 4 significant digits; non-finite ones as text."""
    v = num(x)
    if v is None:
        return x
    if not math.isfinite(v):
        return str(v)
    return float(f"{v:.{digits}g}") if isinstance(x, float) else x


median = statistics.median


def mad(xs: list[float], center: float) -> float:
    return statistics.median([abs(x - center) for x in xs])


THEIL_SEN_POINTS = 150


def theil_sen(xs: list[float], ys: list[float], max_points: int = THEIL_SEN_POINTS) -> float:
    """The median of pairwise slopes (robust to outliers); subsampled to keep it O(max_points^2)."""
    if len(xs) > max_points:
        idx = [round(i * (len(xs) - 1) / (max_points - 1)) for i in range(max_points)]
        xs, ys = [xs[i] for i in idx], [ys[i] for i in idx]
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]
    ]
    return median(slopes) if slopes else 0.0


def fmt_lr(x: float) -> str:
    return f"{x:.2g}"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def ranges_of(indices: list[int], margin: int = 0) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        out = add_range(out, max(0, i - margin), i + margin)
    return out


def finding(
    kind: str,
    severity: str,
    steps: tuple[int, int] | list[int],
    evidence: dict[str, Any],
    summary: str,
    remedy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    evidence = dict(evidence)
    if remedy is not None and "error" in remedy:
        evidence["remedy_refused"] = remedy["error"]
        remedy = None
    return {
        "kind": kind,
        "severity": severity,
        "steps": [int(steps[0]), int(steps[1])],
        "evidence": {k: ([sig(x) for x in v] if isinstance(v, list) else sig(v)) for k, v in evidence.items()},
        "summary": summary,
        "remedy": remedy,
    }


# ----------------------------------------------------------------------------- what the run wrote
def one_row_per_step(table: Table) -> Table:
    """The rows with an int step, the last of each step, in step order."""
    steps, kinds = table.column("step")
    rows = np.flatnonzero(kinds == INT)
    s = steps[rows]
    if len(rows) == table.rows and bool(np.all(s[1:] > s[:-1])):
        return table  # the usual log: nothing to drop or reorder
    _, first_from_end = np.unique(s[::-1], return_index=True)
    return table.take(rows[len(rows) - 1 - first_from_end])


class Context:
    """A run folder's files, read once; checkpoints verified on demand (each at most once).

    The metrics are a Table (kiln.runs.columns) with one row per step, the last one logged
    (after a rollback the file holds a step twice), in step order: rules read its columns as
    arrays. `metrics`, the same rows as dicts, is built only for a rule that asks for it (a
    plugin's, say): a long run's million dicts cost seconds and gigabytes."""

    def __init__(self, run: RunDir):
        self.run = run
        self.cfg: Config | None
        try:
            self.cfg = run.config()
        except KilnError:
            self.cfg = None
        self.table = one_row_per_step(run.metrics_table())
        self.steps = self.table.column("step")[0].astype(np.int64)
        self.events = run.events()
        self.evals = sorted((e for e in run.evals() if isinstance(e.get("step"), int)), key=lambda e: e["step"])
        self.layer_stats = run.read_jsonl(run.path / "layer_stats.jsonl")
        self.status = run.status()
        self.lineage = run.lineage() or {}
        self._verified: dict[Path, str | None] = {}
        self.cache: dict[str, Any] = {}  # rules share analyses through this (e.g. the divergence)

    @functools.cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return self.table.records()

    @property
    def last_step(self) -> int | None:
        return int(self.steps[-1]) if len(self.steps) else None

    # ---------------------------------------------------------------- series
    def loss_points(self, finite_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(steps, losses) of the records whose loss is a number (a finite one)."""
        if not finite_only:  # the divergence's, read once (it is cached)
            keep = self.table.is_number("loss")
            return self.steps[keep], self.table.numbers("loss")[keep]
        if "loss_points" not in self.cache:
            keep = self.table.finite("loss")
            self.cache["loss_points"] = (self.steps[keep], self.table.numbers("loss")[keep])
        return self.cache["loss_points"]

    def losses(self, finite_only: bool = True) -> list[tuple[int, float]]:
        steps, values = self.loss_points(finite_only)
        return list(zip(steps.tolist(), values.tolist()))

    def train_loss_near(self, step: int, points: int = 5) -> float | None:
        steps, values = self.loss_points()
        end = int(np.searchsorted(steps, step, side="right"))
        near = values[max(0, end - points) : end].tolist()
        return median(near) if near else None

    warmup = property(lambda self: self.cfg.schedule.warmup_steps if self.cfg else 0)

    # ---------------------------------------------------------------- checkpoints and data batches
    def checkpoints(self) -> list[Path]:
        return self.run.checkpoint_paths()

    def problem(self, path: Path) -> str | None:
        if path not in self._verified:
            self._verified[path] = ckpt.verify_checkpoint(path)
        return self._verified[path]

    def fork_point(self, max_step: int) -> Path | None:
        """The newest checkpoint at or before `max_step` that verifies."""
        for path in reversed(self.checkpoints()):
            if ckpt.checkpoint_step(path) <= max_step and self.problem(path) is None:
                return path
        return None

    def skipped(self) -> list[list[int]]:
        """Every data batch range the run skips: the newest readable checkpoint's, the fork's,
        and the guard's rollbacks since."""
        if "skipped" in self.cache:
            return self.cache["skipped"]
        ranges: list[list[int]] = []
        for path in reversed(self.checkpoints()):
            try:
                state = ckpt.read_state(path)["trainer"]
            except (OSError, ValueError, KeyError):
                continue
            ranges = skipped_ranges(state)
            break
        extra = list(self.lineage.get("skip_batches", []))
        extra += [e["batches_skipped"] for e in self.events if e.get("kind") == "rollback" and e.get("batches_skipped")]
        for lo, hi in extra:
            ranges = add_range(ranges, int(lo), int(hi))
        self.cache["skipped"] = ranges
        return ranges

    def batch_of(self, step: int) -> int:
        """The data batch completed step `step` trained on (events.jsonl's data_index)."""
        return data_index(max(step - 1, 0), self.skipped())

    def next_batch(self, path: Path) -> int:
        state = ckpt.read_state(path)["trainer"]
        skipped = skipped_ranges(state)
        return data_index(ckpt.checkpoint_step(path), skipped)

    # ---------------------------------------------------------------- learning rate
    def schedule_factor(self, step: int) -> float | None:
        if self.cfg is None:
            return None
        from kiln.train.optim import lr_at

        f = lr_at(max(step - 1, 0), self.cfg.total_steps, 1.0, self.cfg.schedule)
        return f if f > 0 else None

    def effective_peak(self, step: int) -> float | None:
        """The peak LR the run was effectively using at `step` (the logged LR over the schedule's
        shape there): differs from optim.lr when something changed the LR while running."""
        rows = np.flatnonzero(self.table.finite("lr") & (self.steps <= step))
        if not len(rows):
            return None
        row = int(rows[-1])
        f = self.schedule_factor(int(self.steps[row]))
        return self.table.value("lr", row) / f if f else None

    def lower_lr(self, step: int) -> tuple[float, str]:
        """A lower peak LR for a fork before `step`: a third of what it ran with, or (far above a
        sane LR) a tenth, at most 3e-3."""
        cfg_lr = self.cfg.optim.lr if self.cfg else 1e-3
        eff = self.effective_peak(step)
        base = min(cfg_lr, eff) if eff else cfg_lr
        if base > SANE_LR:
            new = min(base / 10, SANE_LR / 3)
            how = f"a tenth of {fmt_lr(base)} (far above the usual <= {SANE_LR:g}), at most {fmt_lr(SANE_LR / 3)}"
        else:
            new = base / 3
            how = f"a third of {fmt_lr(base)}"
        return float(fmt_lr(new)), how

    # ---------------------------------------------------------------- remedies
    def faults_off(self) -> list[str]:
        """`--set` items that switch off faults the run injected on purpose ([faults])."""
        faults = getattr(self.cfg, "faults", None)
        if faults is None or not dataclasses.is_dataclass(faults):
            return []
        defaults = {
            f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(faults)
        }
        return [
            f"faults.{k}={toml_value(defaults[k])}"
            for k in FAULT_TRIGGERS
            if k in defaults and getattr(faults, k) != defaults[k]
        ]

    def fork_name(self, kind: str) -> str:
        base = f"{self.run.name}-{kind}"
        name, n = base, 2
        while (self.run.path.parent / name).exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def fork_remedy(
        self, kind: str, max_step: int, sets: list[str], why: str, skip: Sequence[Sequence[int]] = ()
    ) -> dict[str, Any]:
        """`kiln fork RUN --step C --name RUN-kind --set ... --skip-batches A:B` from the newest
        valid checkpoint C <= max_step (from scratch when there is none), checked as `kiln fork`
        would check it before anything is written."""
        from kiln.config import load_config
        from kiln.runs import fork as forking  # the fork's own rules (wherever they live)

        point = self.fork_point(max_step)
        name = self.fork_name(kind)
        sets = list(sets) + self.faults_off()
        ranges: list[list[int]] = []
        lowest = self.next_batch(point) if point is not None else 0
        for lo, hi in skip:
            if hi >= lowest:
                ranges = add_range(ranges, max(lo, lowest), hi)
        argv = ["fork", str(self.run.path)]
        argv += ["--step", str(ckpt.checkpoint_step(point))] if point is not None else ["--from-scratch"]
        argv += ["--name", name]
        for item in sets:
            argv += ["--set", item]
        for lo, hi in ranges:
            argv += ["--skip-batches", f"{lo}:{hi}"]
        try:
            forking.parse_skip_ranges([f"{lo}:{hi}" for lo, hi in ranges])
            cfg = load_config(overrides=sets, base=self.run.config_dict())
            if point is not None:
                forking._refuse_changes(forking.changed_keys(self.run.config(), cfg))
        except KilnError as e:
            return {"error": str(e)}
        where = (
            f"from checkpoint step {ckpt.checkpoint_step(point)}"
            if point is not None
            else "from scratch (no valid checkpoint before the trouble)"
        )
        if self.faults_off():
            why += "; the injected [faults] are switched off in the fork"
        return {"command": "kiln " + shlex.join(argv), "argv": argv, "why": f"{where}: {why}"}

    def resume_remedy(self, why: str) -> dict[str, Any]:
        argv = ["train", "--resume", str(self.run.path)]
        for item in self.faults_off():
            argv += ["--set", item]
        return {"command": "kiln " + shlex.join(argv), "argv": argv, "why": why}


Rule = Callable[[Context], list[dict[str, Any]]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


# ----------------------------------------------------------------------------- divergence
def divergence_analysis(ctx: Context) -> dict[str, Any] | None:
    """Where the loss rose for good: {"rise": last healthy step, "onset": first bad step, ...}."""
    if "divergence" not in ctx.cache:
        ctx.cache["divergence"] = _divergence(ctx)
    return ctx.cache["divergence"]


def _divergence(ctx: Context) -> dict[str, Any] | None:
    guard_events = [e for e in ctx.events if e.get("kind") in INTERVENTION_KINDS and e.get("action") != "record"]
    stopped = ctx.status.get("state") == "stopped" or any(e.get("action") == "stop" for e in guard_events)
    if stopped and len(guard_events) >= REPEATED_INTERVENTIONS:
        first = min(e["step"] for e in guard_events)
        return {
            "rise": first - 1,
            "onset": first,
            "last": max(e["step"] for e in guard_events),
            "via": "guard",
            "interventions": len(guard_events),
            "reason": ctx.status.get("reason"),
        }
    steps, raw = ctx.loss_points(finite_only=False)
    n = len(raw)
    if n < 8:
        return None
    finite_at = np.isfinite(raw)
    vals = np.where(finite_at, raw, np.inf)
    smooth = series.running_median(vals, 2)  # a centred running median of 5
    nan_tail = int(np.argmax(finite_at[::-1])) if finite_at.any() else n
    smooth_known = np.isfinite(smooth)
    first_loss = float(smooth[np.argmax(smooth_known)]) if smooth_known.any() else math.inf
    diffs = np.diff(vals[finite_at])
    del finite_at, smooth_known
    # the deviation of one loss (MAD of step changes / sqrt 2), and of a median of 5 (x 1.25 / sqrt 5)
    noise = 0.0
    if len(diffs) >= 2:
        centre = series.median(diffs)
        diffs -= centre
        noise = series.median(np.abs(diffs, out=diffs)) * 1.4826 / math.sqrt(2) * 1.25 / math.sqrt(5)
    del diffs
    best = np.minimum.accumulate(smooth)  # high: far above the best smoothed loss so far
    with np.errstate(invalid="ignore"):  # in place where it can be: a long run's arrays are large
        known = np.isfinite(best)
        gap = smooth - best
        high = known & (gap >= DIVERGE_MIN_GAP)
        gave_back = np.zeros(n, bool)
        if math.isfinite(first_loss):
            progress = np.where(known, first_loss - best, 0.0)
            limit = GIVE_BACK * progress
            limit += GIVE_BACK_NOISE * noise
            gave_back = (progress >= GIVE_BACK_MIN_PROGRESS) & (gap >= limit)
            del progress, limit
        del gap
        high &= (smooth > best * DIVERGE_RATIO) | gave_back
    edges = np.diff(np.concatenate([[0], high.astype(np.int8), [0]]))
    # (first, end) of each stretch of high points
    runs = zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist())
    found = [(i, j) for i, j in runs if (j == n and j - i >= 3) or j - i >= EXCURSION_MIN]
    if not found and 2 <= nan_tail < n:
        found = [(n - nan_tail, n)]
    if not found:
        return None
    i, j = found[0]
    start = max(i, 1)
    before = np.where(np.isfinite(smooth[:start]), smooth[:start], np.inf)
    b = int(np.argmin(before)) if np.isfinite(before).any() else 0
    tail = series.median(vals[-max(3, math.ceil(0.1 * n)) :])
    excursion = vals[i:j][np.isfinite(vals[i:j])]
    peak = float(excursion.max()) if len(excursion) else math.inf
    return {
        "rise": int(steps[start - 1]),
        "onset": int(steps[start]),
        "last": int(steps[j - 1]),
        "via": "loss",
        "best_loss": float(smooth[b]),
        "best_step": int(steps[b]),
        "peak_loss": peak,
        "final_loss": tail,
        "recovered": j < n,
        "excursion_points": j - i,
        "nonfinite": nan_tail >= 2,
        "nonfinite_from": int(steps[n - nan_tail]) if nan_tail >= 2 else None,
    }


@rule
def divergence(ctx: Context) -> list[dict[str, Any]]:
    d = divergence_analysis(ctx)
    if d is None:
        return []
    lr, how = ctx.lower_lr(d["rise"])
    sets = [f"optim.lr={lr}"] + (["train.z_loss=0.0001"] if ctx.cfg is not None and not ctx.cfg.train.z_loss else [])
    more = {"effective_peak_lr": ctx.effective_peak(d["onset"]), "optim_lr": ctx.cfg.optim.lr if ctx.cfg else None}
    evidence = {k: v for k, v in {**d, **more}.items() if k != "via" and v is not None}
    if d["via"] == "guard":
        summary = (
            f"the guard intervened {d['interventions']} times from step {d['onset']} and stopped the run: "
            "the loss would not stay down"
        )
    elif d["nonfinite"] and not d["recovered"]:
        summary = (
            f"the loss became non-finite at step {d['nonfinite_from']} and stayed so "
            f"(best {d['best_loss']:.3f} at step {d['best_step']})"
        )
    elif d["recovered"]:
        summary = (
            f"the loss rose from its best {d['best_loss']:.3f} (step {d['best_step']}) after step {d['rise']} "
            f"to {d['peak_loss']:.3g} and stayed far above it until step {d['last']} (ends at "
            f"~{d['final_loss']:.3f})"
        )
    else:
        summary = (
            f"the loss rose from its best {d['best_loss']:.3f} (step {d['best_step']}) after step {d['rise']} "
            f"and stayed at ~{d['final_loss']:.3f}"
        )
    why = f"retrains from before the rise with peak optim.lr = {lr} ({how})" + (
        " and PaLM's z-loss against output-logit drift" if len(sets) > 1 else ""
    )
    return [
        finding(
            "divergence",
            "critical",
            (d["onset"], d["last"]),
            evidence,
            summary,
            ctx.fork_remedy("divergence", d["rise"] - 1, sets, why),
        )
    ]


# ----------------------------------------------------------------------------- non-finite values
@rule
def nonfinite(ctx: Context) -> list[dict[str, Any]]:
    d = divergence_analysis(ctx)
    cutoff = d["nonfinite_from"] if d and d.get("nonfinite_from") else math.inf
    if d and d["via"] == "guard":
        cutoff = d["onset"]
    bad: dict[int, dict[str, Any]] = {}
    for e in ctx.events:
        if e.get("kind") == "nonfinite" and isinstance(e.get("step"), int) and e["step"] < cutoff:
            bad[e["step"]] = {"data_index": e.get("data_index", ctx.batch_of(e["step"])), "action": e.get("action")}
    t = ctx.table
    bad_value = (t.is_number("loss") & ~t.finite("loss")) | (t.is_number("grad_norm") & ~t.finite("grad_norm"))
    for step in ctx.steps[bad_value & (ctx.steps < cutoff)].tolist():
        bad.setdefault(step, {"data_index": ctx.batch_of(step), "action": None})
    if not bad:
        return []
    steps = sorted(bad)
    actions = [bad[s]["action"] for s in steps]
    handled = all(a in ("skip", "rollback") for a in actions)
    severity = "warning" if handled else "critical"
    indices = [int(bad[s]["data_index"]) for s in steps]
    lr, how = ctx.lower_lr(steps[0])
    evidence = {
        "count": len(steps),
        "at_steps": steps[:20],
        "data_indices": indices[:20],
        "guard_actions": sorted({a or "none" for a in actions}),
    }
    what = "the guard discarded the update" if handled else "the update was not discarded"
    summary = (
        f"non-finite loss or gradient at {len(steps)} step(s) ({', '.join(map(str, steps[:5]))}"
        f"{', ...' if len(steps) > 5 else ''}); {what}"
    )
    why = f"retrains from before step {steps[0]} with peak optim.lr = {lr} ({how}), never training on the batches"
    return [
        finding(
            "nonfinite",
            severity,
            (steps[0], steps[-1]),
            evidence,
            summary,
            ctx.fork_remedy("nonfinite", steps[0] - 1, [f"optim.lr={lr}"], why, ranges_of(indices)),
        )
    ]


# ----------------------------------------------------------------------------- spikes
def metric_spikes(points: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """(step, loss, recent level) of every logged loss far above its recent robust level that
    comes back down; spikes never enter the baseline, a level that does not come back does."""
    return series.spikes_of(
        np.array([p[0] for p in points], np.int64),
        np.array([p[1] for p in points], np.float64),
        SPIKE_WINDOW,
        SPIKE_MIN_HISTORY,
        SPIKE_Z,
        SPIKE_MIN_JUMP,
        SPIKE_RECOVERY,
    )


@rule
def spikes(ctx: Context) -> list[dict[str, Any]]:
    """Loss spikes (guard events, or logged losses far above their recent level that come back)
    and gradient-norm spikes (guard records: clipped and applied, so information only)."""
    d = divergence_analysis(ctx)
    if d and d["via"] == "guard":
        return []
    end = d["onset"] if d else math.inf  # what comes after the divergence's onset belongs to it
    incidents: list[dict[str, Any]] = []
    for e in ctx.events:
        kind = {"loss_spike": "loss_spike", "persistent_spike": "loss_spike", "grad_spike": "grad_spike"}.get(
            e.get("kind", "")
        )
        if kind and isinstance(e.get("step"), int) and e["step"] < end:
            incidents.append(
                {
                    "step": e["step"],
                    "kind": kind,
                    "data_index": e.get("data_index"),
                    "action": e.get("action"),
                    "loss": e.get("loss"),
                    "grad_norm": e.get("grad_norm"),
                }
            )
    seen = {i["step"] for i in incidents if i["kind"] == "loss_spike"}
    loss_steps, loss_values = ctx.loss_points()
    found = series.spikes_of(
        loss_steps,
        loss_values,
        SPIKE_WINDOW,
        SPIKE_MIN_HISTORY,
        SPIKE_Z,
        SPIKE_MIN_JUMP,
        SPIKE_RECOVERY,
    )
    for step, loss, level in found:
        if step < end and not any(abs(step - s) <= 1 for s in seen):
            incidents.append(
                {
                    "step": step,
                    "kind": "loss_spike",
                    "data_index": ctx.batch_of(step),
                    "action": None,
                    "loss": loss,
                    "level": level,
                }
            )
        elif step < end:
            for i in incidents:
                if i["kind"] == "loss_spike" and abs(step - i["step"]) <= 1:
                    i.setdefault("level", level)
    clusters: list[list[dict[str, Any]]] = []
    for inc in sorted(incidents, key=lambda i: (i["kind"], i["step"])):
        last = clusters[-1] if clusters else None
        if last and last[0]["kind"] == inc["kind"] and inc["step"] - last[-1]["step"] <= SPIKE_CLUSTER:
            clusters[-1].append(inc)
        else:
            clusters.append([inc])
    rolled = lambda c: all(i["action"] == "rollback" for i in c)  # noqa: E731  (the guard did PaLM's remedy)
    losses = [c for c in clusters if c[0]["kind"] == "loss_spike"]
    repeated = [c for c in losses if all(i["action"] in ("skip", "rollback") for i in c)]
    if len(repeated) >= REPEATED_INTERVENTIONS:
        merged = sorted((i for c in repeated for i in c), key=lambda i: i["step"])
        clusters = [c for c in clusters if not any(c is r for r in repeated)] + [merged]
    else:
        merged = None
    out = []
    for c in clusters:
        kind, first, last = c[0]["kind"], c[0]["step"], c[-1]["step"]
        at = f"step {first}" + (f"..{last}" if last != first else "")
        indices = [int(i["data_index"]) for i in c if i.get("data_index") is not None]
        actions = sorted({i["action"] or "none" for i in c})
        evidence: dict[str, Any] = {
            "count": len(c),
            "at_steps": [i["step"] for i in c][:20],
            "data_indices": indices[:20],
            "guard_actions": actions,
        }
        peak = max(c, key=lambda i: num(i.get("loss" if kind == "loss_spike" else "grad_norm")) or 0.0)
        for key in ("loss", "grad_norm"):
            if finite(peak.get(key)):
                evidence[key] = peak[key]
        if peak.get("level") and finite(peak.get("loss")):
            evidence["recent_level"] = peak["level"]
            evidence["jump"] = peak["loss"] / peak["level"]
        if kind == "grad_spike":
            out.append(
                finding(
                    kind,
                    "info",
                    (first, last),
                    evidence,
                    f"gradient-norm spike at {at} (clipped; guard: {'/'.join(actions)})",
                )
            )
            continue
        skip = ranges_of(indices, SPIKE_MARGIN)
        if c is merged:
            lr, how = ctx.lower_lr(first)
            out.append(
                finding(
                    kind,
                    "warning",
                    (first, last),
                    evidence,
                    f"the guard handled {len(c)} loss spikes between steps {first} and {last}: the run "
                    "is unstable at this learning rate",
                    ctx.fork_remedy(
                        kind,
                        first - 1,
                        [f"optim.lr={lr}"],
                        f"retrains from before the first spike with peak optim.lr = {lr} "
                        f"({how}), skipping the spikes' batches",
                        skip,
                    ),
                )
            )
        elif rolled(c):
            out.append(
                finding(
                    kind,
                    "info",
                    (first, last),
                    evidence,
                    f"loss spike at {at}; the guard rolled back and skipped its batches, nothing to do",
                )
            )
        else:
            vs_level = f" ({peak['loss']:.3f} vs a recent {peak['level']:.3f})" if peak.get("level") else ""
            stop = "stop" in actions
            what = (
                "the guard discarded the update"
                if set(actions) <= {"skip", "rollback"}
                else "the guard stopped the run"
                if stop
                else "it was trained on"
            )
            out.append(
                finding(
                    kind,
                    "critical" if stop else "warning",
                    (first, last),
                    evidence,
                    f"loss spike at {at}{vs_level}; {what}",
                    ctx.fork_remedy(
                        kind,
                        first - 1,
                        [],
                        "PaLM's remedy: retrains from the checkpoint before the spike "
                        f"without the data batches around it ({SPIKE_MARGIN} either side)",
                        skip,
                    ),
                )
            )
    return out


# ----------------------------------------------------------------------------- plateau (LR too low)
@rule
def plateau(ctx: Context) -> list[dict[str, Any]]:
    if ctx.cfg is None:
        return []
    cfg_lr = ctx.cfg.optim.lr
    t = ctx.table
    keep = (ctx.steps > ctx.warmup) & t.finite("loss") & t.finite("lr")
    steps, losses, lrs = ctx.steps[keep], t.numbers("loss")[keep], t.numbers("lr")[keep]
    if len(steps) < 10:
        return []

    def tiny(step: int, lr: float) -> bool:
        f = ctx.schedule_factor(step)
        return cfg_lr <= TINY_LR or (f is not None and lr < LR_CUT * cfg_lr * f)

    start = len(steps)
    if cfg_lr <= TINY_LR:
        start = 0  # every point is tiny
    while start > 0 and tiny(int(steps[start - 1]), float(lrs[start - 1])):
        start -= 1
    if len(steps) - start < max(10, len(steps) // 4):
        return []
    losses, lrs = losses[start:], lrs[start:]
    k = max(3, len(losses) // 5)
    early, late = series.median(losses[:k]), series.median(losses[-k:])
    drop = (early - late) / early if early > 0 else 0.0
    if drop >= PLATEAU_DROP:
        return []
    first, last = int(steps[start]), int(steps[-1])
    evals = [e["val_loss"] for e in ctx.evals if first <= e["step"] <= last and finite(e.get("val_loss"))]
    lr_median = series.median(lrs)
    eff = ctx.effective_peak(first) or cfg_lr
    if cfg_lr > TINY_LR and eff < LR_CUT * cfg_lr:  # cut while running: back to the configured LR
        new, how = cfg_lr, f"the configured optim.lr; it ran at {eff:.2g}"
    else:
        new, how = float(fmt_lr(10 * eff)), f"x10 of {eff:.2g}"
    evidence = {
        "loss_drop": drop,
        "loss_start": early,
        "loss_end": late,
        "lr": lr_median,
        "optim_lr": cfg_lr,
        "effective_peak_lr": eff,
    }
    if len(evals) >= 2:
        evidence["val_loss_drop"] = (evals[0] - evals[-1]) / evals[0]
    summary = (
        f"the loss fell by {max(drop, 0.0):.1%} over steps {first}-{last} with the LR at ~{lr_median:.2g} "
        f"(peak {eff:.2g}): the learning rate is too low"
    )
    why = f"retrains the stalled steps with peak optim.lr = {new} ({how})"
    return [
        finding(
            "plateau",
            "warning",
            (first, last),
            evidence,
            summary,
            ctx.fork_remedy("plateau", first, [f"optim.lr={new}"], why),
        )
    ]


# ----------------------------------------------------------------------------- gradient growth
@rule
def grad_growth(ctx: Context) -> list[dict[str, Any]]:
    if divergence_analysis(ctx):
        return []  # the divergence explains it
    norms = ctx.table.numbers("grad_norm")
    with np.errstate(invalid="ignore"):
        keep = (ctx.steps > ctx.warmup) & ctx.table.finite("grad_norm") & (norms > 0)
    if int(keep.sum()) < 20:
        return []
    steps, ys = ctx.steps[keep], series.logs(norms[keep])
    n, first, last = len(steps), int(steps[0]), int(steps[-1])
    picked: Sequence[int] = range(n)
    if n > THEIL_SEN_POINTS:  # theil_sen's own subsample, taken here rather than from a million-item list
        picked = [round(i * (n - 1) / (THEIL_SEN_POINTS - 1)) for i in range(THEIL_SEN_POINTS)]
    slope = theil_sen([int(steps[i]) for i in picked], [float(ys[i]) for i in picked])
    growth = math.exp(slope * (last - first))
    q = n // 4
    early, late = math.exp(series.median(ys[:q])), math.exp(series.median(ys[-q:]))
    if growth < GRAD_GROWTH or late / early < GRAD_GROWTH_QUARTERS:
        return []
    doubled = series.first_where(ys, lambda y: math.exp(y) >= 2 * early)
    onset = int(steps[doubled]) if doubled is not None else first
    lr, how = ctx.lower_lr(onset)
    evidence = {
        "trend_growth": growth,
        "slope_log_per_step": slope,
        "early_grad_norm": early,
        "late_grad_norm": late,
        "doubled_at_step": onset,
    }
    summary = (
        f"the gradient norm grew ~{growth:.1f}x over steps {first}-{last} (median {early:.3g} -> "
        f"{late:.3g}): an early sign of instability"
    )
    return [
        finding(
            "grad_growth",
            "warning",
            (first, last),
            evidence,
            summary,
            ctx.fork_remedy(
                "grad_growth",
                onset,
                [f"optim.lr={lr}"],
                f"retrains from before the norm doubled with peak optim.lr = {lr} ({how})",
            ),
        )
    ]
