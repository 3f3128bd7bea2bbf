"""Scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta, and compute-optimal sizes.

Approach 3 of Hoffmann et al. (2022), as corrected by Besiroglu et al. (2024): minimise the Huber
loss (delta = 1e-3) of log-space residuals,
    log L_hat = logsumexp(a - alpha log N, b - beta log D, e),  A = e^a, B = e^b, E = e^e,
with L-BFGS from the best points of a grid of starting values (every grid point is scored at
once; the best few, and the best of each (alpha, beta) pair, are refined), and bootstrap
intervals: the fit repeated on resampled points, each refined from the full fit's optimum (and,
where its E is near 0, from it with E moved up).

Approach 2: points that share a compute budget (an IsoFLOP group) get a parabola of loss in
log N; its minimum is the group's optimal N*, and N*(C), D*(C) are power laws fitted across
groups. N counts non-embedding parameters and D training tokens; C is the training compute.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.errors import ConfigError

NAMES = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
REFINE = 12  # grid points refined by L-BFGS
BOOTSTRAP = 100  # resamples
MAX_LOG = 700.0  # log A, log B, log E beyond this do not fit in a float64 once exponentiated
ISO_TOLERANCE = 0.05  # points whose compute differs by less than this share an IsoFLOP group


@dataclass
class Point:
    params: float  # non-embedding parameters N
    tokens: float  # training tokens D
    loss: float
    flops: float = 0.0  # training compute C (0: 6 N D)
    name: str = ""

    @property
    def compute(self) -> float:
        return self.flops or 6.0 * self.params * self.tokens


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, list[float]] = field(default_factory=dict)  # name -> [2.5%, 97.5%]
    n_points: int = 0
    huber: float = 0.0
    bootstrap: list[list[float]] = field(default_factory=list)  # [E, A, B, alpha, beta] per resample
    isoflop: dict[str, Any] | None = None

    def loss(self, params: float, tokens: float) -> float:
        return _safe_loss([self.E, self.A, self.B, self.alpha, self.beta], params, tokens)

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N*, D*) minimising the loss at compute C = 6 N D."""
        a, b = self.alpha, self.beta
        if a <= 0 or b <= 0:
            raise ConfigError(f"the fit has alpha = {a:.3g}, beta = {b:.3g}: no compute-optimal trade-off exists")
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * (compute / 6.0) ** (b / (a + b))
        return n, compute / (6.0 * n)

    @property
    def exponents(self) -> tuple[float, float]:
        """N* ∝ C^a and D* ∝ C^b."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def interval(self, params: float, tokens: float) -> tuple[float, float]:
        """The 2.5%-97.5% range of the bootstrap fits' predictions."""
        if not self.bootstrap:
            value = self.loss(params, tokens)
            return value, value
        values = [_safe_loss(row, params, tokens) for row in self.bootstrap]
        bounds = np.percentile(values, [2.5, 97.5])
        if not np.isfinite(bounds).all():  # interpolating towards a resample's inf gives NaN: take the nearest
            bounds = np.percentile(values, [2.5, 97.5], method="nearest")
        return float(bounds[0]), float(bounds[1])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["exponents"] = {"params": self.exponents[0], "tokens": self.exponents[1]}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Law:
        try:
            return cls(
                **{k: d[k] for k in ("E", "A", "B", "alpha", "beta")},
                **{k: d[k] for k in ("intervals", "n_points", "huber", "bootstrap", "isoflop") if k in d},
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not a scaling fit (kiln scaling fit --json): {e}") from None


def _safe_loss(row: list[float], params: float, tokens: float) -> float:
    """E + A/N^alpha + B/D^beta for a row [E, A, B, alpha, beta], in log space: a wild fit (alpha = 200
    on a narrow grid, or far beyond the points) gives inf, not an overflow."""
    e, a, b, al, be = row
    terms = [
        math.log(a) - al * math.log(params) if a > 0 else -math.inf,
        math.log(b) - be * math.log(tokens) if b > 0 else -math.inf,
    ]
    return e + sum(math.exp(t) if t < 700 else math.inf for t in terms)


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.where(r.abs() <= delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta))


def _objective(
    theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor, delta: float
) -> torch.Tensor:
    """Summed Huber loss for parameter rows theta (..., 5) = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack(
        [
            a[..., None] - alpha[..., None] * log_n,
            b[..., None] - beta[..., None] * log_d,
            e[..., None].expand(*e.shape, log_n.shape[0]),
        ],
        dim=-1,
    )
    return _huber(torch.logsumexp(terms, dim=-1) - log_l, delta).sum(-1)


def _value_and_grad(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """`_objective` of one row and its gradient, in closed form and numpy: L-BFGS evaluates it ~300
    times a start, and autograd's graph over a few dozen points cost 3x the arithmetic."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=-1)
    top = terms.max(-1, keepdims=True)
    if not np.all(np.isfinite(top)):
        return math.inf, np.full(5, math.nan)
    weights = np.exp(terms - top)
    total = weights.sum(-1)
    r = top[:, 0] + np.log(total) - log_l
    share = weights / total[:, None]  # d logsumexp / d term
    slope = np.clip(r, -delta, delta)  # Huber's derivative
    value = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    w_a, w_b, w_e = (slope[:, None] * share).T
    grad = np.array([w_a.sum(), w_b.sum(), w_e.sum(), -(w_a * log_n).sum(), -(w_b * log_d).sum()])
    return float(value), grad


