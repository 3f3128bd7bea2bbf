"""The optional LLM explainer of `kiln doctor RUN --explain`: `digest` scrubs the findings (no paths,
run or host names, environment values, tokens or keys) and `explain` posts them to the OpenAI-compatible
endpoint at KILN_LLM_URL (KILN_LLM_MODEL, bearer KILN_LLM_KEY). Advisory: unconfigured it does nothing, and
any failure is one warning line, since the rules' findings stand without it."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUN, PATH, REDACTED = "RUN", "<path>", "<redacted>"

# Only numbers and bools of these sections/keys ("*": all of them); strings only from _ENUMS.
_NUMBERS: dict[str, Any] = {
    "model": "*",
    "optim": "*",
    "schedule": "*",
    "guard": "*",
    "mask": "*",
    "data": ("vocab_size",),
    "train": ("steps", "tokens", "batch_size", "batch_tokens", "micro_batch_size", "z_loss", "compile"),
    "parallel": ("dp_replicate", "dp_shard", "tp", "pp", "pp_microbatches"),
}
_ENUMS = {
    "model": ("family", "pos", "norm", "mlp"),
    "schedule": ("name",),
    "optim": ("name",),
    "train": ("precision", "objective"),
}
# An environment variable set to one of Kiln's words (LOG_LEVEL=warning) is no secret to redact.
_SAFE = set(
    "critical warning info learned layernorm rmsnorm swiglu cosine constant causal masked decoder encoder "
    "adamw divergence plateau nonfinite".split()
)
_SECRETS = re.compile(
    "|".join(
        (
            r"sk-[\w-]{8,}",
            r"gh[pousr]_[A-Za-z0-9]{16,}",
            r"github_pat_\w{20,}",
            r"(?:AKIA|ASIA)[0-9A-Z]{16}",
            r"xox[abprs]-[A-Za-z0-9-]{10,}",
            r"hf_[A-Za-z0-9]{20,}",
            r"AIza[\w-]{30,}",
            r"glpat-[\w-]{16,}",
            r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]{4,}",
            r"[\w-]{16,}\.[\w-]{16,}\.[\w-]{16,}",
            r"-----BEGIN[A-Z ]*PRIVATE KEY",
            r"(?i:\b(?:api[_-]?key|secret|token|passw(?:or)?d|authorization)\s*[:=]\s*\S{4,})",
            r"(?i:\bbearer\s+\S{6,})",
            r"(?<![\w+/=-])(?=[\w+/=-]*\d)[\w+/=-]{24,}",
        )
    )
)  # hex, base64: identifiers are long too, but lack digits
# A path: a token with a slash or backslash (from after any "="), or a file name.
_PATHS = re.compile(
    r"""[^\s'"`<>(),;=\[\]{}]*[/\\][^\s'"`<>(),;\[\]{}]*|[\w.-]+\.(?:txt|jsonl?|toml"""
    r"""|ya?ml|parquet|arrow|csv|tsv|gz|zst|bz2|xz|tar|zip|bin|pt|pth|safetensors|ckpt|py|sh|log)\b"""
)
_RATIO = re.compile(r"[\d.]+/[\d.]+|[A-Za-z]+/(?:s|sec|step|steps|tok|token|tokens|rank|gpu|batch)")
_KEY, _ENUM = re.compile(r"[A-Za-z_][\w.-]{0,63}"), re.compile(r"[A-Za-z0-9][\w.+:-]{0,39}")
_SET_KEY = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+){1,3}")
_WORD = r"(?<![\w-]){}(?![\w-])"
_fqdn = functools.lru_cache(maxsize=1)(socket.getfqdn)  # may be a DNS lookup: once per process


class _Scrubber:
    """What must not leave this machine, gathered at call time."""

    def __init__(self, run_paths: set[str], run_names: set[str]):
        values = {v for v in os.environ.values() if len(v) >= 6 and v not in _SAFE}  # KILN_LLM_KEY too
        self.literals = sorted(values | {json.dumps(v)[1:-1] for v in values}, key=len, reverse=True)
        hosts = {h for name in (socket.gethostname(), _fqdn()) for h in (name, name.split(".")[0])}
        self.hosts = [
            re.compile(_WORD.format(re.escape(h)), re.I)
            for h in sorted(hosts, key=len, reverse=True)
            if len(h) >= 2 and h.lower() not in ("localhost", "localhost.localdomain")
        ]
        self.paths = sorted(run_paths, key=len, reverse=True)
        self.names = [
            re.compile(_WORD.format(re.escape(n)))
            for n in sorted(run_names, key=len, reverse=True)
            if len(n) >= 2 and not n.isdigit()
        ]

    def hit(self, text: str) -> bool:
        return (
            any(v in text for v in [*self.literals, *self.paths])
            or any(h.search(text) for h in self.hosts)
            or bool(_SECRETS.search(text))
        )

    def redact(self, text: str) -> str:
        for v in [*self.paths, *self.literals]:
            text = text.replace(v, REDACTED)
        for pattern in [*self.hosts, _SECRETS]:
            text = pattern.sub(REDACTED, text)
        return text

    def clean(self, text: str, limit: int = 300) -> str | None:
        """`text` with run folders, paths and run names replaced; None if anything secret is left."""
        for p in self.paths:
            text = text.replace(p, RUN)
        text = _PATHS.sub(lambda m: m.group() if _RATIO.fullmatch(m.group()) else PATH, text)
        for n in self.names:
            text = n.sub(RUN, text)
        return None if self.hit(text) else text[:limit]

    def enum(self, v: Any) -> str | None:
        return v if isinstance(v, str) and _ENUM.fullmatch(v) and not self.hit(v) else None


