"""bench/gpu_check.py (`make gpu-check`): its CPU rehearsal (--dry-run) passes every phase with the
record schema and the figures a GPU run reports, and a phase past its limit is killed, with
everything it started, and recorded as a timeout."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = load_script()


def check(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed child nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "results.json"
    proc = check(["--dry-run", "--out", str(out), "--work", str(tmp / "work")])
    return proc, json.loads(out.read_text())


def test_dry_run_passes_every_phase(dry_run):
    proc, records = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["name"] for r in records] == ["preflight", *gc.PHASES]
    for r in records:
        assert set(gc.RECORD_KEYS) <= set(r), r["name"]
        assert r["status"] in gc.STATUSES and r["status"] in ("ok", "skipped"), (r["name"], r["reason"], r["log_tail"])
        assert r["status"] == "ok" or r["reason"], r["name"]  # a skip says why
        assert r["dry_run"] is True and r["seconds"] >= 0 and isinstance(r["metrics"], dict)
        assert len({x["run_id"] for x in records}) == 1
    lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu-check ")]
    assert len(lines) == len(records)  # one progress line per phase


def test_dry_run_reports_the_figures(dry_run):
    _, records = dry_run
    by = {r["name"]: r for r in records}
    assert by["env"]["device"].startswith("cpu") and by["env"]["torch"]
    assert by["env"]["metrics"]["matmul_bf16_tflops"] > 0
    assert by["gpu_tests"]["status"] == "skipped"
    assert "tests/unit/test_triton_kernels.py" in by["gpu_tests"]["metrics"]["tests"]
    gpt2 = by["gpt2"]["metrics"]
    assert gpt2["tokens_per_s"] > 0 and gpt2["mfu"] > 0 and gpt2["steps"] == 3
    assert "host_syncs" in gpt2 and "graph_breaks" in gpt2
    assert by["llama1b"]["metrics"]["variants"]["torch"]["tokens_per_s"] > 0
    assert set(by["llama1b"]["metrics"]["skipped"]) == {"triton", "float8"}
    loss = by["loss_memory"]["metrics"]
    assert loss["naive_ms"] > 0 and loss["chunked_ms"] > 0 and loss["chunked_rel_err"] < 1e-4
    assert by["resume"]["metrics"]["deterministic_identical"] is True
    fsdp = by["nccl_fsdp"]["metrics"]
    assert fsdp["fsdp"] and fsdp["dcp"] and fsdp["steps"] == 6 and fsdp["export_tensors"] > 0


def test_a_phase_over_its_limit_is_killed_and_recorded(tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps([{"name": "earlier"}]))  # records are appended, not replaced
    proc = check(["--only", "_sleep", "--phase-timeout", "2", "--out", str(out), "--work", str(tmp_path)], 60)
    assert proc.returncode == 1
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == ["earlier", "preflight", "_sleep"]
    sleep = records[-1]
    assert sleep["status"] == "timeout" and sleep["seconds"] < 20 and "limit" in sleep["reason"]
    assert not alive(int((tmp_path / "sleep-child.pid").read_text()))  # its child died with it
    assert "_sleep" in proc.stdout and "timeout" in proc.stdout


def test_unknown_phase_is_refused(tmp_path):
    proc = check(["--only", "nope", "--out", str(tmp_path / "r.json")], 60)
    assert proc.returncode == 2 and "unknown phase nope" in proc.stderr


def test_gpu_test_discovery(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    available = "torch.cuda" + ".is_available()"  # split: this file itself is no GPU test
    (tests / "test_a.py").write_text(
        "import pytest, torch\n\n"
        f'@pytest.mark.skipif(not {available}, reason="GPU")\n'
        "@pytest.mark.parametrize('x', [1])\n"
        "def test_on_gpu(x):\n    pass\n\n"
        "def test_anywhere():\n    pass\n"
    )
    (tests / "test_b.py").write_text(f'DEVICE = "cuda" if {available} else "cpu"\n')
    (tests / "test_c.py").write_text("def test_cpu():\n    pass\n")
    (tests / "test_d.py").write_text(
        f"gpu = pytest.mark.skipif(not {available}, reason='GPU')\n\n@gpu\ndef test_named():\n    pass\n"
    )
    (tests / "test_e.py").write_text(f"pytestmark = pytest.mark.skipif(not {available}, reason='GPU')\n")
    assert gc.gpu_test_ids(tmp_path) == [
        "tests/test_a.py::test_on_gpu",
        "tests/test_b.py",
        "tests/test_d.py::test_named",
        "tests/test_e.py",
    ]
