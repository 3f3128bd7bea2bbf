"""CPU time-to-loss against nanoGPT (issue 36): nanoGPT's documented CPU recipe (its README's baby
GPT: 4 layers, 4 heads, width 128, context 64, batch 12, 2,000 iterations, dropout 0, no compile)
and Kiln's `tiny-fast` preset with a time budget of a fraction of nanoGPT's wall time, side by side
on the same machine in the same run, trained on the same text and scored on the same held-out text
in bits per character. Not part of `make test`.

    python bench/time_to_loss.py --nanogpt /path/to/nanoGPT [--fraction 0.25] [--work DIR] [--json out.json]

The text: the docstrings of the standard library's modules (ASCII only, in a fixed order, ~1 MB),
split 90/10 by position. nanoGPT trains character-level on the first 90% (its `prepare.py` format,
written here) and reports its own `estimate_loss` on the held-out 10% (20 random batches, as its
README's figure); its final checkpoint is also scored on every character of the held-out text in
non-overlapping windows of its context. Kiln trains `tiny-fast` on the first 90%
(`data.corpus=train.txt`) for `train.time_budget_s` = fraction x nanoGPT's wall time, and
`kiln eval RUN --suite lm -o lm.text=val.txt` scores every token of the held-out text once:
`lm/bits_per_byte`, which on ASCII text is bits per character. nanoGPT's code runs from the checkout
you name (the commit is printed); none of it is part of Kiln.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pickle
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

NANOGPT_ARGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]

SCORE_NANOGPT = """
import math, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig
ckpt = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
ids = torch.from_numpy(np.fromfile(sys.argv[3], dtype=np.uint16).astype(np.int64))
T, nats, n = ckpt["model_args"]["block_size"], 0.0, 0
with torch.no_grad():
    for start in range(0, len(ids) - 1, T):
        x, y = ids[start : start + T][None], ids[start + 1 : start + T + 1][None]
        x = x[:, : y.shape[1]]
        logits, _ = model(x, y)
        nats += torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
        n += y.shape[1]
print(nats / n / math.log(2))
"""


def build_text(target_bytes: int = 1_000_000) -> str:
    """The standard library's module docstrings, ASCII only, sorted by file, up to `target_bytes`."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(lib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.isascii() and len(doc) > 200:
                    parts.append(doc.strip() + "\n\n")
                    size += len(parts[-1])
        if size >= target_bytes:
            break
    return "".join(parts)[:target_bytes]


def nanogpt_data(text: str, train: str, val: str, folder: Path) -> Path:
    """nanoGPT's character-level format (data/<name>/{train,val}.bin as uint16, meta.pkl)."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{name}.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return folder


def run_nanogpt(checkout: Path, work: Path) -> dict:
    """nanoGPT's CPU recipe in a folder of links to its code and our data; wall time and val loss."""
    home = work / "nanogpt"
    for name in ("train.py", "model.py", "configurator.py", "config"):
        target = home / name
        if not target.exists():
            target.symlink_to(checkout / name)
    out = work / "nanogpt-out"
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, "--dataset=char", f"--out_dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"nanoGPT failed:\n{proc.stderr[-3000:]}")
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", proc.stdout)
    step, _, val = evals[-1]
    scored = subprocess.run(
        [sys.executable, "-c", SCORE_NANOGPT, str(checkout), str(out / "ckpt.pt"), str(home / "data/char/val.bin")],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        "wall_s": wall,
        "step": int(step),
        "val_loss": float(val),
        "bits_per_char": float(val) / math.log(2),
        "bits_per_char_full_text": float(scored.stdout.strip().splitlines()[-1]),
    }


def run_kiln(work: Path, budget: float, preset: str, extra: list[str]) -> dict:
    """`kiln train --preset PRESET` on train.txt for `budget` seconds of steps, then `kiln eval` of
    every token of val.txt; wall time of the training command (preparation included)."""
    runs, name = work / "runs", f"ttl-{int(time.time())}"
    env = dict(os.environ, KILN_QUIET="1")
    sets = [f"data.corpus={work / 'train.txt'}", f"data.cache_dir={work / 'cache'}"]
    sets.append(f"train.time_budget_s={budget:.1f}")
    args = [a for s in [*sets, *extra] for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "kiln", "train", "--preset", preset, "--runs-dir", str(runs), "--name", name, *args],
        env=env,
        check=True,
    )
    wall = time.perf_counter() - t0
    subprocess.run(
        [sys.executable, "-m", "kiln", "eval", str(runs / name), "--suite", "lm", "-o", f"lm.text={work / 'val.txt'}"],
        env=env,
        check=True,
        capture_output=True,
    )
    report = json.loads(sorted((runs / name / "eval").glob("step-*.json"))[-1].read_text())
    summary = json.loads((runs / name / "summary.json").read_text())
    lm = report["suites"]["lm"]
    return {
        "wall_s": wall,
        "budget_s": budget,
        "steps": summary.get("steps"),
        "bits_per_char": lm["bits_per_byte"],
        "run": str(runs / name),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (git clone of karpathy/nanoGPT)")
    ap.add_argument("--fraction", type=float, default=0.25, help="Kiln's budget as a share of nanoGPT's wall time")
    ap.add_argument("--preset", default="tiny-fast")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more --set for Kiln's run")
    ap.add_argument("--work", type=Path, help="folder for the texts, data and runs (default: a temporary one)")
    ap.add_argument("--nanogpt-result", type=Path, help="reuse nanoGPT's figures from an earlier --json")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ttl-"))
    work.mkdir(parents=True, exist_ok=True)
    text = build_text()
    cut = int(len(text) * 0.9)
    (work / "train.txt").write_text(text[:cut])
    (work / "val.txt").write_text(text[cut:])
    nanogpt_data(text, text[:cut], text[cut:], work / "nanogpt" / "data" / "char")
    commit = subprocess.run(["git", "-C", str(args.nanogpt), "rev-parse", "HEAD"], capture_output=True, text=True)
    print(f"text: {len(text):,} characters ({cut:,} train); nanoGPT at {commit.stdout.strip() or 'unknown commit'}")
    if args.nanogpt_result:
        nano = json.loads(args.nanogpt_result.read_text())["nanogpt"]
    else:
        nano = run_nanogpt(args.nanogpt.resolve(), work)
    print(f"nanoGPT: {nano['wall_s']:.0f} s, {nano['bits_per_char']:.3f} bits/char (its estimate), "
          f"{nano['bits_per_char_full_text']:.3f} on the whole held-out text")  # fmt: skip
    kiln = run_kiln(work, args.fraction * nano["wall_s"], args.preset, args.extra)
    print("| | budget s | wall s | held-out bits/char | wall vs nanoGPT |")
    print("|---|---|---|---|---|")
    print(f"| nanoGPT (CPU recipe) | - | {nano['wall_s']:.0f} | {nano['bits_per_char']:.3f} "
          f"({nano['bits_per_char_full_text']:.3f} whole text) | 1.00x |")  # fmt: skip
    print(f"| Kiln {args.preset} | {kiln['budget_s']:.0f} | {kiln['wall_s']:.0f} | {kiln['bits_per_char']:.3f} "
          f"| {kiln['wall_s'] / nano['wall_s']:.2f}x |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"nanogpt": nano, "kiln": kiln, "fraction": args.fraction}, indent=1))


if __name__ == "__main__":
    main()
