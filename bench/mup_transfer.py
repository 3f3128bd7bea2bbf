"""µP against the standard parametrisation (kiln.model.mup), in two measurements.

1. Coordinate check (Yang et al. 2021, "Tensor Programs V", Fig. 5): tiny-preset decoders (2
   layers, 4 heads, seq 64, vocab 4096, tied embeddings as the preset) of widths 64..512, µP's base
   width 64, each trained 5 AdamW steps (lr 1e-2, no weight decay, fp32) on one fixed batch of random
   tokens (a seeded generator, so every width sees the same batch). Forward hooks on each block of
   `model.layers` and the logits record the RMS of (activation at step t - activation at step 0),
   measured on that batch after every step and averaged over seeds. Standard: the change grows with
   width; µP: it stays flat. Plot (log-log, one line per block/logits, standard | µP) ->
   OUT/coord_check.png, numbers -> OUT/coord_check.json, the logits' change at the last step printed.
2. LR transfer: `kiln train --preset tiny` (stdlib corpus) at widths 128, 256, 512 (µP base width
   128, so m = 1, 2, 4), standard and µP, AdamW peak LR 2^k x 1e-3 for k = -2..3, seq 128, batch 16,
   `--steps` steps (150) with 15 of warmup, the preset's cosine schedule, weight decay 0.1 and clip 1.0;
   the guard is off so that a too-high LR shows as such. Each run is its own subprocess, one after
   another; the final val_loss (RUN/eval.jsonl) is recorded, a run whose loss is NaN or > 8 counts as
   diverged. Reported: the best LR per parametrisation and width, the table of all losses (markdown),
   and how far the best LR moves across widths (max / min) -> OUT/transfer.json.

    python bench/mup_transfer.py [--quick] [--part coord|transfer|both] [--steps N] [--out DIR]

--quick: 3 LRs, widths 128 and 256, 60 steps (and one seed for the coordinate check): a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kiln.config import load_config
from kiln.model import mup
from kiln.model.registry import build_model, initialise
from kiln.train.optim import build_optimizer

PARAMS = ("standard", "mup")
VOCAB = 4096
DIVERGED = 8.0  # a loss above this (or NaN) is a diverged run


# ---------------------------------------------------------------- 1. coordinate check
def coord_run(width: int, parametrization: str, seed: int, steps: int = 5, batch: int = 8, seq: int = 64) -> dict:
    """RMS of each block's output and of the logits at step 0, and of their change after each step."""
    cfg = load_config(
        "tiny",
        overrides=[
            f"model.d_model={width}",
            "model.n_heads=4",
            "model.n_layers=2",
            f"model.seq_len={seq}",
            f"model.parametrization={parametrization}",
            "model.mup_base_width=64",
            "optim.lr=1e-2",
            "optim.weight_decay=0",
        ],
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model, VOCAB)
    initialise(model, cfg.model, seed=seed)
    width_mult = mup.width_mult(cfg.model) if mup.is_mup(cfg.model) else None
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), width_mult=width_mult)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(1234))
    names = [f"block {i}" for i in range(len(model.layers))] + ["logits"]
    acts: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inputs, out):
            acts[name] = (out[0] if isinstance(out, tuple) else out).detach().float()

        return record

    for i, block in enumerate(model.layers.values()):  # the model is dropped after the run: no removal needed
        block.register_forward_hook(hook(f"block {i}"))

    def measure() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            acts["logits"] = model(tokens[:, :-1]).float()
        return dict(acts)

    start = measure()
    out = {"rms": {n: start[n].pow(2).mean().sqrt().item() for n in names}, "delta": {n: [] for n in names}}
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = measure()
        for n in names:
            out["delta"][n].append((now[n] - start[n]).pow(2).mean().sqrt().item())
    return out


