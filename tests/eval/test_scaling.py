"""Scaling-law fits recover the laws that generated their points; allocation and frontier on tiny sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from genrec.eval.scaling import (
    bootstrap_over_seeds,
    compute_optimal,
    fit_loglinear,
    fit_power,
    fit_saturating,
    pareto_frontier,
    r_squared,
)

COMPUTE = np.logspace(9, 13, 9)  # 1e9 .. 1e13 FLOPs


def test_saturating_fit_recovers_a_planted_loss_law():
    loss = 0.45 + 2.0 * (COMPUTE / 1e11) ** -0.3
    fit = fit_saturating(COMPUTE, loss, c0=1e11)
    assert fit.params["y_inf"] == pytest.approx(0.45, abs=1e-4)
    assert fit.params["a"] == pytest.approx(2.0, rel=1e-3)
    assert fit.params["b"] == pytest.approx(0.3, rel=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and not fit.at_bound


def test_saturating_fit_recovers_a_rising_metric_with_negative_amplitude():
    auc = 0.80 - 0.10 * (COMPUTE / 1e11) ** -0.5
    fit = fit_saturating(COMPUTE, auc, c0=1e11)
    assert fit.params["a"] == pytest.approx(-0.10, rel=1e-3)
    assert fit.params["b"] == pytest.approx(0.5, rel=1e-3)
    assert fit.params["y_inf"] == pytest.approx(0.80, abs=1e-5)


def test_saturating_fit_under_noise_keeps_the_exponent_close():
    rng = np.random.default_rng(0)
    c = np.repeat(COMPUTE, 3)
    loss = 0.5 + 1.5 * (c / 1e11) ** -0.25 + rng.normal(0, 0.003, len(c))
    fit = fit_saturating(c, loss, c0=1e11)
    assert fit.params["b"] == pytest.approx(0.25, abs=0.05)
    assert 0.95 < fit.r2 < 1.0


def test_default_reference_compute_is_the_geometric_mean_and_predictions_do_not_depend_on_it():
    loss = 0.45 + 2.0 * (COMPUTE / 1e11) ** -0.3
    fit = fit_saturating(COMPUTE, loss)
    assert fit.c0 == pytest.approx(1e11)  # geometric mean of 1e9 .. 1e13
    np.testing.assert_allclose(fit.predict(COMPUTE), loss, rtol=1e-5)


def test_a_straight_line_in_log_compute_hits_the_exponent_bound():
    """No curvature: the saturating law degenerates (b -> 0) and says so."""
    auc = 0.70 + 0.02 * np.log10(COMPUTE / 1e11)
    assert fit_saturating(COMPUTE, auc).at_bound


def test_loglinear_fit_recovers_slope_per_decade():
    gauc = 0.62 + 0.015 * np.log10(COMPUTE / 1e10)
    fit = fit_loglinear(COMPUTE, gauc, c0=1e10)
    assert fit.params["beta"] == pytest.approx(0.015, rel=1e-9)
    assert fit.params["alpha"] == pytest.approx(0.62, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)


def test_loglinear_r2_is_low_on_a_saturated_curve():
    """A law that flattens after two decades is not log-linear over four: R² well below 1."""
    auc = 0.8 - 0.2 * (COMPUTE / 1e9) ** -1.5
    assert fit_loglinear(COMPUTE, auc).r2 < 0.8
    assert fit_saturating(COMPUTE, auc).r2 > 0.999


def test_power_fit_recovers_exponent():
    x = np.array([1e10, 3e10, 1e11, 3e11])
    fit = fit_power(x, 7.0 * x ** 0.4)
    assert fit.params["p"] == pytest.approx(0.4, rel=1e-9)
    assert fit.params["k"] == pytest.approx(7.0, rel=1e-6)


def test_bootstrap_interval_covers_the_planted_exponent_and_shrinks_with_less_noise():
    rng = np.random.default_rng(1)
    c = np.repeat(COMPUTE, 4)
    clean = 0.5 + 1.0 * (c / 1e11) ** -0.3
    widths = []
    for sigma in (0.01, 0.001):
        fit = bootstrap_over_seeds(c, clean + rng.normal(0, sigma, len(c)), "saturating", replicates=200)
        lo, hi = fit.ci["b"]
        assert lo <= 0.3 <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0]


def test_bootstrap_resamples_seeds_within_a_design_point_even_when_their_compute_differs():
    """Early stopping: two seeds of one shape stop at different epochs, so at different compute."""
    rng = np.random.default_rng(2)
    c = np.repeat(COMPUTE, 2) * np.tile([1.0, 1.5], len(COMPUTE))  # [18], no two equal
    loss = 0.5 + 1.0 * (c / 1e11) ** -0.3 + rng.normal(0, 0.005, len(c))
    shapes = np.repeat(np.arange(len(COMPUTE)), 2)
    assert bootstrap_over_seeds(c, loss, "saturating", replicates=50).ci == {}  # by compute: nothing to resample
    fit = bootstrap_over_seeds(c, loss, "saturating", replicates=200, design=shapes)
    lo, hi = fit.ci["b"]
    assert lo < hi and lo <= 0.3 <= hi


def test_bootstrap_with_one_seed_per_point_gives_no_interval():
    fit = bootstrap_over_seeds(COMPUTE, 0.6 + 0.01 * np.log10(COMPUTE), "loglinear")
    assert fit.ci == {}


@pytest.mark.parametrize(("x", "y", "message"), [
    ([1e9, 1e10], [0.5, 0.4], "at least 3 distinct"),
    ([1e9, 1e9, 1e9], [0.5, 0.4, 0.3], "at least 3 distinct"),
    ([1e9, 0.0, 1e10], [0.5, 0.4, 0.3], "positive"),
    ([1e9, 1e10, 1e11], [0.5, float("nan"), 0.3], "finite"),
    ([1e9, 1e10, 1e11], [0.5, 0.4], "3 x values but 2 y values"),
])
def test_bad_points_raise_naming_the_problem(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_loglinear(x, y)


def test_saturating_needs_four_distinct_compute_values():
    with pytest.raises(ValueError, match="at least 4 distinct"):
        fit_saturating([1e9, 1e10, 1e11], [0.5, 0.4, 0.35])


def test_r_squared_of_the_mean_is_zero():
    y = np.array([1.0, 2.0, 3.0])
    assert r_squared(y, np.full(3, 2.0)) == 0.0 and r_squared(y, y) == 1.0


def test_pareto_frontier_keeps_only_points_better_than_every_cheaper_one():
    cost = [1, 2, 2, 3, 4, 5]
    auc = [0.60, 0.58, 0.65, 0.64, 0.70, 0.69]
    assert pareto_frontier(cost, auc) == [0, 2, 4]
    assert pareto_frontier(cost, [-a for a in auc], maximize=False) == [0, 2, 4]


def test_compute_optimal_averages_seeds_before_picking_the_best_shape():
    budgets = [1e9] * 4 + [1e10] * 4
    shapes = ["deep", "deep", "long", "long"] * 2
    # at 1e9 "deep" has the single best seed (0.71) but "long" the better mean
    auc = [0.71, 0.60, 0.66, 0.67, 0.70, 0.72, 0.69, 0.68]
    best = compute_optimal(budgets, shapes, auc)
    assert [(a.budget, a.best) for a in best] == [(1e9, "long"), (1e10, "deep")]
    assert best[0].value == pytest.approx(0.665) and best[0].runs == {"deep": 2, "long": 2}
    assert compute_optimal(budgets, shapes, [-v for v in auc], maximize=False)[0].best == "long"
