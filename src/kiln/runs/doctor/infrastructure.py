"""The doctor's rules for infrastructure faults, read from the run's files rather than its
curves: a hang (the watchdog's hang-rank<r>.txt stack dumps), a checkpoint that does not verify,
a failed or interrupted run, failed checkpoint writes and broken runtime invariants. Their
remedies resume the run (`kiln train --resume`) rather than change it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import finding
from kiln.train import checkpoint as ckpt


def _stuck_frame(text: str) -> list[str]:
    """The innermost frame of the deepest thread that is not the watchdog's."""
    best: list[str] = []
    for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("File ")]
        if lines and "watchdog" not in lines[0] and len(lines) > len(best):
            best = lines
    m = re.match(r'File "([^"]+)", line (\d+) in (\S+)', best[0]) if best else None
    return [f"{m.group(3)} ({Path(m.group(1)).name}:{m.group(2)})"] if m else best[:1]


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
