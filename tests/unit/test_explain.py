"""kiln.runs.explain: the scrubbed digest and the OpenAI-compatible call, against a local stub server."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kiln.runs import explain as ex

SECRET = "sk-plantedSECRET123456"
KEY = "kiln-key-Zq8xV2pLw"  # no secret-looking shape: only the environment check can catch it
HOST = "gpu-node-17.corp.example.com"
RUN_DIR = f"/home/alice/{SECRET}/runs/alpha-run-77"
ANSWER = "The learning rate was too high for this width; the fork with a third of it should recover."


class Stub(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.mode = "ok"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body.decode()})
        mode = self.server.mode
        if mode == "sleep":
            time.sleep(1.0)
        if mode == "redirect":  # followed, it would carry the Authorization header along
            self.send_response(302)
            self.send_header("Location", "/steal")
            self.end_headers()
            return
        status = 500 if mode == "500" else 200
        payload = {
            "ok": json.dumps({"choices": [{"message": {"role": "assistant", "content": ANSWER}}]}),
            "malformed": "this is not json {",
            "nochoices": json.dumps({"error": "overloaded"}),
        }.get(mode, "{}")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())
        except OSError:
            pass  # the client gave up (the timeout case)

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": ""})
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch):
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("KILN_LLM_URL", server.url)
    monkeypatch.setenv("KILN_LLM_MODEL", "stub-model")
    monkeypatch.setenv("KILN_LLM_KEY", KEY)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KILN_TEST_SECRET", SECRET)
    monkeypatch.setattr(ex.socket, "gethostname", lambda: HOST)
    monkeypatch.setattr(ex, "_fqdn", lambda: HOST)


def findings() -> list[dict[str, Any]]:
    argv = ["fork", RUN_DIR, "--step", "150", "--name", "alpha-run-77-lowlr", "--set", "optim.lr=0.0003"]
    return [
        {
            "kind": "divergence",
            "severity": "critical",
            "steps": [180, 240],
            "summary": f"the loss of {RUN_DIR} diverged (see {RUN_DIR}/metrics.jsonl); alpha-run-77 at 9.7",
            "evidence": {
                "loss_before": 3.1,
                "loss_after": 9.7,
                "layer": "layers.1.attn",
                "ranks": [1],
                "grad_norm": float("inf"),
                "note": f"key {SECRET} in the log",
                "host": f"NCCL on {HOST}",
                "short_host": "gpu-node-17 was slow",
                "api": f"used {KEY}",
                SECRET: 1,
                "aws": "AKIAABCDEFGHIJKLMNOP",
                "gh": "ghp_abcdefghijklmnopqrstuvwxyz0123",
                "jwt": "eyJhbGciOiJI.eyJzdWIiOiIx.SflKxwRJSMeKKF2QT4fw",
                "digest": "9f86d081884c7d659a2feaa0c55ad015",
                "cache": "/home/alice/.kiln-cache/abc",
                "rate": "120 tokens/s, 3/4 of the peak",
            },
            "remedy": {
                "command": "kiln " + " ".join(argv),
                "argv": argv,
                "why": f"restart alpha-run-77 from {RUN_DIR}/checkpoints before the divergence",
            },
        },
        {
            "kind": "loader_stall",
            "severity": "warning",
            "steps": [300, 300],
            "evidence": {"seconds": 4.5},
            "remedy": {
                "command": f"kiln train --resume {RUN_DIR}",
                "argv": ["train", "--resume", RUN_DIR],
                "why": "the stall was transient",
            },
        },
        {"kind": "plateau", "severity": "info", "steps": [400, 900], "evidence": {}, "remedy": None},
    ]


CONFIG = {
    "model": {"family": "decoder", "n_layers": 4, "d_model": 256, "pos": "rope", "norm": "rmsnorm", "mlp": SECRET},
    "data": {
        "corpus": f"/home/alice/private/{SECRET}/corpus",
        "cache_dir": "/home/alice/.cache",
        "tokenizer": f"{RUN_DIR}/tokenizer.json",
        "vocab_size": 4096,
    },
    "optim": {"name": "adamw", "lr": 0.001, "grad_clip": 1.0},
    "train": {"steps": 1000, "batch_size": 16, "precision": "bf16", "z_loss": 0.0, "device": HOST},
    "eval": {"prompts": [SECRET, "def "]},
    "callbacks": {"enabled": ["layer_stats"], "layer_stats": {"out": f"/srv/{SECRET}", "token": KEY}},
}
SUMMARY = {
    "steps": 1000,
    "train_loss": 3.2,
    "device": "cuda:0",
    "precision": "bf16",
    "host": HOST,
    "run_dir": RUN_DIR,
    "seconds_between_steps": {"eval": 1.5, "note": SECRET},
}


def leaks(text: str) -> list[str]:
    low = text.lower()
    return [
        s
        for s in (
            SECRET,
            KEY,
            HOST,
            "gpu-node-17",
            "/home/alice",
            "alice",
            "alpha-run-77",
            "AKIAABCDEFGHIJKLMNOP",
            "ghp_",
            "eyJhbGciOiJI",
            "9f86d081884c7d659a2feaa0c55ad015",
        )
        if s.lower() in low
    ]


def test_the_digest_arrives_and_the_answer_returns(stub: Stub, planted: None) -> None:
    lines: list[str] = []
    assert ex.explain(findings(), CONFIG, SUMMARY, log=lines.append) == ANSWER
    assert lines == [] and len(stub.requests) == 1
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = json.loads(request["body"])
    assert body["model"] == "stub-model" and [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "authoritative" in body["messages"][0]["content"]
    sent = json.loads(body["messages"][1]["content"])
    assert [f["kind"] for f in sent["findings"]] == ["divergence", "loader_stall", "plateau"]
    first = sent["findings"][0]
    assert first["steps"] == [180, 240] and first["severity"] == "critical"
    assert first["remedy"]["set"] == ["optim.lr=0.0003"] and first["remedy"]["step"] == 150
    assert first["remedy"]["action"] == "fork" and sent["findings"][1]["remedy"]["resume"] is True
    assert {"loss_before": 3.1, "loss_after": 9.7, "layer": "layers.1.attn", "ranks": [1]}.items() <= first[
        "evidence"
    ].items()
    assert first["evidence"]["grad_norm"] == "inf" and first["evidence"]["rate"] == "120 tokens/s, 3/4 of the peak"
    assert first["evidence"]["cache"] == "<path>" and "RUN" in first["summary"] and "RUN" in first["remedy"]["why"]
    assert sent["config"]["model"] == {
        "family": "decoder",
        "n_layers": 4,
        "d_model": 256,
        "pos": "rope",
        "norm": "rmsnorm",
    }
    assert sent["config"]["data"] == {"vocab_size": 4096} and "eval" not in sent["config"]
    assert sent["summary"]["seconds_between_steps"] == {"eval": 1.5} and sent["summary"]["device"] == "cuda:0"
    assert sent["findings"][2]["remedy"] is None


def test_no_secret_reaches_the_request_body(stub: Stub, planted: None) -> None:
    assert ex.explain(findings(), CONFIG, SUMMARY, log=lambda line: None, run=RUN_DIR) == ANSWER
    raw = stub.requests[0]["body"]
    assert leaks(raw) == [], raw
    assert leaks(json.loads(raw)["messages"][1]["content"]) == []


def test_the_last_pass_redacts_what_the_rules_let_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_TEST_NUMBER", "7654321")  # an environment value hiding in a number
    sent = ex.digest([{"kind": "slow_steps", "severity": "info", "steps": [1, 2], "evidence": {"tokens": 7654321}}])
    assert "7654321" not in json.dumps(sent) and sent["findings"][0]["evidence"]["tokens"] == ex.REDACTED


def test_short_relative_run_names_are_words_not_substrings() -> None:
    argv = ["fork", "x1", "--step", "5", "--name", "x1-b", "--set", "data.corpus=corpora/x1.txt"]
    sent = ex.digest(
        [
            {
                "kind": "loss_spike",
                "severity": "warning",
                "steps": [6, 6],
                "summary": "x1 spiked at x1x",
                "evidence": {"layer": "layers.0.mlp"},
                "remedy": {"argv": argv, "why": "skip it"},
            }
        ],
        run=".",
    )
    f = sent["findings"][0]
    assert (
        f["kind"] == "loss_spike" and f["evidence"] == {"layer": "layers.0.mlp"} and f["summary"] == "RUN spiked at x1x"
    )
    assert f["remedy"]["set"] == ["data.corpus=<path>"]


def test_no_url_means_no_request_and_no_message(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_LLM_URL")
    lines: list[str] = []
    assert ex.explain(findings(), CONFIG, SUMMARY, log=lines.append) is None
    assert lines == [] and stub.requests == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["refused", "500", "malformed", "nochoices", "sleep", "redirect"])
def test_any_failure_is_one_warning(stub: Stub, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    stub.mode = mode
    where = f"127.0.0.1:{stub.server_address[1]}"
    if mode == "refused":
        where = f"127.0.0.1:{_free_port()}"
        monkeypatch.setenv("KILN_LLM_URL", f"http://{where}/v1")
    lines: list[str] = []
    started = time.monotonic()
    assert ex.explain(findings(), CONFIG, SUMMARY, log=lines.append, timeout_s=0.3) is None
    assert time.monotonic() - started < 0.9
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: the LLM explainer at {where} failed (")
    assert lines[0].endswith("); the rules' findings stand")
    assert len(stub.requests) == (0 if mode == "refused" else 1)
    expected = {
        "500": "HTTP 500",
        "redirect": "HTTP 302",
        "sleep": "no answer within 0.3 s",
        "malformed": "malformed",
        "nochoices": "malformed",
    }
    assert expected.get(mode, "") in lines[0]


def test_format_explanation() -> None:
    text = ex.format_explanation("Line one.\x1b[31m\nLine two.  \n")
    assert text.splitlines() == ["LLM explanation (advisory; the rules decide):", "  Line one.[31m", "  Line two."]
