"""The run tools as they were before they read metrics by column: every record a dict, every
rule a loop over them (kiln.runs at the commit before issue 34's columnar reader). The tests in
test_run_tools_columnar.py check that the columnar code gives the same findings, curves and
numbers as this, record for record. Copied, not maintained: change it only with the rule it
mirrors, and only where the record-by-record reading is not the point."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from kiln.runs.curves import NOT_SERIES, Segment, Source, number, records
from kiln.runs.doctor import (
    RANK_KEY,
    SLOW_FACTOR,
    SLOW_MIN_S,
    SLOW_RANK_RATIO,
    SLOW_RANK_SHARE,
    SLOW_SHARE,
    SLOW_Z,
    WARMUP_INTERVALS,
    _stuck_frame,
)
from kiln.runs.doctor import (
    rank as rank_findings,
)
from kiln.runs.doctor_moe import COLLAPSE_MIN_RATIO, COLLAPSE_SHARE, LOAD_KEY, MIN_RECORDS
from kiln.runs.doctor_progress import EARLY_RISE, EARLY_RISE_SHARE, MIN_STEPS_AFTER_RISE, TOKENS_PER_PARAM, _outcome
from kiln.runs.doctor_rules import (
    DIVERGE_MIN_GAP,
    DIVERGE_RATIO,
    EXCURSION_MIN,
    GIVE_BACK,
    GIVE_BACK_MIN_PROGRESS,
    GIVE_BACK_NOISE,
    GRAD_GROWTH,
    GRAD_GROWTH_QUARTERS,
    INTERVENTION_KINDS,
    LR_CUT,
    PLATEAU_DROP,
    REPEATED_INTERVENTIONS,
    RULES,
    SPIKE_CLUSTER,
    SPIKE_MARGIN,
    SPIKE_MIN_HISTORY,
    SPIKE_MIN_JUMP,
    SPIKE_RECOVERY,
    SPIKE_WINDOW,
    SPIKE_Z,
    TINY_LR,
    Context,
    divergence_analysis,
    finding,
    finite,
    fmt_lr,
    mad,
    median,
    num,
    ranges_of,
    theil_sen,
)
from kiln.runs.rundir import RunDir

REF_RULES: dict[str, Any] = {}


def ref_rule(fn):
    REF_RULES[fn.__name__] = fn
    return fn


class RefContext(Context):
    """The Context with the metrics read record by record, as a list of dicts (one per step, the last)."""

    def __init__(self, run: RunDir):
        super().__init__(run)
        by_step: dict[int, dict[str, Any]] = {}
        for r in run.metrics():
            if isinstance(r.get("step"), int):
                by_step[r["step"]] = r  # after a rollback the file holds one record per step; keep the last
        self.metrics = [by_step[s] for s in sorted(by_step)]

    def losses(self, finite_only: bool = True) -> list[tuple[int, float]]:
        return [
            (r["step"], float(r["loss"]))
            for r in self.metrics
            if num(r.get("loss")) is not None and (finite(r["loss"]) or not finite_only)
        ]

    def train_loss_near(self, step: int, points: int = 5) -> float | None:
        near = [v for s, v in self.losses() if s <= step][-points:]
        return median(near) if near else None

    def effective_peak(self, step: int) -> float | None:
        for r in reversed(self.metrics):
            if r["step"] <= step and finite(r.get("lr")):
                f = self.schedule_factor(r["step"])
                return r["lr"] / f if f else None
        return None


def diagnose(run_path: Path) -> list[dict[str, Any]]:
    """kiln.runs.doctor.diagnose with the rules that read the metrics as they were."""
    ctx = RefContext(RunDir.open(Path(run_path)))
    ctx.cache["divergence"] = _divergence(ctx)  # what divergence_analysis gives every rule
    findings: list[dict[str, Any]] = []
    for check in RULES:
        findings += REF_RULES.get(check.__name__, check)(ctx)
    return rank_findings(findings)


def last_metrics(run: RunDir) -> dict[str, Any]:
    """What `kiln runs` and `kiln compare` took as the run's last record."""
    metrics = run.metrics()
    return metrics[-1] if metrics else {}


# --------------------------------------------------------------------------- the rules, as they were


