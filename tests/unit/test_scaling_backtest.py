"""The backtest of a scaling fit: fit without the largest-compute points, predict them."""

from __future__ import annotations

import json

import pytest
from test_scaling_law import LADDER_E, chinchilla_points

from kiln.cli import main
from kiln.errors import ConfigError
from kiln.scaling.backtest import backtest, describe_backtest, split
from kiln.scaling.law import Point


def test_a_law_of_the_right_form_predicts_its_own_top_budget():
    points = chinchilla_points()
    rest, held = split(points)
    top = max(p.compute for p in points)
    assert held and all(p.compute > 0.9 * top for p in held) and len(rest) + len(held) == len(points)
    result = backtest(points, bootstrap=8)
    assert result["fit_points"] == len(rest) and len(result["held_out"]) == len(held)
    assert result["extrapolation"] > 3  # the grid's budgets are 10^0.75 apart
    assert result["mean_abs_error"] < 0.01  # 1% noise on the points
    assert result["inside"] >= len(held) - 1
    text = describe_backtest(result)
    assert f"predicting the {len(held)} largest" in text and "interval held" in text


def test_a_top_budget_off_the_law_is_caught():
    """The largest budget's losses 8% above the law: the law fitted below it must miss them all, by
    about as much, and its intervals (which see only the points' noise) must not hold them."""
    points = chinchilla_points()
    _, held = split(points)
    shifted = [Point(p.params, p.tokens, p.loss * (1.08 if p in held else 1.0)) for p in points]
    result = backtest(shifted, bootstrap=8)
    assert all(-0.09 < r["error"] < -0.06 for r in result["held_out"])
    assert result["inside"] == 0


def test_without_iso_groups_the_largest_quarter_is_held_out():
    points = [Point(n, d, 2 + 400 / n**0.3 + 400 / d**0.3) for n in (1e6, 3e6, 1e7) for d in (1e8, 3e8, 1e9)]
    rest, held = split(points)
    # a quarter of 9 is 2: the largest (1e7 x 1e9), then 3e15, which two points share; ties go together
    assert len(held) == 3 and min(p.compute for p in held) > max(p.compute for p in rest)


def test_too_few_points_left_is_a_clear_error_and_the_cli_still_fits(tmp_path, capsys):
    """Ladder E: two IsoFLOP groups of 4; without the larger, 4 points cannot fit 5 constants."""
    longest = {n: max(d for m, d, _ in LADDER_E if m == n) for n, _, _ in LADDER_E}
    rows = [(n, d, loss, 2.05e12 if d == longest[n] else 6.86e11) for n, d, loss in LADDER_E]  # its budgets
    with pytest.raises(ConfigError, match="no backtest: without the 4 largest"):
        backtest([Point(*row) for row in rows], bootstrap=2)
    csv = tmp_path / "p.csv"
    csv.write_text("params,tokens,loss,flops\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    assert (
        main(
            [
                "scaling",
                "fit",
                "--points",
                str(csv),
                "--backtest",
                "--bootstrap",
                "2",
                "--json",
                str(tmp_path / "f.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "L(N, D) =" in out and "no backtest" in out
    assert "skipped" in json.loads((tmp_path / "f.json").read_text())["backtest"]


def test_cli_writes_the_backtest_into_the_fit_json(tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("params,tokens,loss\n" + "".join(f"{p.params},{p.tokens},{p.loss}\n" for p in chinchilla_points()))
    assert (
        main(
            [
                "scaling",
                "fit",
                "--points",
                str(csv),
                "--backtest",
                "--bootstrap",
                "2",
                "--json",
                str(tmp_path / "f.json"),
            ]
        )
        == 0
    )
    assert "backtest: fitted on the" in capsys.readouterr().out
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["backtest"]["mean_abs_error"] < 0.02 and saved["n_points"] == len(chinchilla_points())
    assert main(["scaling", "predict", str(tmp_path / "f.json"), "--params", "1e9", "--tokens", "2e10"]) == 0
