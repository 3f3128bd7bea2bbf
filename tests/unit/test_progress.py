"""Long work shows its rate and ETA (kiln.progress): lines when output is not a terminal, with a
second count's rate (tokens written while megabytes of text are read) when one is given."""

from __future__ import annotations

import re

from kiln import progress


def test_lines_show_rate_eta_and_a_second_rate(monkeypatch, capsys):
    monkeypatch.setenv("KILN_QUIET", "0")
    monkeypatch.setattr(progress, "console", progress.Console(file=progress.sys.stdout, force_terminal=False))
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    written = [0.0]

    def items():
        for i in range(4):
            written[0] += 1000.0
            yield i

    out = list(progress.progress_bar(items(), "tokenising", unit="MB", every_s=0.0, weight=lambda _: 2.0,
                                     total=8.0, extra=(lambda: written[0], "tokens")))  # fmt: skip
    assert out == [0, 1, 2, 3]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert re.match(r"tokenising: 2/8 MB \([\d,.]+ MB/s, [\d,]+ tokens/s\), ETA \d", lines[0]), lines[0]