def _divergence(ctx: RefContext) -> dict[str, Any] | None:
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
    points = ctx.losses(finite_only=False)
    if len(points) < 8:
        return None
    steps = [s for s, _ in points]
    vals = [v if math.isfinite(v) else math.inf for _, v in points]
    n = len(vals)
    smooth = [median(vals[max(0, i - 2) : i + 3]) for i in range(n)]  # a centred running median of 5
    nan_tail = 0
    while nan_tail < n and not math.isfinite(vals[n - 1 - nan_tail]):
        nan_tail += 1
    best, high = math.inf, []  # high: far above the best smoothed loss so far
    first_loss = next((v for v in smooth if math.isfinite(v)), math.inf)
    finite_vals = [v for v in vals if math.isfinite(v)]
    diffs = [b - a for a, b in zip(finite_vals, finite_vals[1:])]
    # the deviation of one loss (MAD of step changes / sqrt 2), and of a median of 5 (x 1.25 / sqrt 5)
    noise = (mad(diffs, median(diffs)) * 1.4826 / math.sqrt(2) * 1.25 / math.sqrt(5)) if len(diffs) >= 2 else 0.0
    for v in smooth:
        best = min(best, v)
        progress = first_loss - best if math.isfinite(first_loss) and math.isfinite(best) else 0.0
        gave_back = progress >= GIVE_BACK_MIN_PROGRESS and v - best >= GIVE_BACK * progress + GIVE_BACK_NOISE * noise
        high.append(math.isfinite(best) and v - best >= DIVERGE_MIN_GAP and (v > best * DIVERGE_RATIO or gave_back))
    runs: list[tuple[int, int]] = []  # (first, end) of each stretch of high points
    i = 0
    while i < n:
        j = i
        while j < n and high[j]:
            j += 1
        runs, i = runs + [(i, j)] * (j > i), max(j, i + 1)
    found = [(i, j) for i, j in runs if (j == n and j - i >= 3) or j - i >= EXCURSION_MIN]
    if not found and 2 <= nan_tail < n:
        found = [(n - nan_tail, n)]
    if not found:
        return None
    i, j = found[0]
    start = max(i, 1)
    before = [k for k in range(start) if math.isfinite(smooth[k])]
    b = min(before, key=lambda k: smooth[k]) if before else 0
    tail = median(vals[-max(3, math.ceil(0.1 * n)) :])
    peak = max((v for v in vals[i:j] if math.isfinite(v)), default=math.inf)
    return {
        "rise": steps[start - 1],
        "onset": steps[start],
        "last": steps[j - 1],
        "via": "loss",
        "best_loss": smooth[b],
        "best_step": steps[b],
        "peak_loss": peak,
        "final_loss": tail,
        "recovered": j < n,
        "excursion_points": j - i,
        "nonfinite": nan_tail >= 2,
        "nonfinite_from": steps[n - nan_tail] if nan_tail >= 2 else None,
    }


@ref_rule
def nonfinite(ctx: RefContext) -> list[dict[str, Any]]:
    d = divergence_analysis(ctx)
    cutoff = d["nonfinite_from"] if d and d.get("nonfinite_from") else math.inf
    if d and d["via"] == "guard":
        cutoff = d["onset"]
    bad: dict[int, dict[str, Any]] = {}
    for e in ctx.events:
        if e.get("kind") == "nonfinite" and isinstance(e.get("step"), int) and e["step"] < cutoff:
            bad[e["step"]] = {"data_index": e.get("data_index", ctx.batch_of(e["step"])), "action": e.get("action")}
    for r in ctx.metrics:
        bad_value = any(num(r.get(k)) is not None and not finite(r.get(k)) for k in ("loss", "grad_norm"))
        if r["step"] < cutoff and bad_value:
            bad.setdefault(r["step"], {"data_index": ctx.batch_of(r["step"]), "action": None})
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


