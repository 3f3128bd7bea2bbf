"""`kiln sweep SWEEP.toml`: a grid of model sizes x token budgets, or an IsoFLOP set, as ordinary runs.

    name = "iso"                          # runs go to <runs-dir>/iso/<point>
    preset = "tiny"                       # every point starts from this preset ...
    set = ["train.time_budget_s=0"]       # ... with these overrides
    params = [2e5, 4e5, 8e5]              # target non-embedding parameters (shapes by kiln.scaling.law.shape_for)
    # shapes = [{n_layers = 2, d_model = 128}, ...]   or explicit shapes (n_heads = d_model / 64 unless given)
    tokens = [1e6, 4e6]                   # a grid: every size x every token budget
    # flops = [1e13, 4e13]                # or IsoFLOP: for each budget C, every size with D = C / (FLOPs per token)
    lr_rule = "constant"                  # constant | width: peak LR x (preset width / d_model)
    warmup_fraction = 0.1                 # warmup steps = this share of each point's steps (0: the preset's)
    seeds = [0, 1, 2]                     # every point once per train.seed, named -s<seed> (the preset's seed: plain)

Seeds measure a ladder's run-to-run spread (init and data order); with several seeds there are
enough points for `kiln scaling fit --backtest` to check the law's extrapolation to the top budget.

Each point is an ordinary run folder: a finished one is skipped when the sweep runs again, an
interrupted one (status not finished) is resumed from its newest checkpoint. `--parallel N` runs
N points at once, each in its own `kiln train` process; a table of the points, their state and
steps done is printed whenever one ends and every 30 s while any runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.scaling.law import HEAD_DIM, shape_for

KEYS = {"name", "preset", "set", "params", "shapes", "tokens", "flops", "lr_rule", "warmup_fraction", "seeds"}


@dataclass
class SweepPoint:
    name: str
    shape: dict[str, int]
    tokens: int
    overrides: list[str] = field(default_factory=list)
    steps: int = 0  # optimizer steps the point trains
    state: str = "pending"  # pending | skipped (finished before) | running | finished | failed
    loss: float | None = None
    done: int = 0  # steps logged so far (while running)


def _number_list(spec: dict[str, Any], key: str) -> list[float]:
    values = spec.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        raise ConfigError(f"sweep {key} must be a list of positive numbers, got {values!r}")
    return [float(v) for v in values]


def load_sweep(path: Path) -> tuple[str, list[SweepPoint]]:
    """The sweep's name and its points, each with the `--set` overrides of its run."""
    path = Path(path)
    spec = _read_spec(path)
    name = spec.get("name") or path.stem
    preset, common = spec.get("preset", "tiny"), list(spec.get("set", []))
    base = load_config(preset, overrides=common)  # fails early, with the config layer's own message
    if ("params" in spec) == ("shapes" in spec):
        raise ConfigError(f"{path}: give the sizes as params = [...] or as shapes = [...], one of them")
    if ("tokens" in spec) == ("flops" in spec):
        raise ConfigError(f"{path}: give tokens = [...] (a grid) or flops = [...] (IsoFLOP), one of them")
    shapes = _shapes(path, spec)
    lr_rule = spec.get("lr_rule", "constant")
    if lr_rule not in ("constant", "width"):
        raise ConfigError(f"{path}: lr_rule = {lr_rule!r}; choose constant or width")
    seeds = _seeds(path, spec, base)
    warmup_fraction = float(spec.get("warmup_fraction", 0.0))
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"{path}: warmup_fraction must be in [0, 1), got {warmup_fraction}")
    pairs = _shape_tokens(spec, shapes, preset, common, base)
    points = _points(pairs, base, common, lr_rule, warmup_fraction, seeds)
    if len({p.name for p in points}) != len(points):
        raise ConfigError(f"{path}: two points have the same shape and tokens; remove the duplicate")
    return name, points


