"""`kiln prepare` as the corpus grows: time, peak memory, the tokenizer's raw encode rate on the
same text, and the time to open the result (issue 33). Not part of `make test`.

    python bench/data_scale.py --sizes-mb 100,400,1600 [--work DIR] [--json out.json]
    PYTHONPATH=/path/to/other/kiln/src python bench/data_scale.py ...   # the same for another Kiln

Corpora are JSONL built from the installed Python sources (the standard library and
site-packages), each file repeated in variants whose identifiers differ (`def f` -> `def v3_f`,
`self` -> `self3`), so pieces are not identical and the split and the tokenizer see a corpus of
that size. Each `kiln prepare` runs in its own process; peak memory is its resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PREPARE = """
import json, resource, sys, time
t0 = time.perf_counter()
from kiln.config import load_config
from kiln.data.shards import prepare
cfg = load_config(preset="tiny", overrides=sys.argv[1:])
p = prepare(cfg.data, log=lambda *a: None)
seconds = time.perf_counter() - t0
tokens = sum(p.manifest["splits"][s]["tokens"] for s in ("train", "val"))
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": tokens, "path": str(p.path)}))
"""

ENCODE = """
import json, sys, time
from kiln.data.shards import open_prepared
p = open_prepared(__import__("pathlib").Path(sys.argv[1]))
texts, size = [], 0
for line in open(sys.argv[2]):
    texts.append(json.loads(line)["text"]); size += len(texts[-1].encode())
    if size >= int(sys.argv[3]): break
t0 = time.perf_counter()
for i in range(0, len(texts), 256):
    p.tokenizer.encode_batch(texts[i : i + 256])
print(json.dumps({"mb_per_s": size / 2**20 / (time.perf_counter() - t0)}))
t0 = time.perf_counter()
open_prepared(p.path)
print(json.dumps({"open_s": time.perf_counter() - t0}))
"""


def sources() -> list[Path]:
    roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}
    files: list[Path] = []
    for root in sorted(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def build_corpus(path: Path, target_mb: int) -> int:
    """JSONL of about `target_mb` MB; returns the bytes of text written."""
    texts = []
    for f in sources():
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    written, variant = 0, 0
    with open(path, "w") as out:
        while written < target_mb * 2**20:
            for text in texts:
                if variant:
                    text = text.replace("def ", f"def v{variant}_").replace("self", f"self{variant}")
                out.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode())
                if written >= target_mb * 2**20:
                    break
            variant += 1
    return written


def run(code: str, *args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=dict(os.environ, KILN_QUIET="1")
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="100,400,1600")
    ap.add_argument("--work", help="folder for corpora and caches (default: a temporary one)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in (int(x) for x in args.sizes_mb.split(",")):
        corpus = work / f"corpus-{mb}mb.jsonl"
        if not corpus.is_file():
            build_corpus(corpus, mb)
        text_mb = mb
        (result,) = run(
            PREPARE,
            f"data.corpus={corpus}",
            f"data.cache_dir={work / f'cache-{mb}-{os.getpid()}'}",
            f"data.vocab_size={args.vocab}",
            "data.val_fraction=0.05",
        )
        encode, opened = run(ENCODE, result["path"], str(corpus), str(min(mb, 100) * 2**20))
        row = {
            "corpus_mb": text_mb,
            "seconds": round(result["seconds"], 1),
            "mb_per_s": round(text_mb / result["seconds"], 2),
            "raw_encode_mb_per_s": round(encode["mb_per_s"], 2),
            "peak_mb": round(result["peak_mb"]),
            "tokens": result["tokens"],
            "open_s": round(opened["open_s"], 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| corpus | tokens | `kiln prepare` | MB/s | raw encode MB/s | share | peak memory | open |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = r["mb_per_s"] / r["raw_encode_mb_per_s"]
        print(
            f"| {r['corpus_mb']} MB | {r['tokens'] / 1e6:.1f}M | {r['seconds']} s | {r['mb_per_s']} | "
            f"{r['raw_encode_mb_per_s']} | {share:.0%} | {r['peak_mb'] / 1024:.2f} GB | {r['open_s']} s |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
