"""How large `kiln plan`'s search space is and how long the search takes on this CPU: for each
model and cluster, the layouts enumerated (every one is scored: memory, and time where it fits),
how many fit, the seconds (including the one-off activation measurement on fake tensors), and
the best plan.

    python bench/plan_search.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# Llama-3-8B and Llama-2-70B shapes on the llama-1b preset, at a 4M-token global batch
LLAMA_8B = [
    "model.n_layers=32",
    "model.d_model=4096",
    "model.n_heads=32",
    "model.n_kv_heads=8",
    "model.d_ff=14336",
    "train.batch_tokens=4194304",
]
LLAMA_70B = [
    "model.n_layers=80",
    "model.d_model=8192",
    "model.n_heads=64",
    "model.n_kv_heads=8",
    "model.d_ff=28672",
    "train.batch_tokens=4194304",
]
CASES = [
    ("gpt2-124m", [], "h100:64"),
    ("llama-1b", [], "h100:512"),
    ("llama-8b shape", LLAMA_8B, "h100:256"),
    ("llama-8b shape", LLAMA_8B, "h100:1024"),
    ("llama-70b shape", LLAMA_70B, "h100:1024"),
    ("llama-70b shape", LLAMA_70B, "h100:2048"),
]


def main() -> None:
    from kiln.config import load_config
    from kiln.plan.cluster import load_cluster
    from kiln.plan.search import search

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, sets, cluster in CASES:
        cfg = load_config("gpt2-124m" if name == "gpt2-124m" else "llama-1b", overrides=sets)
        t0 = time.perf_counter()
        result = search(cfg, cfg.data.vocab_size, load_cluster(cluster), "bf16")
        seconds = time.perf_counter() - t0
        best = result.plans[0] if result.plans else None
        rows.append(
            {
                "model": name,
                "cluster": cluster,
                "global_batch": cfg.global_batch,
                "examined": result.examined,
                "fit": len(result.plans),
                "seconds": seconds,
                "search_seconds": result.seconds,
                "best": best.layout.describe() if best else None,
                "tokens_per_s": best.tokens_per_s if best else 0.0,
            }
        )
        print(
            f"{name:<16} {cluster:<10} batch {cfg.global_batch:5d}: {result.examined:8,} layouts, "
            f"{len(result.plans):7,} fit, {seconds:5.1f} s; best {rows[-1]['best']} "
            f"({rows[-1]['tokens_per_s']:,.0f} tokens/s)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
