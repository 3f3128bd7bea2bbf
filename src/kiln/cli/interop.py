"""`kiln export` and `kiln import`: a run's weights out to a safetensors file or a Hugging Face
folder, and a Hugging Face folder in as a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.cli.common import STEP_HELP, Verbs, plugin_args, stderr
from kiln.errors import KilnError


def add_export(verbs: Verbs) -> None:
    export = verbs.add_parser("export", help="a checkpoint as one safetensors file, or as a Hugging Face folder")
    export.add_argument("run", metavar="RUN_DIR")
    export.add_argument("--out", required=True, help="output .safetensors path (--format hf: a new folder)")
    export.add_argument("--step", type=int, help=STEP_HELP)
    export.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors: Kiln's names in one file; hf: a folder AutoModelForCausalLM (or "
        "AutoModelForMaskedLM) and "
        "AutoTokenizer load (Llama, Qwen3, GPT-2 or BERT)",
    )
    export.add_argument("--max-shard-size", default="5GB", help="--format hf: split weights above this (default 5GB)")
    export.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="weight-only quantisation of the blocks' linear layers (torchao); evaluate the file "
        "with kiln eval RUN_DIR --weights FILE",
    )
    plugin_args(export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.quantize:
        from kiln.runs.quantize import export_quantized

        if args.format != "safetensors":
            raise KilnError("kiln export --quantize writes one safetensors file; drop --format hf")
        out, sizes = export_quantized(Path(args.run), Path(args.out), args.step, args.quantize)
        print(
            f"wrote {out}: {sizes['layers']} linear layers in {args.quantize}, weights "
            f"{sizes['weight_bytes'] / 2**20:.2f} MiB (float32: {sizes['full_weight_bytes'] / 2**20:.2f} MiB)"
        )
        return 0
    if args.format == "hf":
        from kiln.interop.convert import export_hf

        out, step = export_hf(Path(args.run), Path(args.out), args.step, args.max_shard_size, warn=stderr)
    else:
        from kiln.runs.export import export_run

        out, step = export_run(Path(args.run), Path(args.out), args.step, warn=stderr)
    print(f"wrote {out} (step {step})")
    return 0


def add_import(verbs: Verbs) -> None:
    imp = verbs.add_parser(
        "import",
        help="make a run from a Hugging Face Llama, Qwen3, GPT-2 or BERT folder",
        description="Make a run from a local Hugging Face folder (safetensors weights and "
        "tokenizer.json); continue pretraining it with `kiln train --resume RUN "
        "--set data.corpus=... --set train.steps=...`.",
    )
    imp.add_argument("folder", metavar="HF_DIR")
    imp.add_argument("--name", required=True, help="the new run's name")
    imp.add_argument("--runs-dir", default="runs", help="folder holding run folders (default: runs)")
    plugin_args(imp)


def cmd_import(args: argparse.Namespace) -> int:
    from kiln.interop.convert import import_hf

    run = import_hf(Path(args.folder), Path(args.runs_dir), args.name)
    print(
        f"made run {run}; continue pretraining it with: kiln train --resume {run} --set data.corpus=... "
        "--set train.steps=..."
    )
    return 0