def _value(v: Any, sc: _Scrubber, depth: int = 0) -> Any:
    """Evidence as JSON: numbers and bools kept, strings cleaned (None: dropped), nesting bounded."""
    if v is None or isinstance(v, (bool, int, float)):
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)  # JSON has no NaN
    if isinstance(v, str):
        return sc.clean(v)
    if isinstance(v, (list, tuple)) and depth < 4:
        return [x for x in (_value(i, sc, depth + 1) for i in v[:50]) if x is not None]
    if isinstance(v, dict) and depth < 4:
        out = {
            k: _value(x, sc, depth + 1)
            for k, x in list(v.items())[:50]
            if isinstance(k, str) and _KEY.fullmatch(k) and not sc.hit(k)
        }
        return {k: x for k, x in out.items() if x is not None}
    return None


def _argv(remedy: Any) -> list[str]:
    argv = [str(a) for a in remedy.get("argv") or []] if isinstance(remedy, dict) else []
    return argv[1:] if argv[:1] == ["kiln"] else argv


def _run_refs(findings: list[dict[str, Any]], paths: set[str]) -> tuple[set[str], set[str]]:
    """The run folders (`run`, remedies' positional RUN and --resume) and run names (theirs, --name)."""
    names: set[str] = set()
    for f in findings:
        argv = _argv(r) if isinstance(r := f.get("remedy"), dict) and r.get("kiln", True) else []
        for i, a in enumerate(argv[1:], 1):
            if argv[i - 1] in ("--resume", "--name"):
                (paths if argv[i - 1] == "--resume" else names).add(a)
            elif not a.startswith("-") and not argv[i - 1].startswith("-"):
                paths.add(a)
    for p in list(paths):
        paths.add(str(Path(p).resolve()))
        names |= {Path(p).name, Path(p).resolve().name}
    # A short relative run path ("exp3", ".") is matched as a word, never as a substring.
    return {p for p in paths if len(p) >= 4 and ("/" in p or "\\" in p)}, names - {"", ".", ".."}


