"""Shared fixtures: tiny corpora written to tmp_path and tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's kernels (an optional extra) are checked on the CPU by its interpreter, which Triton
    # chooses when it decorates a kernel: its own library kernels at import, so before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.config import Config, load_config

WORDS = (
    "the quick brown fox jumps over lazy dog while a small model learns to predict "
    "next token from context and data flows through shards loader trainer checkpoint"
).split()

PY_TEMPLATES = [
    'def {name}(x, y):\n    """Return the {word} of x and y."""\n    return x {op} y\n',
    "class {cname}:\n    def __init__(self, value):\n        self.value = value\n\n"
    "    def {name}(self):\n        return self.value {op} {num}\n",
    "for i in range({num}):\n    if i % 2 == 0:\n        print('{word}', i)\n",
    "import os\n\n\ndef {name}(path):\n    with open(path) as f:\n        return f.read().split('{word}')\n",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
    return " ".join(words).capitalize() + "."


def _python(rng: random.Random) -> str:
    t = rng.choice(PY_TEMPLATES)
    return t.format(
        name=f"{rng.choice(WORDS)}_{rng.choice(WORDS)}",
        cname=rng.choice(WORDS).title() + "Thing",
        word=rng.choice(WORDS),
        op=rng.choice("+-*"),
        num=rng.randint(1, 99),
    )


def write_corpus(folder: Path, n_files: int = 30, lines_per_file: int = 12, seed: int = 0) -> Path:
    """`n_files` .txt documents of mixed English-ish prose and Python code (a few hundred lines)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        parts = [(_python(rng) if rng.random() < 0.4 else _sentence(rng)) for _ in range(lines_per_file)]
        (folder / f"doc{i:03d}.txt").write_text("\n".join(parts) + "\n")
    return folder


def write_repetitive_corpus(folder: Path, n_files: int = 24) -> Path:
    """A highly predictable corpus: a tiny model's loss falls fast on it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"def add_{j % 5}(a, b):\n    return a + b\n" for j in range(12)]
        lines += ["the cat sat on the mat and the dog sat on the log.\n"] * 8
        (folder / f"rep{i:03d}.txt").write_text("".join(lines))
    return folder


TINY = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.seq_len=32",
    "data.vocab_size=320",
    "data.val_fraction=0.15",
    "train.steps=4",
    "train.time_budget_s=0",
    "train.batch_size=4",
    "train.device=cpu",
    "train.precision=fp32",
    "schedule.warmup_steps=2",
    "eval.every=0",
    "eval.batches=2",
    "eval.sample_tokens=4",
    'eval.prompts=["def "]',
    "checkpoint.every=0",
    "checkpoint.keep=0",
    "log.every=1",
    "log.plot=false",
]


def init_model(model, cfg, seed: int = 0):
    """Initialise weights as training does (the family's rule, seeded by parameter name)."""
    from kiln.model.registry import initialise

    return initialise(model, cfg, seed)


def tiny_overrides(corpus: Path | str, cache_dir: Path, *extra: str) -> list[str]:
    return [f"data.corpus={corpus}", f"data.cache_dir={cache_dir}", *TINY, *extra]


@pytest.fixture(scope="session")
def kiln_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kiln_home")


@pytest.fixture(scope="session", autouse=True)
def _kiln_env(kiln_home: Path):
    """Quiet output, and the measured CPU peak cached under tmp (not ~/.cache); session-wide so that
    module-scoped fixtures (which start before function-scoped ones) see it too."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_QUIET", "1")
    mp.setenv("KILN_HOME", str(kiln_home))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Tests may seed torch's global generator; keep them from leaking that into each other."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture
def make_corpus(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "corpus", **kw) -> Path:
        return write_corpus(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus shared (read-only) by many tests."""
    return write_corpus(tmp_path_factory.mktemp("shared") / "corpus")


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """`tiny_config(corpus, *overrides)`: the tiny preset shrunk to seconds, caching data under tmp_path."""

    def build(corpus: Path | str, *extra: str, cache_dir: Path | None = None) -> Config:
        return load_config(preset="tiny", overrides=tiny_overrides(corpus, cache_dir or tmp_path / "cache", *extra))

    return build


@pytest.fixture(scope="session")
def shared_prepared(tmp_path_factory: pytest.TempPathFactory, shared_corpus: Path):
    """The shared corpus prepared once (tokenizer + shards), for tests that only read it."""
    from kiln.data.shards import prepare

    cache = tmp_path_factory.mktemp("shared_cache")
    cfg = load_config(preset="tiny", overrides=tiny_overrides(shared_corpus, cache))
    return prepare(cfg.data, log=lambda *a: None)


@pytest.fixture
def one_thread():
    """Tests of tiny models run faster on one thread than on two busy cores; use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def avx2_on_avx512() -> dict[str, str] | None:
    """ATEN_CPU_CAPABILITY=avx2 on a CPU with AVX-512: there `torch._scaled_mm`, the CPU's float8
    emulation, takes ~17 ms a small product under the AVX-512 kernels against ~0.1 ms under AVX2
    (a PyTorch CPU slowness); elsewhere None (the CPU's own kernels)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"} if " avx512f" in flags else None