def _read_spec(path: Path) -> dict[str, Any]:
    """The sweep file's table, refused when missing, not TOML or holding an unknown key."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; write a sweep file (see `kiln sweep --help`)")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e})") from None
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep has {', '.join(sorted(KEYS))}")
    return spec


def _shapes(path: Path, spec: dict[str, Any]) -> list[dict[str, int]]:
    """The sweep's model shapes, from its params (by `shape_for`) or its explicit shapes."""
    if "params" in spec:
        return [shape_for(n) for n in _number_list(spec, "params")]
    shapes = []
    for s in spec["shapes"]:
        if not isinstance(s, dict) or not {"n_layers", "d_model"} <= set(s):
            raise ConfigError(f"{path}: each shape needs n_layers and d_model, got {s!r}")
        shapes.append(
            {
                "n_layers": int(s["n_layers"]),
                "d_model": int(s["d_model"]),
                "n_heads": int(s.get("n_heads", max(1, int(s["d_model"]) // HEAD_DIM))),
            }
        )
    return shapes


def _seeds(path: Path, spec: dict[str, Any], base) -> list[int]:
    """The sweep's seeds (the preset's seed when none are given)."""
    seeds = spec.get("seeds", [base.train.seed])
    if not (
        isinstance(seeds, list)
        and seeds
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)
        and len(set(seeds)) == len(seeds)
    ):
        raise ConfigError(f"{path}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    return seeds


def _shape_tokens(
    spec: dict[str, Any], shapes: list[dict[str, int]], preset: str, common: list[str], base
) -> list[tuple[dict[str, int], float]]:
    """(shape, tokens) of every point: every shape x every token budget (a grid), or for each
    FLOP budget every shape with the tokens that budget buys (IsoFLOP)."""
    from kiln.scaling.flops import flops_per_token

    pairs: list[tuple[dict[str, int], float]] = []
    for shape in shapes:
        if "tokens" in spec:
            pairs += [(shape, d) for d in _number_list(spec, "tokens")]
    if "flops" in spec:  # the MFU's FLOP accounting (the family's FLOPs per token, output layer included)
        for budget in _number_list(spec, "flops"):
            for shape in shapes:
                model = load_config(preset, overrides=common + _shape_sets(shape)).model
                pairs.append((shape, budget / flops_per_token(model, base.data.vocab_size)))
    return pairs


def _points(
    pairs: list[tuple[dict[str, int], float]],
    base,
    common: list[str],
    lr_rule: str,
    warmup_fraction: float,
    seeds: list[int],
) -> list[SweepPoint]:
    """The sweep's points: each (shape, tokens) rounded to whole steps, once per seed, with the
    `--set` overrides of its run."""
    points = []
    per_step = base.global_batch * base.model.seq_len
    for shape, tokens in pairs:
        tokens = max(per_step, int(round(tokens / per_step)) * per_step)
        sets = common + _shape_sets(shape) + [f"train.tokens={tokens}", "train.time_budget_s=0"]
        if lr_rule == "width":
            sets.append(f"optim.lr={width_lr(base, shape['d_model']):.6g}")
        if warmup_fraction:
            sets.append(f"schedule.warmup_steps={max(1, int(warmup_fraction * tokens / per_step))}")
        label = f"L{shape['n_layers']}-d{shape['d_model']}-T{tokens:.3g}".replace("+", "")
        for seed in seeds:  # the preset's own seed keeps the plain name: adding seeds later reuses those runs
            own = seed == base.train.seed
            points.append(
                SweepPoint(
                    label if own else f"{label}-s{seed}",
                    shape,
                    tokens,
                    sets if own else sets + [f"train.seed={seed}"],
                    steps=tokens // per_step,
                )
            )
    return points


def width_lr(base, d_model: int) -> float:
    """lr_rule = "width": the preset's peak LR scaled by its width over this one's (Adam's update per
    weight is ~LR regardless of fan-in, so a narrower layer takes a larger LR for the same change in
    its outputs)."""
    return base.optim.lr * base.model.d_model / d_model


def _shape_sets(shape: dict[str, int]) -> list[str]:
    return [f"model.{k}={v}" for k, v in shape.items()]


def _state(run: Path) -> str:
    status = run / "status.json"
    if not status.is_file():
        return "pending"
    state = json.loads(status.read_text()).get("state")
    return "finished" if state == "finished" and (run / "summary.json").is_file() else "interrupted"


def table(points: list[SweepPoint]) -> str:
    lines = [f"{'point':<24} {'layers':>6} {'width':>6} {'tokens':>10} {'state':<10} {'steps':>13} {'val loss':>9}"]
    for p in points:
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        done = p.steps if p.state in ("finished", "skipped") else p.done
        lines.append(
            f"{p.name:<24} {p.shape['n_layers']:>6} {p.shape['d_model']:>6} {p.tokens:>10.3g} "
            f"{p.state:<10} {f'{done}/{p.steps}':>13} {loss:>9}"
        )
    return "\n".join(lines)


def _logged_step(run: Path) -> int:
    """The newest step in a running point's metrics.jsonl (its last complete line)."""
    try:
        with (run / "metrics.jsonl").open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError):
                continue
    except OSError:  # not written yet: the point has not logged a step
        return 0
    return 0


def run_sweep(
    path: Path,
    runs_dir: Path,
    preset_override: str | None = None,
    parallel: int = 1,
    log=print,
    progress_s: float = 30.0,
) -> list[SweepPoint]:
    """Run (or finish) every point of the sweep; returns the points with their final state."""
    name, points = load_sweep(path)
    spec = tomllib.loads(Path(path).read_text())
    preset = preset_override or spec.get("preset", "tiny")
    folder = Path(runs_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[SweepPoint, list[str]]] = []
    for p in points:
        run = folder / p.name
        state = _state(run)
        if state == "finished":
            p.state, p.loss = "skipped", json.loads((run / "summary.json").read_text()).get("val_loss")
            continue
        if state == "interrupted":
            argv = ["train", "--resume", str(run)]
        else:
            argv = ["train", "--preset", preset, "--runs-dir", str(folder), "--name", p.name]
            argv += [a for s in p.overrides for a in ("--set", s)]
        todo.append((p, argv))
    log(table(points))
    running: list[tuple[SweepPoint, subprocess.Popen]] = []
    env = dict(os.environ, KILN_QUIET="1")
    if parallel > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    last_table = time.monotonic()
    while todo or running:
        if running and time.monotonic() - last_table >= progress_s:  # a live table: steps of each running point
            for p, _ in running:
                p.done = _logged_step(folder / p.name)
            log(table(points))
            last_table = time.monotonic()
        while todo and len(running) < max(1, parallel):
            p, argv = todo.pop(0)
            p.state = "running"
            running.append(
                (
                    p,
                    subprocess.Popen(
                        [sys.executable, "-m", "kiln", *argv],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
            log(f"started {p.name}")
        time.sleep(0.2)
        for p, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((p, proc))
            err = proc.stderr.read() if proc.stderr else ""
            summary = folder / p.name / "summary.json"
            if proc.returncode == 0 and summary.is_file():
                p.state, p.loss = "finished", json.loads(summary.read_text()).get("val_loss")
            else:
                p.state = "failed"
                last = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "")
                log(f"{p.name} failed (exit {proc.returncode}): {last}")
            log(table(points))
    failed = [p.name for p in points if p.state == "failed"]
    if failed:
        raise ConfigError(
            f"sweep {name}: {len(failed)} point(s) failed ({', '.join(failed)}); run the sweep again to resume them"
        )
    return points


def sweep_runs(runs_dir: Path, name: str) -> list[Path]:
    folder = Path(runs_dir) / name
    return sorted(p for p in folder.iterdir() if (p / "config.toml").is_file()) if folder.is_dir() else []
