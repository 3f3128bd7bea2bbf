"""`kiln <verb>`: each verb is a thin call into the module that does the work."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kiln.config import Config, load_config, preset_names
from kiln.errors import KilnError

STEP_HELP = (
    "checkpoint step (default: the newest valid one, or 0 for a run with none, such as an import; "
    "0 without a step-0 checkpoint = the weights training starts from)"
)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a shipped preset (see `kiln train --help`)")
    p.add_argument(
        "--config", help="a TOML config file of your own (over --preset when both are given; --set goes over both)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable (e.g. --set train.steps=200)",
    )


def _plugin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py|MODULE",
        help="import user code that registers callbacks, suites, corpora, model families or objectives; "
        "repeatable (also KILN_PLUGINS=a.py,module)",
    )


def _presets_epilog() -> str:
    return "presets: " + ", ".join(preset_names())


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end in one line (what is wrong and where to look), exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kiln",
        description="Pretrain language models, from raw text to an evaluated model.",
        epilog=_presets_epilog(),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)

    train = verbs.add_parser(
        "train",
        help="train a model (prepares data first if needed)",
        description="Train a model. Data is prepared implicitly when its shards are missing.",
        epilog=_presets_epilog(),
    )
    _config_args(train)
    train.add_argument("--name", help="run name (default: <preset>-<date>-<time>)")
    train.add_argument("--runs-dir", default="runs", help="folder holding run folders (default: runs)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest valid checkpoint"
    )
    train.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        metavar="N",
        help="start N processes on this machine through torchrun (same as `torchrun "
        "--standalone --nproc_per_node N -m kiln train ...`)",
    )
    train.add_argument(
        "--list-callbacks",
        action="store_true",
        help="list the registered callbacks and their options ([callbacks] enabled = [...])",
    )

    prep = verbs.add_parser("prepare", help="tokenise a corpus into token shards (cached)", epilog=_presets_epilog())
    _config_args(prep)
    prep.add_argument(
        "--verify",
        action="store_true",
        help="hash every shard against the manifest (a run's start checks sizes and ends)",
    )

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

    plan = verbs.add_parser(
        "plan",
        help="propose parallel layouts for a cluster: predicted tokens/s and memory",
        description="Search dp_replicate x dp_shard x tp x pp, micro-batching, activation "
        "checkpointing and pipeline schedules for a model on a cluster; print "
        "the best plans and the --set lines that run them.",
        epilog="--cluster: a cluster TOML (see kiln.plan.cluster), DEVICE:N (e.g. h100:16; "
        "devices: h100 h100-pcie h200 b200 a100 a100-40gb l40s l4 a10g mi300x) or local:N",
    )
    plan.add_argument(
        "action",
        nargs="?",
        choices=["profile"],
        help="profile: measure this machine for --cluster local:N (compute per micro-batch, gloo "
        "collectives) and cache it; then plan without it",
    )
    _config_args(plan)
    plan.add_argument("--cluster", required=True, help="cluster file, DEVICE:N or local:N")
    plan.add_argument("--top", type=int, default=5, help="plans to print (default 5)")
    plan.add_argument("--explain", action="store_true", help="why the best wins; why the other families lost")
    plan.add_argument("--json", metavar="OUT", help='write {"plans": [...]} here, best first')

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

    sample = verbs.add_parser("sample", help="generate text from a run's checkpoint")
    sample.add_argument("run", metavar="RUN_DIR")
    sample.add_argument("--prompt", action="append", default=[], help="prompt text; repeatable")
    sample.add_argument("--max-tokens", type=int, default=100)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=50)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--step", type=int, help=STEP_HELP)

    ev = verbs.add_parser(
        "eval",
        help="run evaluation suites on a run's checkpoint",
        description="Run evaluation suites on a checkpoint; writes RUN_DIR/eval/step-N.json.",
        epilog="built-in suites: lm, continuation, choice, bias, toxicity, memorisation; "
        "`kiln eval --list` shows every registered suite and its options",
    )
    ev.add_argument("run", metavar="RUN_DIR", nargs="?")
    ev.add_argument(
        "--step",
        type=int,
        help=STEP_HELP,
    )
    ev.add_argument(
        "--suite",
        dest="suites",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="suites to run (default: all registered)",
    )
    ev.add_argument(
        "--suite-file",
        dest="plugin",
        action="append",
        default=[],
        metavar="PATH",
        help="the same as --plugin (a .py file registering suites with @register_suite)",
    )
    ev.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="SUITE.KEY=VALUE",
        help="a suite option, e.g. -o choice.tasks=hellaswag.jsonl -o bias.pairs=crows_pairs.csv",
    )
    ev.add_argument("--list", action="store_true", help="list the registered suites and their options")
    ev.add_argument(
        "--weights",
        metavar="FILE",
        help="a quantised export of this run (kiln export --quantize): "
        "evaluate it, and report its perplexity change against the checkpoint it came from",
    )
    runs = verbs.add_parser(
        "runs",
        help="list the runs in a folder: status, steps, validation loss, lineage",
        description="A table of the runs under DIR (default: runs).",
    )
    runs.add_argument("dir", metavar="DIR", nargs="?", default="runs")
    runs.add_argument("--tree", action="store_true", help="draw the family tree of forks")
    runs.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    compare = verbs.add_parser(
        "compare",
        help="compare runs: config differences, headline figures, curves",
        description="Compare runs: the config keys that differ, headline figures side by "
        "side, and DIR/compare.png + DIR/compare.md.",
    )
    compare.add_argument("runs", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--out", default=".", metavar="DIR", help="where compare.png and compare.md go (default: .)")
    compare.add_argument(
        "--metric",
        dest="metrics",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="plot these metrics (metrics.jsonl or eval.jsonl keys) instead of the losses; "
        "--metric loss lr, or repeated",
    )

    fork = verbs.add_parser(
        "fork",
        help="start a new attempt from a run's checkpoint, with changes",
        description="A new run that starts from RUN's checkpoint at (or before) step N, with "
        "the changes given, trained at once (like kiln train) unless --no-train.",
    )
    fork.add_argument("run", metavar="RUN_DIR")
    fork.add_argument("--step", type=int, help="fork at the newest valid checkpoint at or before this step")
    fork.add_argument("--name", required=True, help="the new run's name")
    fork.add_argument("--runs-dir", help="folder of the new run (default: the parent's folder)")
    fork.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a change: anything --resume may change, model.dropout, model.qk_norm, model.post_norm, "
        "train.z_loss (with --from-scratch: anything); repeatable",
    )
    fork.add_argument(
        "--skip-batches",
        action="append",
        default=[],
        metavar="A:B",
        help="never train on data batches A..B (inclusive, as events.jsonl's data_index); repeatable",
    )
    fork.add_argument(
        "--from-scratch",
        action="store_true",
        help="a fresh attempt with the changes (no checkpoint), same data order, lineage recorded",
    )
    fork.add_argument("--no-train", action="store_true", help="only create the fork; kiln train --resume trains it")
    fork.add_argument("--nproc-per-node", type=int, default=0, metavar="N", help="train it on N processes (torchrun)")

    report = verbs.add_parser("report", help="write a run's report (report.md and a self-contained report.html)")
    report.add_argument("run", metavar="RUN_DIR")
    report.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/report)")
    sweep = verbs.add_parser(
        "sweep",
        help="run a grid or IsoFLOP set of model sizes x token budgets as runs",
        description="Run every point of SWEEP.toml as an ordinary run under RUNS_DIR/<name>/ "
        "(finished points are skipped, interrupted ones resumed).",
    )
    sweep.add_argument("file", metavar="SWEEP.toml")
    sweep.add_argument("--runs-dir", default="runs", help="folder holding run folders (default: runs)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="points trained at once (default 1)")
    sweep.add_argument("--dry-run", action="store_true", help="print the points and their runs' settings only")

    scaling = verbs.add_parser("scaling", help="fit scaling laws to runs or a CSV; predict losses and sizes")
    scaling_verbs = scaling.add_subparsers(dest="scaling_verb", metavar="fit|predict", required=True)
    sfit = scaling_verbs.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta (Huber, L-BFGS, bootstrap)")
    sfit.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished runs of several sizes and token budgets")
    sfit.add_argument("--points", metavar="FILE.csv", help="instead of runs: a CSV with columns params,tokens,loss")
    sfit.add_argument("--json", metavar="OUT", help="write the fit as JSON (for kiln scaling predict)")
    sfit.add_argument("--plot", metavar="OUT.png", help="draw points, fitted curves, IsoFLOP parabolas, frontier")
    sfit.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals (default 100)")
    sfit.add_argument(
        "--backtest",
        action="store_true",
        help="also fit without the largest-compute points and predict them (a check of extrapolation "
        "that the intervals cannot make)",
    )
    spred = scaling_verbs.add_parser("predict", help="the loss at (N, D), or the compute-optimal size for a budget")
    spred.add_argument("fit", metavar="FIT.json")
    spred.add_argument("--params", type=float, help="non-embedding parameters N (with --tokens)")
    spred.add_argument("--tokens", type=float, help="training tokens D (with --params)")
    spred.add_argument(
        "--flops", type=float, help="a compute budget C = 6 N D (non-embedding N): the recommended N, D and a shape"
    )

    doctor = verbs.add_parser(
        "doctor",
        help="diagnose a run: findings by severity, each with evidence and a remedy",
        description="Read a run's records and list what went wrong (critical, warning, "
        "info), each with its evidence and a remedy Kiln can run.",
    )
    doctor.add_argument("run", metavar="RUN_DIR")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument(
        "--explain",
        action="store_true",
        help="also ask the LLM at KILN_LLM_URL (KILN_LLM_MODEL, KILN_LLM_KEY) to explain the "
        "findings; a scrubbed digest is sent, the rules still decide",
    )
    doctor.add_argument("--apply", type=int, metavar="K", help="run the remedy of finding K (as numbered)")
    doctor.add_argument(
        "--fail-on",
        choices=("critical", "warning"),
        help="exit 1 when a finding is at least this severe (for scripts and CI; default: exit 0)",
    )
    for p in (train, prep, export, imp, sample, runs, compare, fork, report, doctor):
        _plugin_args(p)
    ev.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py|MODULE",
        help="import user code that registers suites (and other components); repeatable",
    )
    return parser


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "kiln",
        *rest,
    ]
    return subprocess.call(cmd)


def default_run_name(args: argparse.Namespace) -> str:
    return args.name or f"{args.preset or Path(args.config or 'tiny').stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def config_from_args(args: argparse.Namespace) -> Config:
    """The config a command's --preset / --config / --set give: the tiny preset when neither a
    preset nor a file is named; a file layers over a named preset; --set over both."""
    return load_config(args.preset or ("tiny" if not args.config else None), args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from kiln.progress import console, quiet
    from kiln.runs.report import summary_table
    from kiln.train.session import find_restarted_run, resume_run, start_run

    if args.list_callbacks:
        from kiln.train.callbacks.registry import describe_callbacks

        print(describe_callbacks())
        return 0
    if args.resume:
        if args.preset or args.config:
            raise KilnError(
                "--resume takes its config from the run folder; drop --preset/--config (use --set for allowed changes)"
            )
        summary = resume_run(Path(args.resume), args.overrides)
    else:
        cfg = config_from_args(args)
        # torchrun restarted the job after a failure: continue the run its first attempt started
        restarted = find_restarted_run(Path(args.runs_dir))
        if restarted is not None and (not args.name or restarted.name == args.name):
            summary = resume_run(restarted, args.overrides)
        else:
            summary = start_run(cfg, Path(args.runs_dir), default_run_name(args))
    if not quiet():
        console.print(summary_table(summary, title=f"Kiln run {summary['run']}"))
    return 0


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

        out, step = export_hf(Path(args.run), Path(args.out), args.step, args.max_shard_size, warn=_stderr)
    else:
        from kiln.runs.export import export_run

        out, step = export_run(Path(args.run), Path(args.out), args.step, warn=_stderr)
    print(f"wrote {out} (step {step})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from kiln.plan.cluster import load_cluster
    from kiln.plan.search import GiB, explain, search

    cfg = config_from_args(args)
    cluster = load_cluster(args.cluster)
    if args.action == "profile":
        from kiln.plan.profile import run_profile

        if not cluster.local:
            raise KilnError("kiln plan profile measures this machine: use --cluster local:N")
        path = run_profile(cfg, cfg.data.vocab_size, (cluster.world_size,))
        print(f"wrote {path}")
        return 0
    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"
    if cluster.mixed:
        return _plan_mixed(cfg, cluster, precision, args)
    result = search(cfg, cfg.data.vocab_size, cluster, precision)
    print(
        f"{cluster.describe()}: {result.examined:,} layouts examined in {result.seconds:.1f} s, "
        f"{len(result.plans):,} fit"
    )
    for i, c in enumerate(result.plans[: args.top], 1):
        print(f"{i}. {c.tokens_per_s:12,.0f} tokens/s  {c.memory.total / GiB:6.1f} GiB  {c.layout.describe()}")
        print("   " + " ".join(f"--set {s}" for s in c.layout.sets()))
    if args.explain:
        print("\n".join(explain(result)))
    if args.json:
        plans = [
            {
                "set": c.layout.sets(),
                "tokens_per_s": c.tokens_per_s,
                "memory_gb": c.memory.total / 1e9,
                "why": f"step: {c.time.dominant()} dominates",
            }
            for c in result.plans[: args.top]
        ]
        Path(args.json).write_text(
            json.dumps({"plans": plans, "examined": result.examined, "rejected": result.rejected}, indent=1)
        )
    if not result.plans:
        raise KilnError("no layout fits this cluster; see above (--explain says why each family was rejected)")
    return 0


def _plan_mixed(cfg, cluster, precision: str, args: argparse.Namespace) -> int:
    import json
    import time

    from kiln.plan.hetero import explain_mixed, plan_mixed

    t0 = time.perf_counter()
    plans = plan_mixed(cfg, cluster, precision)
    print(f"{cluster.describe()}: {len(plans)} plans split by device speed, in {time.perf_counter() - t0:.1f} s")
    for i, p in enumerate(plans[: args.top], 1):
        memory = max(m.total for m in p.memory) / 2**30
        print(f"{i}. {p.tokens_per_s:12,.0f} tokens/s ({p.speedup:.2f}x uniform)  {memory:6.1f} GiB  {p.describe()}")
        print("   " + " ".join(f"--set {s}" for s in p.sets()))
    if args.explain:
        print("\n".join(explain_mixed(plans, cluster)))
    if args.json:
        rows = [
            {
                "set": p.sets(),
                "tokens_per_s": p.tokens_per_s,
                "memory_gb": max(m.total for m in p.memory) / 1e9,
                "uniform_tokens_per_s": p.uniform_tokens_per_s,
                "why": f"{p.shape} parallel split by speed: {p.speedup:.2f}x the uniform split",
            }
            for p in plans[: args.top]
        ]
        Path(args.json).write_text(json.dumps({"plans": rows}, indent=1))
    if not plans:
        raise KilnError("no plan fits this mixed cluster (a share or stage exceeds a device's memory)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from kiln.interop.convert import import_hf

    run = import_hf(Path(args.folder), Path(args.runs_dir), args.name)
    print(
        f"made run {run}; continue pretraining it with: kiln train --resume {run} --set data.corpus=... "
        "--set train.steps=..."
    )
    return 0


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


def cmd_sample(args: argparse.Namespace) -> int:
    from kiln.eval.sample import sample_from_run

    for text in sample_from_run(
        Path(args.run),
        args.prompt or ["\n"],
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.step,
        say=_stderr,  # the samples alone on stdout
    ):
        print(text)
        print("-" * 40)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kiln.eval.runner import evaluate_run, report_table
    from kiln.eval.suites import describe_suites
    from kiln.progress import console, quiet

    if args.list:
        print(describe_suites())
        return 0
    if not args.run:
        raise KilnError("kiln eval needs a run folder: kiln eval RUN_DIR [--suite NAME ...]")
    report, path = evaluate_run(
        Path(args.run),
        args.step,
        args.suites,
        args.option,
        log=None if quiet() else console.print,
        weights=Path(args.weights) if args.weights else None,
    )
    console.print(report_table(report, title=f"Kiln eval {args.run} @ step {report['step']}"))
    print(f"wrote {path}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    from kiln.progress import table_console
    from kiln.runs.catalog import family_tree, list_runs, run_row, runs_table

    rows = [run_row(r) for r in list_runs(Path(args.dir))]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs in {args.dir}")
    elif args.tree:
        print(family_tree(rows))
    else:
        table_console().print(runs_table(rows, title=f"Kiln runs in {args.dir}"))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kiln.progress import table_console
    from kiln.runs.compare import compare_runs, compare_tables

    result = compare_runs(
        [Path(r) for r in args.runs],
        Path(args.out),
        args.metrics or None,
        log=lambda text: print(text, file=sys.stderr),
    )
    for table in compare_tables(result):
        table_console().print(table)
    print(f"wrote {result['md']} and {result['png']}")
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    from kiln.plugins import loaded_plugins
    from kiln.resolve import check_training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KilnError(
            "kiln fork creates the run in one process; drop torchrun and pass --nproc-per-node N to "
            "train the fork on N processes"
        )
    from kiln.runs.fork import create_fork

    fork = create_fork(
        Path(args.run),
        args.name,
        args.step,
        args.overrides,
        args.skip_batches,
        args.from_scratch,
        Path(args.runs_dir) if args.runs_dir else None,
        check=check_training,
        plugins=loaded_plugins(),
    )
    if args.no_train:
        print(f"created {fork.run.path}; train it with: kiln train --resume {fork.run.path}")
        return 0
    resume = ["train", "--resume", str(fork.run.path), *(f"--plugin={p}" for p in args.plugin)]
    if args.nproc_per_node:
        return launch_torchrun(args.nproc_per_node, resume)
    return cmd_train(build_parser().parse_args(resume))


def cmd_report(args: argparse.Namespace) -> int:
    from kiln.runs.document import write_report
    from kiln.runs.rundir import RunDir

    run = RunDir.open(Path(args.run))
    write_report(run.path, Path(args.out) if args.out else None)  # it says what it wrote
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from kiln.scaling.sweep import load_sweep, run_sweep, table

    if args.parallel < 1:
        raise KilnError(f"--parallel must be >= 1, got {args.parallel}")
    if args.dry_run:
        name, points = load_sweep(Path(args.file))
        print(table(points))
        for p in points:
            print(f"{name}/{p.name}: " + " ".join(f"--set {s}" for s in p.overrides))
        return 0
    run_sweep(Path(args.file), Path(args.runs_dir), parallel=args.parallel)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    import json

    from kiln.scaling.law import Law, fit
    from kiln.scaling.report import describe, plot, recommend

    if args.scaling_verb == "fit":
        from kiln.scaling.points import points_from_csv, points_from_runs

        if bool(args.points) == bool(args.runs):
            raise KilnError("give either run folders or --points FILE.csv")
        points = points_from_csv(Path(args.points)) if args.points else points_from_runs([Path(r) for r in args.runs])

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        law = fit(points, bootstrap=args.bootstrap, progress=progress)
        print(describe(law))
        result = law.to_json()
        if args.backtest:
            from kiln.errors import ConfigError
            from kiln.scaling.backtest import backtest, describe_backtest

            try:
                result["backtest"] = backtest(
                    points, bootstrap=args.bootstrap, progress=lambda line: progress(f"backtest: {line}")
                )
                print(describe_backtest(result["backtest"]))
            except ConfigError as e:  # the fit itself stands; say why it cannot be checked this way
                result["backtest"] = {"skipped": str(e)}
                print(e)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        if args.plot:
            print(f"wrote {plot(law, points, Path(args.plot))}")
        return 0
    path = Path(args.fit)
    if not path.is_file():
        raise KilnError(f"{path} does not exist; write one with kiln scaling fit ... --json {path}")
    try:
        law = Law.from_json(json.loads(path.read_text()))
    except ValueError as e:
        raise KilnError(f"{path} is not valid JSON ({e})") from None
    if args.flops is not None:
        if args.flops <= 0 or args.params is not None or args.tokens is not None:
            raise KilnError("--flops takes a positive budget, alone (or give --params and --tokens)")
        print(recommend(law, args.flops))
        return 0
    if args.params is None or args.tokens is None or args.params <= 0 or args.tokens <= 0:
        raise KilnError("give positive --params N and --tokens D, or --flops C")
    lo, hi = law.interval(args.params, args.tokens)
    print(
        f"N = {args.params:.4g}, D = {args.tokens:.4g}: predicted loss {law.loss(args.params, args.tokens):.4f} "
        f"[{lo:.4f}, {hi:.4f}] (95% bootstrap)"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from kiln.runs.doctor import diagnose, findings_json, format_findings, remedy_argv
    from kiln.runs.rundir import RunDir

    run = RunDir.open(Path(args.run))
    findings = diagnose(run.path)
    if args.apply is not None:
        if args.fail_on:
            raise KilnError("--apply runs a remedy and exits with its code; --fail-on judges the findings: give one")
        argv = remedy_argv(findings, args.apply)
        print("running: kiln " + " ".join(argv), flush=True)
        return main([*argv, *(f"--plugin={p}" for p in args.plugin)])
    if args.json:
        print(json.dumps(findings_json(findings), indent=2))
    else:
        print(format_findings(findings))
    if args.explain:
        from kiln.runs.explain import explain, format_explanation

        text = explain(
            findings,
            config=run.config_dict(),
            summary=run.summary(),
            run=run.path,
            log=lambda line: print(line, file=sys.stderr),
        )
        if text:
            print(format_explanation(text))
    if args.fail_on:
        from kiln.runs.doctor import SEVERITY_RANK

        worst = min((SEVERITY_RANK.get(f["severity"], len(SEVERITY_RANK)) for f in findings), default=None)
        if worst is not None and worst <= SEVERITY_RANK[args.fail_on]:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage mistake (one line already written)
        return e.code if isinstance(e.code, int) else 2
    if not args.verb:
        parser.print_help()
        return 2
    handlers = {
        "train": cmd_train,
        "prepare": cmd_prepare,
        "sample": cmd_sample,
        "export": cmd_export,
        "import": cmd_import,
        "eval": cmd_eval,
        "runs": cmd_runs,
        "compare": cmd_compare,
        "fork": cmd_fork,
        "report": cmd_report,
        "doctor": cmd_doctor,
        "scaling": cmd_scaling,
        "sweep": cmd_sweep,
        "plan": cmd_plan,
    }
    if args.verb == "train" and args.nproc_per_node:
        return launch_torchrun(args.nproc_per_node, list(sys.argv[1:] if argv is None else argv))
    try:
        from kiln.plugins import load_plugins

        load_plugins(getattr(args, "plugin", []))
        code = handlers[args.verb](args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
    except KilnError as e:
        # one write (shorter than a pipe's atomic size), so the lines of several ranks never interleave
        sys.stderr.write(f"kiln: error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kiln runs --json | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
