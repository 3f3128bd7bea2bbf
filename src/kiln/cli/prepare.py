"""`kiln prepare`: tokenise a corpus into token shards (cached), and verify them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kiln.cli.common import Verbs, config_args, config_from_args, plugin_args, presets_epilog


def add_prepare(verbs: Verbs) -> None:
    prep = verbs.add_parser("prepare", help="tokenise a corpus into token shards (cached)", epilog=presets_epilog())
    config_args(prep)
    prep.add_argument(
        "--verify",
        action="store_true",
        help="hash every shard against the manifest (a run's start checks sizes and ends)",
    )
    plugin_args(prep)


def cmd_prepare(args: argparse.Namespace) -> int:
    from kiln.data.dataset import prepare_data

    cfg = config_from_args(args)
    data = prepare_data(cfg, log=print)
    m = data.manifest
    if m.get("modality") == "image-text":
        print(
            f"dataset {data.path}: vocabulary {data.vocab_size}, {m['train_samples']} + {m['val_samples']} samples "
            f"(train + validation), {m['images']} images, {m['text_tokens']:,} text tokens"
        )
        if args.verify:
            from kiln.data.multimodal.prepare import open_multimodal

            open_multimodal(data.path, verify="full")
            print(f"verified the dataset's {len(m['sha256'])} files against their sha256")
        return 0
    if m.get("mixture"):
        for name, src in m["sources"].items():
            print(
                f"source {name} (weight {src['weight']:g}): {src['path']}, train {src['train_tokens']:,} tokens, "
                f"validation {src['val_tokens']:,} tokens, unigram entropy {src['val_unigram_entropy']:.4f}"
            )
        print(
            f"mixture of {len(m['sources'])} sources: vocabulary {data.vocab_size}, weighted validation unigram "
            f"entropy {m['val_unigram_entropy']:.4f} nats/token"
        )
        if args.verify:
            from kiln.data.shards import open_prepared

            for src in m["sources"].values():
                open_prepared(Path(src["path"]), verify="full")
            print(f"verified the shards of {len(m['sources'])} sources against their sha256")
        return 0
    splits = data.manifest["splits"]
    print(
        f"dataset {data.path}: vocabulary {data.vocab_size}, dtype {data.manifest['dtype']}, "
        f"train {splits['train']['tokens']:,} tokens / {splits['train']['documents']} documents, "
        f"validation {splits['val']['tokens']:,} tokens / {splits['val']['documents']} documents, "
        f"validation unigram entropy {data.manifest['val_unigram_entropy']:.4f} nats/token"
    )
    if args.verify:
        from kiln.data.shards import open_prepared

        t0 = time.perf_counter()
        open_prepared(data.path, verify="full")
        shards = [sh for sp in splits.values() for sh in sp["shards"]]
        print(f"verified {len(shards)} shard(s) against their sha256 in {time.perf_counter() - t0:.1f}s")
    return 0
