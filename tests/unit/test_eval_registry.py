"""The suite registry: user suites from a file or KILN_SUITES, options, config validation, reports."""

import json
import math

import eval_support as es
import pytest
import torch

from kiln import plugins
from kiln.config import load_config
from kiln.errors import ConfigError, KilnError
from kiln.eval import suites as registry
from kiln.eval.runner import report_table, run_suites, save_report
from kiln.eval.suites import available_suites, load_suite_file, parse_options, register_suite
from kiln.train.resolve import check_training

USER_SUITE = '''
from kiln.eval.suites import register_suite, SuiteResult

@register_suite("{name}", options={{"scale": 2.0}})
def my_suite(ctx):
    """Counts parameters, scaled."""
    n = sum(p.numel() for p in ctx.model.parameters())
    return SuiteResult({{"params": n * ctx.options["scale"], "step": ctx.step}}, {{"note": "hello"}})
'''


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    """Suites registered by a test do not leak into others."""
    available_suites()
    before = dict(registry.SUITES)
    loaded = dict(plugins._loaded)
    for var in plugins.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    yield
    registry.SUITES.clear()
    registry.SUITES.update(before)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)


def test_builtin_suites_are_registered():
    assert list(available_suites())[:6] == ["lm", "continuation", "choice", "bias", "toxicity", "memorisation"]
    assert {n for n, s in available_suites().items() if s.generates} == {"continuation", "toxicity", "memorisation"}


def test_user_suite_from_a_file(tmp_path):
    path = tmp_path / "my_suites.py"
    path.write_text(USER_SUITE.format(name="params"))
    load_suite_file(path)
    assert "params" in available_suites() and available_suites()["params"].help == "Counts parameters, scaled."
    tok = es.tokenizer()
    cfg = es.config(tmp_path)
    model = es.model(cfg, tok)
    report = run_suites(
        es.context(cfg, model, tok, step=3), ["params"], parse_options(["params.scale=0.5"], available_suites())
    )
    assert report["suites"]["params"] == {"params": sum(p.numel() for p in model.parameters()) * 0.5, "step": 3}
    out = save_report(tmp_path, report)
    saved = json.loads(out.read_text())
    assert out == tmp_path / "eval" / "step-3.json" and saved["step"] == 3
    assert json.loads((tmp_path / "eval" / saved["artifacts"]["params"]).read_text()) == {"note": "hello"}


@pytest.mark.parametrize("var", ["KILN_SUITES", "KILN_PLUGINS"])
def test_user_suite_from_the_environment_names_it_in_config(tmp_path, monkeypatch, var):
    path = tmp_path / f"env_suites_{var}.py"
    path.write_text(USER_SUITE.format(name=f"from-{var}"))
    cfg = load_config(preset="tiny", overrides=[f'eval.suites=["lm", "from-{var}"]'])  # parses: names wait
    with pytest.raises(ConfigError, match=f"unknown suite 'from-{var}'.*KILN_SUITES"):
        check_training(cfg)
    monkeypatch.setenv(var, str(path))
    check_training(cfg)  # the plugin named by the environment registered it
    assert cfg.eval.suites == ["lm", f"from-{var}"]
    assert load_config(preset="tiny").eval.suites == []  # training unchanged by default


def test_kiln_suites_module_that_does_not_exist(monkeypatch):
    monkeypatch.setenv("KILN_SUITES", "no_such_module_for_kiln")
    with pytest.raises(KilnError, match="KILN_SUITES: plugin 'no_such_module_for_kiln' cannot be imported"):
        plugins.load_plugins()


def test_a_class_can_be_a_suite(tmp_path):
    @register_suite("as-class")
    class Twice:
        """Doubles the step."""

        def __call__(self, ctx):
            return {"twice": 2 * ctx.step}

    tok = es.tokenizer()
    cfg = es.config(tmp_path)
    assert run_suites(es.context(cfg, es.model(cfg, tok), tok, step=4), ["as-class"])["suites"]["as-class"] == {
        "twice": 8
    }


@pytest.mark.parametrize(
    "item, message",
    [
        ("choice.tasks", "expected SUITE.KEY=VALUE"),
        ("nosuch.key=1", "unknown suite 'nosuch'"),
        ("choice.nokey=1", "suite 'choice' has no option 'nokey'; its options: choice.tasks"),
        ("choice.cloze_items=many", "must be an integer"),
        ("choice.cloze=1", "true or false"),
    ],
)
def test_bad_options(item, message):
    with pytest.raises(KilnError, match=message):
        parse_options([item], available_suites())


def test_options_are_typed():
    opts = parse_options(
        [
            "choice.tasks=a.jsonl",
            "choice.cloze=false",
            "toxicity.temperature=1",
            "bias.pairs=/x/crows pairs.csv",
            "memorisation.samples=8",
        ],
        available_suites(),
    )
    assert opts == {
        "choice": {"tasks": ["a.jsonl"], "cloze": False},
        "toxicity": {"temperature": 1.0},
        "bias": {"pairs": "/x/crows pairs.csv"},
        "memorisation": {"samples": 8},
    }


def test_reports_merge_and_never_hold_nan(tmp_path):
    save_report(tmp_path, {"step": 5, "suites": {"a": {"x": 1.0}}, "skipped": {"b": "why"}, "seconds": {"a": 0.1}})
    path = save_report(tmp_path, {"step": 5, "suites": {"b": {"y": None}}, "skipped": {}, "seconds": {"b": 0.2}})
    saved = json.loads(path.read_text())
    assert saved["suites"] == {"a": {"x": 1.0}, "b": {"y": None}} and saved["skipped"] == {}
    assert set(saved["seconds"]) == {"a", "b"}


def test_non_finite_metrics_become_null(tmp_path):
    @register_suite("nan-suite")
    def nan_suite(ctx):
        return {"nan": math.nan, "n": 3, "t": torch.tensor(0.5)}

    tok = es.tokenizer()
    cfg = es.config(tmp_path)
    report = run_suites(es.context(cfg, es.model(cfg, tok), tok), ["nan-suite"])
    assert report["suites"]["nan-suite"] == {"nan": None, "n": 3, "t": 0.5}
    report_table(report, "t")  # renders


def test_unknown_suite_is_a_kiln_error(tmp_path):
    tok = es.tokenizer()
    cfg = es.config(tmp_path)
    with pytest.raises(KilnError, match="unknown suite 'nope'; registered suites: lm, continuation"):
        run_suites(es.context(cfg, es.model(cfg, tok), tok), ["nope"])