def _refine(
    start: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], delta: float
) -> tuple[torch.Tensor, float]:
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    log_n, log_d, log_l = (t.numpy() for t in data)

    def closure() -> torch.Tensor:
        value, grad = _value_and_grad(theta.detach().numpy(), log_n, log_d, log_l, delta)
        theta.grad = torch.from_numpy(grad)
        return torch.tensor(value, dtype=torch.float64)

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, *data, delta))
    return theta.detach(), value if math.isfinite(value) else math.inf


def _fit_once(
    points: list[Point], starts: torch.Tensor, delta: float, refine: int = REFINE
) -> tuple[torch.Tensor, float]:
    log_n, log_d, log_l = (
        torch.tensor([math.log(getattr(p, k)) for p in points], dtype=torch.float64)
        for k in ("params", "tokens", "loss")
    )
    data = (log_n, log_d, log_l)
    with torch.no_grad():
        scores = _objective(starts, *data, delta)
    chosen = set(torch.argsort(scores)[:refine].tolist())
    if len(starts) > refine:
        # The best-scored starts crowd into one basin; on flat landscapes (E unidentified) L-BFGS from them
        # stopped in a local minimum whose prediction was 12% from the global one, and which one depended
        # on the points' order. The best start of every (alpha, beta) pair of the grid is refined too.
        best_of: dict[tuple[float, float], int] = {}
        for i, key in enumerate(map(tuple, starts[:, 3:].tolist())):
            if key not in best_of or scores[i] < scores[best_of[key]]:
                best_of[key] = i
        chosen |= set(best_of.values())
    results = [_refine(starts[i], data, delta) for i in sorted(chosen)]
    return min(results, key=lambda r: r[1])


def check_points(points: list[Point]) -> None:
    if len(points) < len(NAMES) + 1:
        raise ConfigError(
            f"{len(points)} point(s) cannot fit a law of {len(NAMES)} parameters; give at least "
            f"{len(NAMES) + 1} (runs of several sizes and token budgets)"
        )
    bad = [
        p.name or f"row {i + 1}"
        for i, p in enumerate(points)
        if not all(math.isfinite(v) and v > 0 for v in (p.params, p.tokens, p.loss))
    ]
    if bad:
        raise ConfigError(f"params, tokens and loss must be finite and positive; not so in {', '.join(bad[:5])}")
    if len({p.params for p in points}) < 2 or len({p.tokens for p in points}) < 2:
        raise ConfigError(
            "the points need at least two model sizes and two token budgets to separate A/N^alpha from B/D^beta"
        )


def fit(
    points: list[Point],
    bootstrap: int = BOOTSTRAP,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    progress: Callable[[str], None] | None = None,
    progress_s: float = 5.0,
) -> Law:
    """The Huber fit with bootstrap intervals, and the IsoFLOP analysis where groups exist.
    `progress` gets a line every `progress_s` seconds while the bootstrap runs (it can take a minute)."""
    check_points(points)
    points = sorted(points, key=lambda p: (p.params, p.tokens, p.loss))  # the same fit whatever the listing order
    grid = torch.tensor(
        [
            (a, b, e, al, be)
            for al, be, e, a, b in itertools.product(GRID["alpha"], GRID["beta"], GRID["e"], GRID["a"], GRID["b"])
        ],
        dtype=torch.float64,
    )
    theta, value = _fit_once(points, grid, delta)
    if max(theta[:3].tolist()) > MAX_LOG:
        a, b, e, alpha, beta = theta.tolist()
        raise ConfigError(
            f"the fit ran away (log A = {a:.3g}, log B = {b:.3g}, alpha = {alpha:.3g}, beta = {beta:.3g}): "
            "these points do not follow E + A/N^alpha + B/D^beta; give more sizes and token budgets, "
            "or runs long enough to be past the start of training"
        )
    law = _law(theta, len(points), value)
    rng = np.random.default_rng(seed)
    # Each resample is refined from the full fit's optimum. Where that optimum has E near 0, the E term
    # has no gradient there and every resample would stay at E = 0 (a collapsed interval), so the
    # resamples also start from it with E at half the lowest loss.
    starts = theta[None]
    lowest = min(p.loss for p in points)
    if law.E < 0.01 * lowest:
        with_e = theta.clone()
        with_e[2] = math.log(0.5 * lowest)
        starts = torch.stack([theta, with_e])
    samples = []
    started = last = time.perf_counter()
    for done in range(bootstrap):
        now = time.perf_counter()
        if progress is not None and done and now - last >= progress_s:
            last = now
            eta = (now - started) / done * (bootstrap - done)
            progress(f"bootstrap {done}/{bootstrap} resamples, {now - started:.0f} s, ETA {eta:.0f} s")
        picked = [points[i] for i in rng.integers(0, len(points), len(points))]
        if len({p.params for p in picked}) < 2 or len({p.tokens for p in picked}) < 2:
            continue
        t, _ = _fit_once(picked, starts, delta, refine=len(starts))
        samples.append(_law(t, len(picked), 0.0))
    law.bootstrap = [[s.E, s.A, s.B, s.alpha, s.beta] for s in samples]
    if samples:
        for i, name in enumerate(NAMES):
            column = [row[i] for row in law.bootstrap]
            law.intervals[name] = [float(np.percentile(column, 2.5)), float(np.percentile(column, 97.5))]
    law.isoflop = isoflop(points)
    return law


