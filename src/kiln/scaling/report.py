"""Printing and drawing a scaling fit: the law, its intervals, compute-optimal exponents, both
approaches side by side, and a PNG of points, fitted curves, IsoFLOP parabolas and the frontier."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kiln.scaling.law import NAMES, Law, Point, shape_for


def describe(law: Law) -> str:
    def ci(name: str) -> str:
        lo_hi = law.intervals.get(name)
        return f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""

    lines = [
        f"L(N, D) = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.4g} + {law.B:.4g} / D^{law.beta:.4g}   "
        f"({law.n_points} points, Huber {law.huber:.3g})",
        "95% bootstrap intervals: " + ", ".join(f"{n}{ci(n)}" for n in NAMES if law.intervals.get(n)),
    ]
    e_lo, e_hi = law.intervals.get("E", (law.E, law.E))
    if e_hi > 0 and e_lo < 0.05 * e_hi:
        # Every CPU ladder in BENCHMARKS ("Scaling laws") did this; their point predictions then moved
        # by several percent with the ladder's design while the interval held: say so where it is read.
        lines.append(
            f"warning: E is not identified (its 95% interval runs from {e_lo:.2g} to {e_hi:.3g}): these "
            "points cannot separate the irreducible loss from slow power laws, so predictions far "
            "beyond them are uncertain; trust the interval, not the point value"
        )
    tradeoff = law.alpha > 0 and law.beta > 0
    if tradeoff:
        a, b = law.exponents
        lines.append(f"compute-optimal (approach 3): N* ∝ C^{a:.3f}, D* ∝ C^{b:.3f}")
    else:
        lines.append(
            f"warning: alpha = {law.alpha:.3g}, beta = {law.beta:.3g}: the points do not show loss falling "
            "with both size and tokens, so there is no compute-optimal trade-off (more or larger runs?)"
        )
    if law.isoflop:
        iso = law.isoflop
        if iso.get("n_opt"):
            lines.append(
                f"compute-optimal (approach 2, {iso['n_opt'].get('groups', len(iso['groups']))} of "
                f"{len(iso['groups'])} IsoFLOP groups): N* ∝ C^{iso['n_opt']['exponent']:.3f}, "
                f"D* ∝ C^{iso['d_opt']['exponent']:.3f}"
            )
        else:
            lines.append(f"compute-optimal (approach 2): none; {iso.get('note', 'too few IsoFLOP groups')}")
        for g in iso["groups"]:
            six_nd = g.get("compute_6nd", g["compute"])
            approach3 = f"; approach 3 N* = {law.optimal(six_nd)[0]:.3g}" if tradeoff else ""
            lines.append(
                f"  C = {g['compute']:.3g} (6ND {six_nd:.3g}): parabola N* = {g['n_opt']:.3g} (loss "
                f"{g['loss_opt']:.4f}{'' if g['minimum_inside'] else ', minimum outside the sizes tried'})" + approach3
            )
    return "\n".join(lines)


def recommend(law: Law, compute: float) -> str:
    n, d = law.optimal(compute)
    lo, hi = law.interval(n, d)
    shape = shape_for(n)
    sets = " ".join(f"--set model.{k}={v}" for k, v in shape.items()) + f" --set train.tokens={int(d)}"
    return (
        f"compute {compute:.4g} FLOPs: N* = {n:.4g} non-embedding parameters, D* = {d:.4g} tokens; predicted loss "
        f"{law.loss(n, d):.4f} [{lo:.4f}, {hi:.4f}]\n"
        f"  a shape for it ({12 * shape['n_layers'] * shape['d_model'] ** 2:.3g}"
        f" parameters by 12 L d^2): kiln train {sets}"
    )


def plot(law: Law, points: list[Point], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    computes = [6.0 * p.params * p.tokens for p in points]  # the law's own accounting, as its frontier
    c_lo, c_hi = min(computes) / 3, max(computes) * 30
    cs = np.logspace(math.log10(c_lo), math.log10(c_hi), 60)
    frontier = [law.loss(*law.optimal(c)) for c in cs] if law.alpha > 0 and law.beta > 0 else None
    scatter = left.scatter(
        computes, [p.loss for p in points], c=np.log10([p.params for p in points]), cmap="viridis", s=22, zorder=3
    )
    fig.colorbar(scatter, ax=left, label="log10 N")
    if frontier is not None:
        left.plot(cs, frontier, "k--", label="compute-optimal frontier (fit)")
    left.set(xscale="log", xlabel="6 N D (non-embedding N)", ylabel="validation loss", title="loss vs compute")
    if frontier is not None:
        left.legend(fontsize=8)
    ns = np.logspace(math.log10(min(p.params for p in points) / 2), math.log10(max(p.params for p in points) * 2), 60)
    groups = (law.isoflop or {}).get("groups", [])
    for i, g in enumerate(groups):
        colour = plt.cm.plasma(i / max(1, len(groups) - 1))
        members = [p for p in points if abs(p.compute / g["compute"] - 1) <= 0.05]
        right.scatter([p.params for p in members], [p.loss for p in members], color=colour, s=22, zorder=3)
        right.plot(ns, np.polyval(g["parabola"], np.log(ns)), color=colour, lw=1, label=f"C = {g['compute']:.2g}")
        members = sorted(members, key=lambda p: p.params)  # the fit at the group's own (N, D)
        right.plot(
            [p.params for p in members],
            [law.loss(p.params, p.tokens) for p in members],
            color=colour,
            lw=1,
            ls=":",
            marker="x",
        )
    if not groups:
        right.scatter([p.params for p in points], [p.loss for p in points], s=22)
    right.set(
        xscale="log",
        xlabel="non-embedding parameters N",
        ylabel="validation loss",
        title="IsoFLOP parabolas (solid) and the fit at the same points (dotted)",
    )
    if groups:
        right.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
