"""Scaling laws read from a sweep: a metric against training compute, the fits' uncertainty, and the
compute-optimal shape per FLOP budget (the DFGR paper's "optimal parameter allocation under
computational constraints"; Kaplan et al. 2020 and Hoffmann et al. 2022 for the forms and the method).

Pure numpy, so a benchmark or a notebook can fit a sweep's rows without building a model. Forms, with
``C`` the training FLOPs and ``C0`` a reference compute (default: the geometric mean of the points) that
keeps the coefficients well conditioned:

* ``loglinear``:  y = alpha + beta * log10(C / C0)       (DFGR: G-AUC rises linearly in log compute)
* ``saturating``: y = y_inf + a * (C / C0)^(-b),  b > 0   (L(C) = L_inf + a C^-b; a < 0 for a metric that
  rises to a ceiling, such as AUC)
* ``power``:      y = k * x^p, fitted in log-log space     (e.g. the best history length against the budget)

The saturating law is fitted by variable projection: for a fixed ``b`` it is linear in (y_inf, a), so
``b`` is searched on a log grid and refined by golden-section search; a ``b`` that ends on the edge of
its range is reported (``at_bound``) because then the data do not pin the curvature down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

B_RANGE = (1e-3, 3.0)  # exponents the saturating law may take


@dataclass(frozen=True)
class Fit:
    """One fitted law: its form, coefficients, R² over all points, and how many points/designs it used."""

    form: str  # "loglinear", "saturating" or "power"
    params: dict[str, float]
    r2: float
    points: int  # observations (every seed counts)
    designs: int  # distinct x values
    c0: float = 1.0  # reference compute of loglinear / saturating
    at_bound: bool = False  # saturating: b at the edge of B_RANGE
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95 % bootstrap intervals, when computed

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        p = self.params
        if self.form == "loglinear":
            return p["alpha"] + p["beta"] * np.log10(x / self.c0)
        if self.form == "saturating":
            return p["y_inf"] + p["a"] * (x / self.c0) ** (-p["b"])
        if self.form == "power":
            return p["k"] * x ** p["p"]
        raise ValueError(f"unknown form {self.form!r}")

    def to_dict(self) -> dict:
        return {"form": self.form, "params": self.params, "r2": self.r2, "points": self.points,
                "designs": self.designs, "c0": self.c0, "at_bound": self.at_bound,
                "ci95": {k: list(v) for k, v in self.ci.items()}}


def _checked(x, y, min_designs: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: {len(x)} x values but {len(y)} y values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what}: x and y must be finite (got NaN or inf)")
    if (x <= 0).any():
        raise ValueError(f"{what}: x must be positive (compute, sizes), got {x[x <= 0][:3].tolist()}")
    designs = len(np.unique(x))
    if designs < min_designs:
        raise ValueError(f"{what}: needs at least {min_designs} distinct x values, got {designs}")
    return x, y


def r_squared(y, y_hat) -> float:
    """1 - SS_res / SS_tot; NaN when y is constant."""
    y, y_hat = np.asarray(y, dtype=np.float64), np.asarray(y_hat, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - y_hat) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def geometric_mean(x) -> float:
    return float(np.exp(np.log(np.asarray(x, dtype=np.float64)).mean()))


def fit_loglinear(compute, y, c0: float | None = None) -> Fit:
    """y = alpha + beta * log10(C / C0) by least squares (3 distinct compute values at least)."""
    c, y = _checked(compute, y, 3, "log-linear fit")
    c0 = geometric_mean(c) if c0 is None else float(c0)
    design = np.stack([np.ones_like(c), np.log10(c / c0)], axis=1)  # [P, 2]
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    fit = Fit("loglinear", {"alpha": float(alpha), "beta": float(beta)}, 0.0, len(c), len(np.unique(c)), c0)
    return _with_r2(fit, c, y)


def _linear_given_b(u: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """(y_inf, a, SSE) of y = y_inf + a * u^-b for fixed b (u = C / C0)."""
    design = np.stack([np.ones_like(u), u ** (-b)], axis=1)  # [P, 2]
    (y_inf, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(y_inf), float(a), float(((design @ np.array([y_inf, a]) - y) ** 2).sum())


def fit_saturating(compute, y, c0: float | None = None, b_range: tuple[float, float] = B_RANGE) -> Fit:
    """y = y_inf + a * (C / C0)^(-b) with b in ``b_range`` (4 distinct compute values at least: 3 coefficients
    and one degree of freedom)."""
    c, y = _checked(compute, y, 4, "saturating power-law fit")
    c0 = geometric_mean(c) if c0 is None else float(c0)
    u = c / c0
    lo, hi = math.log(b_range[0]), math.log(b_range[1])
    grid = np.linspace(lo, hi, 241)
    sse = np.array([_linear_given_b(u, y, math.exp(g))[2] for g in grid])
    best = int(np.argmin(sse))
    # golden-section search on log b between the grid neighbours of the best grid point
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = right - ratio * (right - left), left + ratio * (right - left)
        if _linear_given_b(u, y, math.exp(m1))[2] <= _linear_given_b(u, y, math.exp(m2))[2]:
            right = m2
        else:
            left = m1
    log_b = (left + right) / 2
    if _linear_given_b(u, y, math.exp(log_b))[2] > sse[best]:
        log_b = grid[best]
    b = math.exp(log_b)
    y_inf, a, _ = _linear_given_b(u, y, b)
    at_bound = bool(log_b - lo < 1e-6 + (grid[1] - grid[0]) or hi - log_b < 1e-6 + (grid[1] - grid[0]))
    fit = Fit("saturating", {"y_inf": y_inf, "a": a, "b": b}, 0.0, len(c), len(np.unique(c)), c0, at_bound)
    return _with_r2(fit, c, y)


def fit_power(x, y) -> Fit:
    """y = k * x^p by least squares on (log x, log y); y must be positive (2 distinct x values at least)."""
    x, y = _checked(x, y, 2, "power-law fit")
    if (y <= 0).any():
        raise ValueError(f"power-law fit: y must be positive, got {y[y <= 0][:3].tolist()}")
    design = np.stack([np.ones_like(x), np.log(x)], axis=1)
    (log_k, p), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    fit = Fit("power", {"k": float(math.exp(log_k)), "p": float(p)}, 0.0, len(x), len(np.unique(x)))
    return _with_r2(fit, x, y)


FORMS: dict[str, Callable[..., Fit]] = {"loglinear": fit_loglinear, "saturating": fit_saturating}


def _with_r2(fit: Fit, x: np.ndarray, y: np.ndarray) -> Fit:
    return replace(fit, r2=r_squared(y, fit.predict(x)))


def bootstrap_over_seeds(compute, y, form: str, replicates: int = 1000, seed: int = 0,
                         design: Sequence | None = None) -> Fit:
    """The ``form`` fit of all points, with 95 % percentile intervals of its coefficients from resampling,
    within every design point, its seeds' observations (compute and metric together) with replacement.
    ``design`` labels each observation's design point (a shape, say: under early stopping its seeds reach
    different compute); by default observations of equal compute form one design point. With one
    observation per design point there is nothing to resample: the intervals stay empty. Replicates whose
    fit fails (a sample with too few distinct compute values) are dropped."""
    c, y = _checked(compute, y, 2, f"{form} bootstrap")
    fit = FORMS[form](c, y)
    labels = np.asarray(c if design is None else [str(d) for d in design])
    if len(labels) != len(c):
        raise ValueError(f"{form} bootstrap: {len(labels)} design labels for {len(c)} points")
    groups = [np.flatnonzero(labels == v) for v in np.unique(labels)]
    if all(len(g) < 2 for g in groups):
        return fit
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in fit.params}
    for _ in range(replicates):
        pick = np.concatenate([rng.choice(g, len(g), replace=True) for g in groups])
        try:
            rep = FORMS[form](c[pick], y[pick], c0=fit.c0)
        except (ValueError, np.linalg.LinAlgError):
            continue
        for k, v in rep.params.items():
            samples[k].append(v)
    ci = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in samples.items() if v}
    return replace(fit, ci=ci)


def pareto_frontier(cost: Sequence[float], value: Sequence[float], maximize: bool = True) -> list[int]:
    """Indices of the points no other point beats at no more cost, in increasing cost: each one is better
    than every cheaper point (ties in cost keep the better value only)."""
    cost = np.asarray(cost, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64) * (1.0 if maximize else -1.0)
    order = np.lexsort((-value, cost))  # by cost, the best value first among equal costs
    out, best = [], -math.inf
    for i in order:
        if value[i] > best:
            out.append(int(i))
            best = value[i]
    return out


@dataclass(frozen=True)
class Allocation:
    """The best shape at one budget: its label, mean metric over seeds, and every shape's mean."""

    budget: float
    best: str
    value: float
    means: dict[str, float]
    runs: dict[str, int]


def compute_optimal(budgets: Sequence[float], shapes: Sequence[str], values: Sequence[float],
                    maximize: bool = True) -> list[Allocation]:
    """Per budget (increasing), the shape with the best seed-mean metric among the shapes trained at it."""
    if not len(budgets) == len(shapes) == len(values):
        raise ValueError(f"compute_optimal: {len(budgets)} budgets, {len(shapes)} shapes, {len(values)} values")
    cells: dict[tuple[float, str], list[float]] = {}
    for b, s, v in zip(budgets, shapes, values, strict=True):
        if not math.isnan(v):
            cells.setdefault((float(b), str(s)), []).append(float(v))
    out = []
    for budget in sorted({b for b, _ in cells}):
        means = {s: float(np.mean(v)) for (b, s), v in cells.items() if b == budget}
        runs = {s: len(v) for (b, s), v in cells.items() if b == budget}
        best = (max if maximize else min)(means, key=means.__getitem__)
        out.append(Allocation(budget, best, means[best], means, runs))
    return out
