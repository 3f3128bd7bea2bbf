"""Running evaluation suites on a run: `kiln eval`, and `[eval] suites` during training.

Results go to `runs/<name>/eval/step-<N>.json`:

    {"run": ..., "step": N, "suites": {"lm": {"loss": ..., ...}, ...},
     "skipped": {"toxicity": "why"}, "seconds": {"lm": 0.4, ...}, "artifacts": {"toxicity": "step-N/toxicity.json"}}

Evaluating more suites at a step already evaluated adds to its file. Artifacts (prompts, flagged
samples, examples) are written beside it, to `eval/step-<N>/<suite>.json`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from kiln.errors import KilnError, NotApplicable
from kiln.eval.suites import EvalContext, SuiteResult, available_suites, check_suites, parse_options


def run_suites(
    ctx: EvalContext, names: list[str], options: dict[str, dict[str, Any]] | None = None, log=None
) -> dict[str, Any]:
    """Run `names` on `ctx` (model in eval mode, no gradients); returns the report (not yet saved)."""
    suites = available_suites()
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise KilnError(f"unknown suite '{unknown[0]}'; registered suites: {', '.join(suites)}")
    options = options or {}
    report: dict[str, Any] = {"step": ctx.step, "suites": {}, "skipped": {}, "seconds": {}, "artifacts": {}}
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        for name in names:
            suite = suites[name]
            if suite.generates and ctx.is_encoder:
                report["skipped"][name] = "needs generation; an encoder (masked objective) does not generate"
                continue
            sctx = replace(ctx, options={**suite.options, **options.get(name, {})})
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    out = suite.fn(sctx)
            except NotApplicable as e:  # e.g. a text-window suite on an image-text run
                report["skipped"][name] = str(e)
                continue
            ctx.prepared = sctx.prepared  # keep the data a suite prepared for the next one
            result = out if isinstance(out, SuiteResult) else SuiteResult(metrics=dict(out or {}))
            report["seconds"][name] = round(time.perf_counter() - t0, 3)
            if result.skipped:
                report["skipped"][name] = result.skipped
                continue
            report["suites"][name] = {k: _number(name, k, v) for k, v in result.metrics.items()}
            if result.artifacts:
                report["artifacts"][name] = result.artifacts
            if log:
                log(f"eval: {name} done in {report['seconds'][name]:.1f}s")
    finally:
        ctx.model.train(was_training)
    return report


def _number(suite: str, key: str, value: Any) -> float | int | None:
    if value is None or isinstance(value, bool):
        return None if value is None else int(value)
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, (int, float)):
        raise TypeError(f"suite '{suite}' returned a non-number for '{key}': {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads as "not measured"
    return value


def save_report(run_dir: Path, report: dict[str, Any], tag: str = "") -> Path:
    """Write (or add to) `eval/step-<N>[-tag].json` and the artifacts beside it; returns the JSON's path."""
    folder = Path(run_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    step = report["step"]
    path = folder / f"step-{step}{'-' + tag if tag else ''}.json"
    artifacts = report.pop("artifacts", {})
    paths = {}
    for name, content in artifacts.items():
        target = folder / f"step-{step}" / f"{name}.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(content, indent=1, ensure_ascii=False, default=str) + "\n")
        paths[name] = str(target.relative_to(folder))
    report["artifacts"] = paths
    merged: dict[str, Any] = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except ValueError:
            merged = {}
    merged.update({"run": Path(run_dir).name, "step": step})
    for key in ("suites", "skipped", "seconds", "artifacts"):
        merged[key] = {**merged.get(key, {}), **report.get(key, {})}
    for name in report["suites"]:
        merged["skipped"].pop(name, None)
    for name in report["skipped"]:
        merged["suites"].pop(name, None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def report_table(report: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("suite", style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, metrics in report["suites"].items():
        rows = []
        for k, v in metrics.items():
            prefix = k.rsplit("/", 1)[0] + "/" if "/" in k else ""
            lo, hi = metrics.get(prefix + "ci_low"), metrics.get(prefix + "ci_high")
            if k.endswith(("ci_low", "ci_high")) and any(m.endswith("share") and m.startswith(prefix) for m in metrics):
                continue  # shown beside its share
            if k.endswith("share") and lo is not None and hi is not None:
                rows.append((k, f"{_fmt(v)}  [{lo:.3f}, {hi:.3f}]"))
            else:
                rows.append((k, _fmt(v)))
        for i, (k, v) in enumerate(rows):
            table.add_row(name if i == 0 else "", k, v)
        table.add_section()
    for name, why in report["skipped"].items():
        table.add_row(name, "skipped", why)
    return table


# --------------------------------------------------------------------------- entry point


def _warn(text: str) -> None:
    from kiln.progress import console, quiet

    if not quiet():
        console.print(text)


def evaluate_run(
    path: Path,
    step: int | None = None,
    names: list[str] | None = None,
    options: Sequence[str] = (),
    log=None,
    weights: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """`kiln eval`: run suites (default: all registered) on a run's checkpoint and save the report.
    The default step is the newest valid checkpoint's, or 0 for a run with none (an import); step 0
    without a checkpoint is the model training starts from, rebuilt exactly as training initialises it.
    `weights`: a quantised export of this run (kiln.runs.quantize), evaluated instead, with the
    `lm` suite run on its source checkpoint too so the report says what quantising cost."""
    from kiln.runs.rundir import RunDir

    run = RunDir.open(path)
    suites = available_suites()
    names = list(dict.fromkeys(names or suites))
    check_suites(names, where="--suite")
    parsed = parse_options(list(options), suites)
    quantized = None
    if weights is not None:
        from kiln.runs.quantize import read_quantized

        quantized = read_quantized(weights)
        source, saved_step = quantized[1].get("kiln.run"), int(quantized[1]["kiln.step"])
        if source != run.path.name:
            raise KilnError(
                f"{weights} was exported from run '{source}', not {run.path.name}; evaluate it "
                f"with kiln eval RUNS/{source} --weights {weights}"
            )
        if step is not None and step != saved_step:
            raise KilnError(f"{weights} holds step {saved_step}, not --step {step}; drop --step")
        step = saved_step
    loaded = run.load_model(step, warn=_warn)
    if loaded.cfg.train.threads:
        torch.set_num_threads(loaded.cfg.train.threads)
    ctx = EvalContext(
        loaded.cfg, loaded.model, loaded.tokenizer, loaded.device, loaded.autocast, run_dir=run.path, step=loaded.step
    )
    base: dict[str, Any] | None = None
    if quantized is not None:
        from kiln.runs.quantize import load_quantized, weight_bytes

        loaded.model.float()  # the export was quantised from float32 weights: compare like with like
        base = run_suites(ctx, ["lm"], parsed, log=log)["suites"].get("lm", {})
        base_bytes = weight_bytes(loaded.model)
        load_quantized(loaded.model, {k: v.to(loaded.device) for k, v in quantized[0].items()})
    report = run_suites(ctx, names, parsed, log=log)
    tag = ""
    if quantized is not None:
        tag = quantized[1]["kiln.quantize"]
        assert base is not None  # measured above for the same quantised export
        lm = report["suites"].get("lm") or run_suites(ctx, ["lm"], parsed)["suites"]["lm"]
        p = "masked_" if ctx.is_encoder else ""
        report["suites"]["quantized"] = {
            "base_loss": base[f"{p}loss"],
            "loss": lm[f"{p}loss"],
            "base_ppl": base[f"{p}ppl"],
            "ppl": lm[f"{p}ppl"],
            "ppl_change": lm[f"{p}ppl"] / base[f"{p}ppl"] - 1,
            "base_weight_bytes": base_bytes,
            "weight_bytes": weight_bytes(loaded.model),
        }
    out = save_report(run.path, report, tag)
    return report, out
