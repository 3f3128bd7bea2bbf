"""The image-text loader's throughput and packing efficiency, with 0, 1 and 2 worker processes.

Two datasets:
- `digits`: the vlm-tiny demo's data (8x8 grey PNGs, 16 patches an image, 256-position windows);
- `photos`: a WebDataset tar written here of 1,600 JPEGs (320x256 RGB, smooth random images) with
  captions, a fifth of the samples interleaved documents with two images; decoded, resized and
  centre-cropped to 224x224 and cut into 16x16 patches (196 an image), 2048-position windows.

Samples/s counts the samples in the windows the loader delivered (every one decoded, resized,
patchified and packed), timed from the first batch to the last; `--steps` batches of
`--batch` windows each.

    python bench/mm_loader.py [--steps 40] [--batch 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln.config import load_config
from kiln.data.multimodal.loader import DOC, ImageLayout, MultimodalSampler, SplitStream
from kiln.data.multimodal.prepare import prepare_multimodal


def write_photos(path: Path, n: int = 1600, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = "a red boat on the lake at dawn with two birds near green trees under grey sky".split()

    def jpeg() -> bytes:
        small = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)  # upsampled: smooth like a photo
        buf = io.BytesIO()
        Image.fromarray(small).resize((320, 256), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def caption() -> bytes:
        return " ".join(rng.choice(words, size=int(rng.integers(8, 30)))).encode()

    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(n):
            key = f"{i:06d}"
            if i % 5 == 4:
                doc = {
                    "segments": [
                        {"text": caption().decode()},
                        {"image": "0.jpg"},
                        {"text": caption().decode()},
                        {"image": "1.jpg"},
                        {"text": caption().decode()},
                    ]
                }
                add(f"{key}.json", json.dumps(doc).encode())
                add(f"{key}.0.jpg", jpeg())
                add(f"{key}.1.jpg", jpeg())
            else:
                add(f"{key}.jpg", jpeg())
                add(f"{key}.txt", caption())
    return path


def measure(cfg, data, workers: int, steps: int, batch: int) -> dict:
    stream = SplitStream(data, "train", ImageLayout.from_config(cfg), cfg.model.seq_len, cfg.train.seed)
    sampler = MultimodalSampler(stream, batch, workers=workers)
    try:
        first = sampler.batch(0)  # worker start-up is not throughput
        start = time.perf_counter()
        samples = 0
        for step in range(1, steps + 1):
            windows = sampler.batch(step)
            samples += sum(len(set(w[:, DOC].tolist()) - {-1}) for w in windows)
        seconds = time.perf_counter() - start
    finally:
        sampler.close()
    return {
        "workers": workers,
        "samples_per_s": samples / seconds,
        "windows_per_s": steps * batch / seconds,
        "window_shape": list(first.shape[1:]),
        "packing_efficiency": stream.packing_efficiency(0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tar = write_photos(Path(tmp) / "photos.tar")
        datasets = {
            "digits": ["data.corpus=digits"],
            "photos": [
                f"data.corpus={tar}",
                "model.image_size=224",
                "model.patch_size=16",
                "model.image_channels=3",
                "model.seq_len=2048",
                "data.vocab_size=300",
            ],
        }
        for name, sets in datasets.items():
            cfg = load_config(preset="vlm-tiny", overrides=[f"data.cache_dir={tmp}/cache", *sets])
            data = prepare_multimodal(cfg.data, log=lambda s: None)
            for workers in (0, 1, 2):
                r = {"dataset": name, **measure(cfg, data, workers, args.steps, args.batch)}
                results.append(r)
                print(
                    f"{name:7s} workers {workers}: {r['samples_per_s']:8.0f} samples/s  "
                    f"{r['windows_per_s']:7.1f} windows/s  packing {r['packing_efficiency']:.1%}  "
                    f"window {r['window_shape']}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