def metric_spikes(points: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """(step, loss, recent level) of every logged loss far above its recent robust level that
    comes back down; spikes never enter the baseline, a level that does not come back does."""
    logs = [math.log(max(v, 1e-6)) for _, v in points]
    history: list[float] = []
    out = []
    for i, (step, loss) in enumerate(points):
        x, window = logs[i], history[-SPIKE_WINDOW:]
        if len(window) >= SPIKE_MIN_HISTORY:
            med = median(window)
            jump = x - med
            if jump >= SPIKE_MIN_JUMP and jump >= SPIKE_Z * 1.4826 * mad(window, med):
                later = logs[i + 1 : i + 1 + SPIKE_RECOVERY]
                if len(later) < 2 or any(v <= med + 0.5 * jump for v in later):
                    out.append((step, loss, math.exp(med)))
                    continue
        history.append(x)
    return out


@ref_rule
def spikes(ctx: RefContext) -> list[dict[str, Any]]:
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
    for step, loss, level in metric_spikes(ctx.losses()):
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


@ref_rule
def plateau(ctx: RefContext) -> list[dict[str, Any]]:
    if ctx.cfg is None:
        return []
    cfg_lr = ctx.cfg.optim.lr
    points = [
        (r["step"], r["loss"], r["lr"])
        for r in ctx.metrics
        if r["step"] > ctx.warmup and finite(r.get("loss")) and finite(r.get("lr"))
    ]
    if len(points) < 10:
        return []

    def tiny(step: int, lr: float) -> bool:
        f = ctx.schedule_factor(step)
        return cfg_lr <= TINY_LR or (f is not None and lr < LR_CUT * cfg_lr * f)

    start = len(points)
    while start > 0 and tiny(points[start - 1][0], points[start - 1][2]):
        start -= 1
    segment = points[start:]
    if len(segment) < max(10, len(points) // 4):
        return []
    k = max(3, len(segment) // 5)
    early, late = median([p[1] for p in segment[:k]]), median([p[1] for p in segment[-k:]])
    drop = (early - late) / early if early > 0 else 0.0
    if drop >= PLATEAU_DROP:
        return []
    first, last = segment[0][0], segment[-1][0]
    evals = [e["val_loss"] for e in ctx.evals if first <= e["step"] <= last and finite(e.get("val_loss"))]
    lr_median = median([p[2] for p in segment])
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


@ref_rule
def grad_growth(ctx: RefContext) -> list[dict[str, Any]]:
    if divergence_analysis(ctx):
        return []  # the divergence explains it
    pts = [
        (r["step"], math.log(r["grad_norm"]))
        for r in ctx.metrics
        if r["step"] > ctx.warmup and finite(r.get("grad_norm")) and r["grad_norm"] > 0
    ]
    if len(pts) < 20:
        return []
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    slope = theil_sen(xs, ys)
    growth = math.exp(slope * (xs[-1] - xs[0]))
    q = len(pts) // 4
    early, late = math.exp(median(ys[:q])), math.exp(median(ys[-q:]))
    if growth < GRAD_GROWTH or late / early < GRAD_GROWTH_QUARTERS:
        return []
    onset = next((x for x, y in zip(xs, ys) if math.exp(y) >= 2 * early), xs[0])
    lr, how = ctx.lower_lr(onset)
    evidence = {
        "trend_growth": growth,
        "slope_log_per_step": slope,
        "early_grad_norm": early,
        "late_grad_norm": late,
        "doubled_at_step": onset,
    }
    summary = (
        f"the gradient norm grew ~{growth:.1f}x over steps {xs[0]}-{xs[-1]} (median {early:.3g} -> "
        f"{late:.3g}): an early sign of instability"
    )
    return [
        finding(
            "grad_growth",
            "warning",
            (xs[0], xs[-1]),
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


def _interval_times(ctx: RefContext) -> list[tuple[int, int, float]]:
    """(step, steps in the logged interval, mean seconds per step) from tokens_per_s."""
    out = []
    for prev, r in zip(ctx.metrics, ctx.metrics[1:]):
        k = r["step"] - prev["step"]
        if (
            finite(r.get("tokens_per_s"))
            and r["tokens_per_s"] > 0
            and num(r.get("tokens")) is not None
            and num(prev.get("tokens")) is not None
            and k > 0
            and r["tokens"] > prev["tokens"]
        ):
            out.append((r["step"], k, (r["tokens"] - prev["tokens"]) / k / r["tokens_per_s"]))
    return out


@ref_rule
def slow_steps(ctx: RefContext) -> list[dict[str, Any]]:
    """Steps far slower than comparable ones: per phase when the step_time callback was on (a
    stall in the data phase is a loader stall), else from tokens_per_s. Warm-up intervals are
    left out, and the steps layer_stats samples (slower by design) are judged among themselves."""
    times = _interval_times(ctx)[WARMUP_INTERVALS:]
    if len(times) < 5:
        return []
    every = 0
    if ctx.cfg is not None and "layer_stats" in ctx.cfg.callbacks.enabled:
        every = (ctx.cfg.callbacks.options.get("layer_stats") or {}).get("every", 10)
    group = lambda step, k: sum(1 for s in range(step - k + 1, step + 1) if every and s % every == 0)  # noqa: E731
    by_step = {r["step"]: r for r in ctx.metrics}
    typical = median([t for _, _, t in times])
    floor = max(SLOW_MIN_S, SLOW_FACTOR * typical)
    phase_keys = [f"step_time/{p}_s" for p in ("data", "forward_backward", "grad_norm", "optimizer")]
    samples: dict[tuple[int, str], list[float]] = {}
    for step, k, t in times:
        for p in ["total"] + [p for p in phase_keys if finite(by_step[step].get(p))]:
            samples.setdefault((group(step, k), p), []).append(t if p == "total" else by_step[step][p])
    level = {key: (median(v), 1.4826 * mad(v, median(v))) for key, v in samples.items() if len(v) >= 3}
    found: dict[str, list[dict[str, Any]]] = {"slow_steps": [], "loader_stall": []}
    for step, k, t in times:
        rec, g = by_step[step], group(step, k)
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
    total = sum(t * k for _, k, t in times)
    for kind, items in found.items():
        if not items:
            continue
        steps, lost = [i["step"] for i in items], sum(i["excess_s"] for i in items)
        evidence = {
            "count": len(items),
            "at_steps": steps[:20],
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
                (steps[0], steps[-1]),
                evidence,
                f"{len(items)} {text} ({typical * 1000:.3g} ms a step): {lost:.1f}s lost{hint}",
            )
        )
    return out


@ref_rule
def slow_rank(ctx: RefContext) -> list[dict[str, Any]]:
    """step_time's per-rank busy time: one rank consistently far above the others."""
    rows = [
        busy
        for r in ctx.metrics
        if len(busy := {int(m.group(1)): r[k] for k in r if (m := RANK_KEY.match(k)) and finite(r[k])}) >= 2
    ]
    steps = [r["step"] for r in ctx.metrics if any(RANK_KEY.match(k) for k in r)]
    out = []
    for rank in sorted({rank for b in rows for rank in b}):
        ratios = [
            b[rank] / median(others)
            for b in rows
            if rank in b and (others := [v for k, v in b.items() if k != rank]) and median(others) > 0
        ]
        share = sum(1 for x in ratios if x >= SLOW_RANK_RATIO) / len(ratios) if ratios else 0.0
        if len(ratios) < 5 or share < SLOW_RANK_SHARE or median(ratios) < SLOW_RANK_RATIO:
            continue
        per_rank = {f"rank{k}_busy_s": median([b[k] for b in rows if k in b]) for k in sorted({*rows[0]})}
        out.append(
            finding(
                "slow_rank",
                "warning",
                (steps[0], steps[-1]),
                {"rank": rank, "ratio_to_others": median(ratios), "share_of_records": share, **per_rank},
                f"rank {rank} is busy {median(ratios):.2f}x as long as the other ranks in "
                f"{100 * share:.0f}% of the steps: every rank waits for it (check its GPU, node and "
                "data path)",
            )
        )
    return out


@ref_rule
def hang(ctx: RefContext) -> list[dict[str, Any]]:
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
    step = max([ctx.status.get("step") or 0] + [r["step"] for r in ctx.metrics[-1:]])
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


@ref_rule
def run_state(ctx: RefContext) -> list[dict[str, Any]]:
    """A failed or interrupted run (a hang says more), failed checkpoint writes, broken invariants."""
    out, status = [], ctx.status
    step = status.get("step") or (ctx.metrics[-1]["step"] if ctx.metrics else 0)
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


@ref_rule
def router_collapse(ctx: RefContext) -> list[dict[str, Any]]:
    if ctx.cfg is None or ctx.cfg.model.moe_experts < 2:
        return []
    m = ctx.cfg.model
    threshold = max(COLLAPSE_MIN_RATIO, COLLAPSE_SHARE * m.moe_experts / m.moe_top_k)
    layers = sorted({match.group(1) for r in ctx.metrics for k in r if (match := LOAD_KEY.match(k))})
    out = []
    for layer in layers:
        key = f"moe/{layer}/load_max_mean"
        pts = [(r["step"], float(r[key])) for r in ctx.metrics if r["step"] > ctx.warmup and finite(r.get(key))]
        if len(pts) < MIN_RECORDS:
            continue
        tail = pts[-max(MIN_RECORDS // 2, len(pts) // 4) :]
        level = median(v for _, v in tail)
        if level < threshold:
            continue
        onset = tail[0][0]  # the first step of the final stretch at or above the threshold
        for step, value in reversed(pts):
            if value < threshold:
                break
            onset = step
        sets = [f"model.moe_bias_rate={max(1e-3, 2 * m.moe_bias_rate):g}"]
        if m.moe_aux_loss == 0:
            sets.append("model.moe_aux_loss=0.01")
        why = f"balances the experts again: {sets[0].split('=')[0]} = {sets[0].split('=')[1]}" + (
            ", plus a Switch auxiliary loss of 0.01" if len(sets) > 1 else ""
        )
        evidence = {
            "layer": layer,
            "load_max_mean": level,
            "threshold": threshold,
            "experts": m.moe_experts,
            "top_k": m.moe_top_k,
            "since_step": onset,
        }
        summary = (
            f"{layer}: the router collapsed — its busiest expert gets {level:.2f}x the mean load "
            f"(at most {m.moe_experts / m.moe_top_k:g}x with {m.moe_experts} experts, top-{m.moe_top_k}) "
            f"since step {onset}"
        )
        out.append(
            finding(
                "router_collapse",
                "warning",
                (onset, pts[-1][0]),
                evidence,
                summary,
                ctx.fork_remedy("router_collapse", onset, sets, why),
            )
        )
    return out


def _early_rise(ctx: RefContext) -> dict[str, Any] | None:
    """The loss during warm-up above where it started: the first logged loss, or ln(vocabulary)
    (an initialised model predicts about uniformly) when the first record comes later."""
    points = ctx.losses()
    if not points or ctx.cfg is None:
        return None
    window = max(ctx.warmup, points[0][0])
    early = [v for s, v in points if s <= window] or [points[0][1]]
    start = points[0][1] if points[0][0] <= 1 else min(points[0][1], math.log(ctx.cfg.data.vocab_size))
    # a running median of three: one noisy step is not a rise
    peak = max(median(early[max(0, i - 1) : i + 2]) for i in range(len(early)))
    if peak - start < max(EARLY_RISE, EARLY_RISE_SHARE * start):
        return None
    return {"start_loss": start, "warmup_peak_loss": peak, "warmup_end_step": window}


@ref_rule
def no_learning(ctx: RefContext) -> list[dict[str, Any]]:
    if ctx.cfg is None or not ctx.metrics:
        return []
    summary = ctx.run.summary() or {}
    outcome = _outcome(ctx, summary)
    if outcome is None or not outcome["near"]:
        return []
    steps = ctx.metrics[-1]["step"]
    tokens = next((r["tokens"] for r in reversed(ctx.metrics) if finite(r.get("tokens"))), 0)
    params = summary.get("params")
    if not params:  # an unfinished run: count them from its config
        from kiln.scaling.flops import param_count

        params = param_count(ctx.cfg.model, ctx.cfg.data.vocab_size)
    rise = _early_rise(ctx)
    if rise is None and tokens < TOKENS_PER_PARAM * params:
        return []  # early in training: near the baseline is where a run starts
    if rise is not None and steps - ctx.warmup < MIN_STEPS_AFTER_RISE:
        return []
    evidence = {k: v for k, v in outcome.items() if k not in ("near", "text")}
    evidence.update(steps=steps, tokens=tokens, tokens_per_param=tokens / params)
    evidence["optim_lr"] = ctx.cfg.optim.lr
    span = (ctx.metrics[0]["step"], steps)
    if rise is None:
        said = (
            f"after {steps} steps ({tokens / params:.0f} tokens per parameter) the model ends near its "
            f"context-free baseline ({outcome['text']}): it has learned little beyond token frequencies"
        )
        return [finding("no_learning", "warning", span, evidence, said)]
    evidence.update(rise)
    lr, how = ctx.lower_lr(rise["warmup_end_step"])
    said = (
        f"the loss rose from {rise['start_loss']:.2f} to {rise['warmup_peak_loss']:.2f} during warm-up and the "
        f"run ends at its context-free baseline ({outcome['text']}): a learning rate of "
        f"{fmt_lr(ctx.cfg.optim.lr)} wrecked the weights at the start and the model learned only token frequencies"
    )
    why = f"a fresh attempt with peak optim.lr = {lr} ({how}); the wrecked weights are not worth forking"
    return [
        finding(
            "no_learning",
            "critical",
            span,
            evidence,
            said,
            ctx.fork_remedy("no_learning", 0, [f"optim.lr={lr}"], why),
        )
    ]


def lineage_records(run: RunDir, source: Source) -> list[tuple[RunDir, list[dict[str, Any]], bool]]:
    """(run, its records that lead to `run`, inherited) for every ancestor (records with step
    at most the step the next generation forked at), oldest first, then `run` itself with all
    of its records."""
    out = []
    for ancestor, upto in run.ancestry():
        kept = [r for r in records(ancestor, source) if isinstance(r.get("step"), int) and r["step"] <= upto]
        out.append((ancestor, kept, True))
    out.append((run, records(run, source), False))
    return out


def _has_tokens(chain: list[tuple[RunDir, list[dict[str, Any]], bool]], key: str) -> bool:
    return all(number(r.get("tokens")) is not None for _, recs, _ in chain for r in recs if key in r)


def lineage_series(
    run: RunDir, source: Source = "metrics", key: str = "loss", x: Literal["auto", "tokens", "step"] = "auto"
) -> list[Segment]:
    """The curve of `key` along the run's lineage, one Segment per generation, oldest first.
    Inherited segments with no points (a from-scratch fork) are left out; the run's own segment
    is always last, maybe empty. x "auto" is tokens when every record holding `key` has them."""
    chain = lineage_records(run, source)
    axis = x if x != "auto" else ("tokens" if _has_tokens(chain, key) else "step")
    segments = []
    for owner, recs, inherited in chain:
        xs, ys, steps = [], [], []
        for r in recs:
            if key not in r or number(r.get(axis)) is None:
                continue
            y = r[key]
            if isinstance(y, bool) or not isinstance(y, (int, float)):
                continue
            xs.append(float(r[axis]))
            ys.append(float(y))  # NaN stays: matplotlib draws it as a gap where the guard saw one
            steps.append(int(r.get("step", 0)))
        if inherited and not xs:
            continue
        segments.append(Segment(owner.name, xs, ys, inherited, owner.path, steps, axis))
    return segments


def series_keys(run: RunDir, source: Source) -> set[str]:
    """Numeric keys of the run's (and its lineage's) records of `source`."""
    keys: set[str] = set()
    for _, recs, _ in lineage_records(run, source):
        for r in recs:
            keys.update(
                k
                for k, v in r.items()
                if k not in NOT_SERIES and isinstance(v, (int, float)) and not isinstance(v, bool)
            )
    return keys


def step_to_x(run: RunDir, steps: list[int], axis: str) -> list[float]:
    """Positions of `steps` on a tokens (or step) axis, from the lineage's records: events
    carry steps only. Steps without a record are interpolated between known ones."""
    if axis == "step":
        return [float(s) for s in steps]
    known: dict[int, float] = {}
    for source in ("metrics", "evals"):
        for _, recs, _ in lineage_records(run, source):
            for r in recs:
                if isinstance(r.get("step"), int) and number(r.get("tokens")) is not None:
                    known.setdefault(r["step"], float(r["tokens"]))
    if not known:
        return [float(s) for s in steps]
    pts = sorted(known.items())
    out = []
    for s in steps:
        if s in known:
            out.append(known[s])
            continue
        below = [p for p in pts if p[0] <= s]
        above = [p for p in pts if p[0] >= s]
        if below and above:
            (s0, t0), (s1, t1) = below[-1], above[0]
            out.append(t0 + (t1 - t0) * (s - s0) / (s1 - s0))
        else:  # beyond the records: tokens per step of the nearest one
            s0, t0 = (below or above)[-1 if below else 0]
            out.append(t0 / s0 * s if s0 else float(s))
    return out
