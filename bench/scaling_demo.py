"""A real scaling-law check on CPU (`make scaling-demo`): an IsoFLOP sweep of tiny decoders on
the standard library + the torch wheel's Python sources (so the 16M-token held-out run reads each
token once), a fit, a prediction of that larger held-out run's final validation loss, and the run.

The sweep's total compute is kept under 10% of the held-out run's, in the MFU's FLOP accounting
(the family's FLOPs per token x tokens, output layer included; 6 N D with non-embedding N is
printed beside it).
Writes bench/results/scaling/{fit.json, fit.png, result.json} and prints predicted vs actual.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "model.seq_len=64",
    "train.batch_size=8",
    "data.vocab_size=2048",
    "train.precision=fp32",
    "eval.every=0",
    "eval.batches=128",
    "checkpoint.every=0",
    "log.plot=false",
    "guard.hang_min_s=0",
    "eval.sample_tokens=4",
]
# Ladder E (BENCHMARKS, "Scaling laws"): the held-out run's depth (Kaplan et al. found shallower models
# off the trend) and widths small enough that every point trains >= 957 steps, past the steep early part
# of loss against tokens that ladders of larger, shorter runs were fitted to.
SHAPES = [(4, 16, 1), (4, 24, 1), (4, 32, 2), (4, 48, 3)]
BUDGET_DIVISORS = (55, 165)  # 4 sizes each: 9.7% of the held-out run's compute in all
HELD_OUT = (4, 128, 4)
# The standard library alone (3.4M tokens at this vocabulary) would make the held-out run repeat data;
# the pinned torch wheel's Python sources add ~15M tokens that every install has.
_SITE = Path(sysconfig.get_paths()["purelib"])
DEFAULT_CORPUS = f"stdlib,{_SITE / 'torch'}"


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from kiln.config import load_config
    from kiln.errors import ConfigError
    from kiln.runs.rundir import RunDir
    from kiln.scaling.backtest import backtest, describe_backtest
    from kiln.scaling.flops import flops_per_token
    from kiln.scaling.law import fit
    from kiln.scaling.points import non_embedding_params, points_from_runs
    from kiln.scaling.report import describe, plot
    from kiln.scaling.sweep import run_sweep, width_lr

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling"))
    ap.add_argument(
        "--held-out",
        default="x".join(str(v) for v in HELD_OUT),
        help="the held-out run's shape as LAYERSxWIDTHxHEADS (the sweep's budgets are shares of its compute)",
    )
    ap.add_argument("--held-out-tokens", type=float, default=16e6)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument(
        "--shapes",
        default=",".join(f"{a}x{b}x{c}" for a, b, c in SHAPES),
        help="the sweep's sizes as LAYERSxWIDTHxHEADS, comma-separated",
    )
    ap.add_argument(
        "--budgets",
        default=",".join(str(d) for d in BUDGET_DIVISORS),
        help="each IsoFLOP budget as a divisor of the held-out run's compute, comma-separated",
    )
    ap.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help="data.corpus for every run; the default is large enough that the held-out run sees "
        "each token once (a law fitted on one-epoch points says nothing about repeated data)",
    )
    ap.add_argument(
        "--lr-rule",
        choices=("constant", "width"),
        default="constant",
        help="the sweep's per-size LR rule, applied to the held-out run too",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the sweep's train.seed (init and data order): ladders with other seeds measure how far "
        "the prediction moves with run-to-run noise; the held-out run keeps seed 0",
    )
    ap.add_argument("--cache", help="the token-shard cache (default: OUT/cache); experiments can share one")
    args = ap.parse_args()
    shapes_given = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    divisors = [float(d) for d in args.budgets.split(",")]
    held = tuple(int(v) for v in args.held_out.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    sets = COMMON + [f"data.corpus={args.corpus}", f"data.cache_dir={args.cache or out / 'cache'}"]
    # The seed and the LR rule name the sweep's runs, so that one --out can hold several experiments
    # (finished points are skipped by name, and the fit reads only this sweep's points).
    rule = "-lr-width" if args.lr_rule == "width" else ""
    sweep_name = "iso" + rule
    held_sets = sets + [f"model.n_layers={held[0]}", f"model.d_model={held[1]}", f"model.n_heads={held[2]}"]
    if args.lr_rule == "width":
        held_sets.append(f"optim.lr={width_lr(load_config('tiny', overrides=sets), held[1]):.6g}")
    held_cfg = load_config("tiny", overrides=held_sets)
    vocab = 2048
    n_held = non_embedding_params(held_cfg.model, vocab)
    per_step = 8 * 64
    d_held = int(args.held_out_tokens // per_step * per_step)
    c_held = 6.0 * n_held * d_held
    held_mfu_c = flops_per_token(held_cfg.model, vocab) * d_held
    budgets = [held_mfu_c / d for d in divisors]
    shapes = ", ".join(f"{{n_layers = {a}, d_model = {b}, n_heads = {c}}}" for a, b, c in shapes_given)
    sweep = out / "sweep.toml"
    sweep.write_text(
        f'name = "{sweep_name}"\npreset = "tiny"\nset = {json.dumps(sets)}\nshapes = [{shapes}]\n'
        f"seeds = [{args.seed}]\n"
        f'flops = {json.dumps(budgets)}\nwarmup_fraction = 0.05\nlr_rule = "{args.lr_rule}"\n'
    )
    t0 = time.perf_counter()
    points = run_sweep(sweep, runs, parallel=args.parallel)
    sweep_s = time.perf_counter() - t0
    fitted = points_from_runs([runs / sweep_name / p.name for p in points])
    law = fit(fitted)
    print(describe(law))
    try:  # the ladder's own check of extrapolation, before the held-out run is paid for
        check = backtest(fitted)
        print(describe_backtest(check))
    except ConfigError as e:
        check = {"skipped": str(e)}
        print(e)
    (out / "fit.json").write_text(json.dumps({**law.to_json(), "backtest": check}, indent=1))
    predicted = law.loss(n_held, d_held)
    lo, hi = law.interval(n_held, d_held)
    sweep_c = sum(6.0 * p.params * p.tokens for p in fitted)
    sweep_mfu_c = sum(p.flops for p in fitted)
    print(
        f"sweep: {len(points)} runs, {sweep_mfu_c:.3g} FLOPs = {sweep_mfu_c / held_mfu_c:.1%} of the held-out "
        f"run's {held_mfu_c:.3g} (6ND: {sweep_c / c_held:.1%}); {sweep_s:.0f} s"
    )
    print(f"held-out L{held[0]}-d{held[1]}: N = {n_held}, D = {d_held}: predicted {predicted:.4f} [{lo:.4f}, {hi:.4f}]")
    # Named by shape and tokens: a second --held-out in the same --out must not read the first one's loss.
    name = f"held-out-L{held[0]}-d{held[1]}-h{held[2]}-T{d_held}{rule}"
    if not (runs / name / "summary.json").is_file():
        t1 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "kiln",
            "train",
            "--preset",
            "tiny",
            "--runs-dir",
            str(runs),
            "--name",
            name,
            *[
                a
                for s in held_sets
                + [
                    f"train.tokens={d_held}",
                    "train.time_budget_s=0",
                    f"schedule.warmup_steps={max(1, int(0.05 * d_held / per_step))}",
                ]
                for a in ("--set", s)
            ],
        ]
        if (runs / name).is_dir():
            cmd = [sys.executable, "-m", "kiln", "train", "--resume", str(runs / name)]
        subprocess.run(cmd, check=True)
        held_s = time.perf_counter() - t1
    else:
        held_s = float("nan")
    actual = RunDir(runs / name).summary()["val_loss"]
    error = predicted / actual - 1
    print(f"held-out actual {actual:.4f}: predicted {predicted:.4f}, error {error:+.2%} ({held_s:.0f} s)")
    plot(law, fitted, out / "fit.png")
    (out / "result.json").write_text(
        json.dumps(
            {
                "predicted": predicted,
                "interval": [lo, hi],
                "actual": actual,
                "relative_error": error,
                "held_out": {
                    "n_layers": held[0],
                    "d_model": held[1],
                    "n_heads": held[2],
                    "params": n_held,
                    "tokens": d_held,
                    "compute": held_mfu_c,
                    "compute_6nd": c_held,
                    "seconds": held_s,
                },
                "sweep": {
                    "runs": len(points),
                    "compute": sweep_mfu_c,
                    "share": sweep_mfu_c / held_mfu_c,
                    "compute_6nd": sweep_c,
                    "share_6nd": sweep_c / c_held,
                    "seconds": sweep_s,
                },
                "fit": law.to_json(),
                "backtest": check,
            },
            indent=1,
        )
    )
    print(f"wrote {out / 'result.json'} and {out / 'fit.png'}")


if __name__ == "__main__":
    main()
