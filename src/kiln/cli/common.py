"""What the verbs' parsers and commands share: the one-line usage errors, the config and plugin
options, and re-running a command under torchrun."""

from __future__ import annotations

import argparse
import sys

from kiln.config import Config, load_config, preset_names

# the subparsers of `kiln`, to which each verb's module adds its own
Verbs = argparse._SubParsersAction

STEP_HELP = (
    "checkpoint step (default: the newest valid one, or 0 for a run with none, such as an import; "
    "0 without a step-0 checkpoint = the weights training starts from)"
)


def stderr(text: str) -> None:
    print(text, file=sys.stderr)


def config_args(p: argparse.ArgumentParser) -> None:
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


def plugin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py|MODULE",
        help="import user code that registers callbacks, suites, corpora, model families or objectives; "
        "repeatable (also KILN_PLUGINS=a.py,module)",
    )


def presets_epilog() -> str:
    return "presets: " + ", ".join(preset_names())


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end in one line (what is wrong and where to look), exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def config_from_args(args: argparse.Namespace) -> Config:
    """The config a command's --preset / --config / --set give: the tiny preset when neither a
    preset nor a file is named; a file layers over a named preset; --set over both."""
    return load_config(args.preset or ("tiny" if not args.config else None), args.config, args.overrides)