def _law(theta: torch.Tensor, n: int, value: float) -> Law:
    # A runaway resample (log A past what a float holds) is kept at the largest value, not an overflow:
    # its predictions are then extreme, which is what the interval should see.
    a, b, e, alpha, beta = theta.tolist()
    a, b, e = min(a, MAX_LOG), min(b, MAX_LOG), min(e, MAX_LOG)
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, n_points=n, huber=value)


# ----------------------------------------------------------------------------- approach 2
def isoflop_groups(points: list[Point]) -> list[list[Point]]:
    """Points grouped by compute (within ISO_TOLERANCE of the group's first), groups of >= 3 sizes."""
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.compute):
        if groups and abs(p.compute / groups[-1][0].compute - 1) <= ISO_TOLERANCE:
            groups[-1].append(p)
        else:
            groups.append([p])
    return [g for g in groups if len({p.params for p in g}) >= 3]


def isoflop(points: list[Point]) -> dict[str, Any] | None:
    """Each group's parabola in log N and its minimum; N*(C) and D*(C) as power laws."""
    groups = isoflop_groups(points)
    if len(groups) < 2:
        return None
    rows = []
    for g in groups:
        x = np.log([p.params for p in g])
        y = np.array([p.loss for p in g])
        c2, c1, c0 = np.polyfit(x, y, 2)
        compute = float(np.mean([p.compute for p in g]))
        inside = c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max()
        n_opt = float(math.exp(-c1 / (2 * c2))) if c2 > 0 else float(g[int(np.argmin(y))].params)
        rows.append(
            {
                "compute": compute,
                "compute_6nd": float(np.mean([6 * p.params * p.tokens for p in g])),
                "parabola": [float(c2), float(c1), float(c0)],
                "n_opt": n_opt,
                "d_opt": compute / (6.0 * n_opt),
                "loss_opt": float(np.polyval([c2, c1, c0], math.log(n_opt))),
                "minimum_inside": bool(inside),
                "points": len(g),
            }
        )
    # A parabola's minimum outside the sizes tried is an extrapolation (an upward-open fit can put it
    # orders of magnitude away): the power laws use only the groups whose minimum the sizes bracket.
    inside = [r for r in rows if r["minimum_inside"]]
    if len(inside) < 2:
        return {
            "groups": rows,
            "n_opt": None,
            "d_opt": None,
            "note": f"{len(inside)} of {len(rows)} IsoFLOP groups have their minimum inside the sizes tried; "
            "N*(C) needs two (add sizes around each budget's best)",
        }
    log_c = np.log([r["compute"] for r in inside])
    laws = {}
    for key in ("n_opt", "d_opt"):
        exponent, log_coefficient = np.polyfit(log_c, np.log([r[key] for r in inside]), 1)
        laws[key] = {
            "exponent": float(exponent),
            "coefficient": float(math.exp(log_coefficient)),
            "groups": len(inside),
        }
    return {"groups": rows, **laws}


# ----------------------------------------------------------------------------- shapes
HEAD_DIM = 64
ASPECT = 64  # d_model / n_layers, near the tiny presets' and Kaplan et al.'s flat optimum


SMALL_HEAD_DIM = 32  # below a width of 256, heads of 32 keep neighbouring sizes distinct


def shape_for(params: float) -> dict[str, int]:
    """A transformer shape with about `params` non-embedding parameters (12 L d^2: attention 4 d^2
    plus a 4d GELU MLP or a SwiGLU of the same size): n_layers from d_model = ASPECT x n_layers,
    then d_model solved for the count and rounded to a multiple of the head size (HEAD_DIM, or
    SMALL_HEAD_DIM below a width of 256), heads of that size."""
    layers = max(1, round((params / (12 * ASPECT**2)) ** (1 / 3)))
    exact = math.sqrt(params / (12 * layers))
    head = HEAD_DIM if exact >= 256 else SMALL_HEAD_DIM
    d_model = max(head, head * round(exact / head))
    return {"n_layers": layers, "d_model": d_model, "n_heads": d_model // head}