def coord_check(out_dir: Path, seeds: int) -> dict:
    widths = [64, 128, 256, 512]
    results: dict = {p: {} for p in PARAMS}
    for p in PARAMS:
        for w in widths:
            runs = [coord_run(w, p, seed) for seed in range(seeds)]
            avg = lambda xs: sum(xs) / len(xs)  # noqa: E731
            results[p][w] = {
                "rms": {n: avg([r["rms"][n] for r in runs]) for n in runs[0]["rms"]},
                "delta": {n: [avg(v) for v in zip(*(r["delta"][n] for r in runs))] for n in runs[0]["delta"]},
            }
    (out_dir / "coord_check.json").write_text(json.dumps({"seeds": seeds, "widths": widths, **results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, p in zip(axes, PARAMS):
        for n in results[p][widths[0]]["delta"]:
            ax.plot(widths, [results[p][w]["delta"][n][-1] for w in widths], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width (d_model)")
        ax.set_title(f"{'µP (base width 64)' if p == 'mup' else 'standard'}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMS of (x_t - x_0) after 5 AdamW steps, lr 1e-2")
    axes[1].legend()
    fig.suptitle("Coordinate check: change of each block's output and of the logits vs width")
    fig.tight_layout()
    fig.savefig(out_dir / "coord_check.png", dpi=120)

    print(f"\nCoordinate check ({seeds} seed(s)): RMS of the logits' change after step 5, and its ratio to width 64")
    print("| width | standard | ratio | µP | ratio |\n|---:|---:|---:|---:|---:|")
    for w in widths:
        s, m = (results[p][w]["delta"]["logits"][-1] for p in PARAMS)
        s0, m0 = (results[p][widths[0]]["delta"]["logits"][-1] for p in PARAMS)
        print(f"| {w} | {s:.4f} | {s / s0:.2f} | {m:.4f} | {m / m0:.2f} |")
    print(f"plot: {out_dir / 'coord_check.png'}", flush=True)
    return results


# ---------------------------------------------------------------- 2. LR transfer
def train_run(width: int, parametrization: str, lr: float, steps: int, runs_dir: Path) -> dict:
    name = f"{parametrization}-w{width}-lr{lr:g}"
    sets = [
        f"model.d_model={width}",
        "model.n_heads=4",
        "model.seq_len=128",
        f"model.parametrization={parametrization}",
        "model.mup_base_width=128",
        f"optim.lr={lr}",
        "train.batch_size=16",
        f"train.steps={steps}",
        "train.time_budget_s=0",
        "schedule.warmup_steps=15",
        f"eval.every={steps}",
        "eval.batches=8",
        "checkpoint.every=0",
        "log.plot=false",
        'callbacks.disabled=["samples"]',
        "guard.enabled=false",
    ]
    cmd = [sys.executable, "-m", "kiln", "train", "--preset", "tiny", "--runs-dir", str(runs_dir), "--name", name]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, KILN_QUIET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    evals = runs_dir / name / "eval.jsonl"
    lines = evals.read_text().splitlines() if evals.exists() else []
    val = json.loads(lines[-1])["val_loss"] if lines else float("nan")
    val = float("nan") if val is None else float(val)
    out = {"width": width, "parametrization": parametrization, "lr": lr, "val_loss": val}
    out["diverged"] = not math.isfinite(val) or val > DIVERGED
    if proc.returncode:
        out["error"] = proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else f"rc {proc.returncode}"
    return out


def lr_transfer(out_dir: Path, widths: list[int], lrs: list[float], steps: int) -> dict:
    plan = [(w, p, lr) for w in widths for p in PARAMS for lr in lrs]
    runs, seconds, t0 = [], {}, time.time()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for i, (w, p, lr) in enumerate(plan, 1):
            t = time.time()
            r = train_run(w, p, lr, steps, Path(tmp))
            r["seconds"] = round(time.time() - t, 1)
            runs.append(r)
            seconds.setdefault(w, []).append(r["seconds"])
            last = max(seconds)  # a width not run yet: the widest one seen, 2x per doubling
            per = {x: sum(seconds[x]) / len(seconds[x]) if x in seconds else 0 for x in widths}
            per |= {x: per[last] * x / last for x in widths if x not in seconds}
            eta = sum(per[x] for x, _, _ in plan[i:])
            flag = (" DIVERGED" if r["diverged"] else "") + (f" ({r['error']})" if "error" in r else "")
            print(
                f"run {i}/{len(plan)} {p:<8} w{w:<4} lr {lr:<8g} val {r['val_loss']:.4f}{flag}  "
                f"{r['seconds']:.0f}s  elapsed {time.time() - t0:.0f}s  ETA {eta:.0f}s",
                flush=True,
            )
    best: dict = {p: {} for p in PARAMS}
    for p in PARAMS:
        for w in widths:
            ok = [r for r in runs if r["parametrization"] == p and r["width"] == w and not r["diverged"]]
            b = min(ok, key=lambda r: r["val_loss"]) if ok else None
            best[p][w] = {"lr": b["lr"], "val_loss": b["val_loss"]} if b else None
    moves = {}
    for p in PARAMS:
        got = [b["lr"] for b in best[p].values() if b]
        moves[p] = max(got) / min(got) if got else None
    result = {"steps": steps, "widths": widths, "lrs": lrs, "runs": runs, "best": best, "moves": moves}
    result["seconds"] = round(time.time() - t0, 1)
    (out_dir / "transfer.json").write_text(json.dumps(result, indent=1))

    print(f"\nLR transfer: final val_loss after {steps} steps (tiny preset, stdlib; bold: best per row, div: diverged)")
    print("| param | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best LR |")
    print("|---|---:|" + "---:|" * (len(lrs) + 1))
    for p in PARAMS:
        for w in widths:
            b = best[p][w]
            cells = []
            for lr in lrs:
                r = next(r for r in runs if r["parametrization"] == p and r["width"] == w and r["lr"] == lr)
                cell = "div" if r["diverged"] else f"{r['val_loss']:.4f}"
                cells.append(f"**{cell}**" if b and b["lr"] == lr else cell)
            best_s = f"{b['lr']:g} ({b['val_loss']:.4f})" if b else "-"
            print(f"| {p} | {w} | " + " | ".join(cells) + f" | {best_s} |")
    for p in PARAMS:
        m = moves[p]
        print(f"{p}: best LR moves by {m:g}x across widths" if m else f"{p}: every run diverged")
    print(f"LR transfer took {result['seconds']:.0f}s; {out_dir / 'transfer.json'}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 LRs, widths 128 and 256, 60 steps, 1 coord-check seed")
    ap.add_argument("--part", choices=["coord", "transfer", "both"], default="both")
    ap.add_argument("--steps", type=int, help="training steps per LR-transfer run (default 150, --quick 60)")
    ap.add_argument("--seeds", type=int, help="coordinate-check seeds averaged (default 3, --quick 1)")
    ap.add_argument("--out", default="/tmp/mup_bench")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.time()
    if args.part in ("coord", "both"):
        coord_check(out_dir, args.seeds or (1 if args.quick else 3))
    if args.part in ("transfer", "both"):
        ks = [-1, 1, 3] if args.quick else [-2, -1, 0, 1, 2, 3]
        widths = [128, 256] if args.quick else [128, 256, 512]
        lr_transfer(out_dir, widths, [2.0**k * 1e-3 for k in ks], args.steps or (60 if args.quick else 150))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