def _changes(remedy: dict[str, Any], sc: _Scrubber) -> dict[str, Any]:
    """What a remedy changes: its verb, --step, --set key=values, --skip-batches; never its paths."""
    argv = _argv(remedy)
    flat = [x for a in argv[1:] for x in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    out: dict[str, Any] = {"action": sc.enum(argv[0]) if argv else None, "set": []}
    for a, nxt in zip(flat, flat[1:] + [""]):
        if a == "--set" and _SET_KEY.fullmatch(nxt.partition("=")[0]):
            key, _, val = nxt.partition("=")
            out["set"].append(f"{key}={sc.clean(val, 80) or REDACTED}")
        elif a == "--step" and nxt.isdigit():
            out["step"] = int(nxt)
        elif a == "--skip-batches" and re.fullmatch(r"\d+:\d+(?:,\d+:\d+)*", nxt):
            out["skip_batches"] = nxt
        elif a in ("--from-scratch", "--no-train", "--resume"):
            out[a[2:].replace("-", "_")] = True
    out["why"] = sc.clean(remedy["why"]) if isinstance(remedy.get("why"), str) else None
    return {k: v for k, v in out.items() if v is not None and v != []}


def _config(config: dict[str, Any], sc: _Scrubber) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, keys in _NUMBERS.items():
        if isinstance(table := config.get(section), dict):
            picked: dict[str, Any] = {
                k: v
                for k, v in table.items()
                if (keys == "*" or k in keys)
                and isinstance(v, (bool, int, float))
                and (not isinstance(v, float) or math.isfinite(v))
            }
            picked |= {k: e for k in _ENUMS.get(section, ()) if (e := sc.enum(table.get(k))) is not None}
            out |= {section: picked} if picked else {}
    return out


def _summary(summary: dict[str, Any], sc: _Scrubber) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in [(k, v) for k, v in summary.items() if isinstance(k, str) and _KEY.fullmatch(k)]:
        if isinstance(v, (bool, int, float)):
            out[k] = _value(v, sc)
        elif isinstance(v, dict):  # a level of figures (seconds_between_steps), no strings
            out[k] = {a: b for a, b in (_value(v, sc, 3) or {}).items() if not isinstance(b, str)}
        elif k in ("device", "precision", "layout") and isinstance(v, str) and (s := sc.clean(v, 80)):
            out[k] = s
    return out


def _final(d: dict[str, Any], sc: _Scrubber) -> dict[str, Any]:
    """The last pass, over the serialized digest: whatever slipped through is redacted."""

    def walk(v: Any) -> Any:
        if isinstance(v, (dict, list)):
            return {sc.redact(k): walk(x) for k, x in v.items()} if isinstance(v, dict) else [walk(x) for x in v]
        return sc.redact(v) if isinstance(v, str) else REDACTED if sc.hit(json.dumps(v)) else v

    d = walk(d) if sc.hit(json.dumps(d, sort_keys=True)) else d
    return d if not sc.hit(json.dumps(d, sort_keys=True)) else {"findings": [], "note": "digest withheld"}


def digest(
    findings: list[dict[str, Any]],
    config: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    run: str | Path | None = None,
) -> dict[str, Any]:
    """The scrubbed digest that `explain` sends; `run` (the run folder) is scrubbed too."""
    findings = [f for f in findings if isinstance(f, dict)][:50]
    config, summary = (d if isinstance(d, dict) else {} for d in (config, summary))
    sc = _Scrubber(*_run_refs(findings, {str(run)} if run is not None else set()))
    out = []
    for f in findings:
        steps = f["steps"] if isinstance(f.get("steps"), (list, tuple)) else []
        out.append(
            {
                "kind": sc.enum(f.get("kind")) or "unknown",
                "severity": sc.enum(f.get("severity")) or "unknown",
                "steps": [s for s in steps[:50] if type(s) is int],
                "summary": sc.clean(f["summary"]) if isinstance(f.get("summary"), str) else None,
                "evidence": _value(f["evidence"], sc) if isinstance(f.get("evidence"), dict) else {},
                "remedy": _changes(f["remedy"], sc) if isinstance(f.get("remedy"), dict) else None,
            }
        )
    return _final({"findings": out, "config": _config(config, sc), "summary": _summary(summary, sc)}, sc)


SYSTEM = (
    "You are an expert in LLM pretraining. Kiln's rule-based doctor diagnosed a training run; its findings, "
    "the configuration and summary follow as JSON (paths and names redacted as RUN, <path>). Explain the "
    "findings: the likely mechanism, how they relate, what to watch after the remedy. The rules' verdict on "
    "each problem's class and remedy is authoritative: never contradict it. Be brief: at most 150 words."
)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib would resend the Authorization header to wherever a redirect points


def _reason(e: BaseException, timeout_s: float) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    cause = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(e, (KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError)):
        return "a malformed answer: no JSON choices[0].message.content text"
    return str(cause)[:200] or type(cause).__name__


def explain(
    findings: list[dict[str, Any]],
    config: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    log: Callable[[str], Any] = print,
    timeout_s: float = 30.0,
    run: str | Path | None = None,
) -> str | None:
    """The LLM's explanation of the findings, or None (no KILN_LLM_URL, or it failed: one warning)."""
    url = os.environ.get("KILN_LLM_URL", "").strip()
    if not url:
        return None
    key, where = os.environ.get("KILN_LLM_KEY"), url
    try:
        parts = urllib.parse.urlsplit(url)
        where = parts.netloc.rpartition("@")[2] or url  # host:port, never user:password@
        if parts.scheme not in ("http", "https"):
            raise urllib.error.URLError("KILN_LLM_URL must start with http:// or https://")
        content = json.dumps(digest(findings, config, summary, run=run), sort_keys=True)
        body = {
            "model": os.environ.get("KILN_LLM_MODEL") or "default",
            "temperature": 0.2,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
        }
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(
            url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        local = parts.hostname in ("localhost", "127.0.0.1", "::1")  # then a proxy would only see it leave
        opener = urllib.request.build_opener(_NoRedirect(), *([urllib.request.ProxyHandler({})] if local else []))
        with opener.open(request, timeout=timeout_s) as response:
            text = json.loads(response.read(1 << 20).decode("utf-8"))["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise TypeError("no text")
        return text.strip()
    except Exception as e:  # advisory: nothing the explainer does may stop `kiln doctor`
        log(f"warning: the LLM explainer at {where} failed ({_reason(e, timeout_s)}); the rules' findings stand")
        return None


def format_explanation(text: str) -> str:
    """The answer for printing beside the findings, without terminal control characters."""
    clean = "".join(c for c in text if c in "\n\t" or c.isprintable())
    return "LLM explanation (advisory; the rules decide):\n" + "\n".join(
        "  " + line.rstrip() for line in clean.strip().splitlines()
    )
