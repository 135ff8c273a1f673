"""Paired significance tests over users."""
import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from crane_pyg.metrics.significance import paired_wilcoxon, seed_averaged


def test_seed_averaged_keeps_common_users():
    assert seed_averaged([{1: 0.0, 2: 1.0, 3: 0.5}, {1: 1.0, 2: 0.0}]) == {1: 0.5, 2: 0.5}
    with pytest.raises(ValueError):
        seed_averaged([])


def test_paired_wilcoxon_counts_and_scipy_value():
    rng = np.random.default_rng(0)
    b = rng.random(200)
    a = b + rng.normal(0.05, 0.1, size=200)
    a[:20] = b[:20]  # ties: dropped by the 'wilcox' zero method
    result = paired_wilcoxon(dict(enumerate(a)), dict(enumerate(b)))
    assert result['users'] == 200 and result['nonzero'] == 180
    assert result['wins'] + result['losses'] == 180
    assert result['wins'] == int((a > b).sum())
    assert result['mean_a'] == pytest.approx(a.mean()) and result['mean_b'] == pytest.approx(b.mean())
    ref = wilcoxon(a[20:], b[20:], method='approx')
    assert result['p_value'] == pytest.approx(ref.pvalue, rel=1e-6)
    assert result['p_value'] < 1e-3  # a real shift of +0.05 over 180 users
    # one-sided in the other direction: no evidence
    assert paired_wilcoxon(dict(enumerate(a)), dict(enumerate(b)),
                           alternative='less')['p_value'] > 0.99


def test_paired_wilcoxon_ties_do_not_depend_on_float_order():
    """Equal per-user differences reached by different float arithmetic are
    ties: two differences of seed averages that are both 1/36 differ in
    their last bits, and ranking that noise must not decide the test."""
    third, two_thirds = 1 / 3, 2 / 3
    avg = lambda *v: (v[0] + v[1] + v[2]) / 3  # noqa: E731 (as seed_averaged sums)
    assert (avg(0, 0, third) - avg(0, 0, 0.25)
            != avg(0, 0, two_thirds) - avg(0, third, 0.25))  # both 1/36
    noisy_high = (0.1 + 0.2 + 0.0) / 3  # 0.30000000000000004 / 3
    clean_high = 0.3 / 3
    assert noisy_high != clean_high  # the float noise the test must ignore
    # 60 users gain exactly 0.1 (noisy sums), 60 lose exactly 0.1 (clean)
    a = {u: noisy_high for u in range(60)} | {u: 0.0 for u in range(60, 120)}
    b = {u: 0.0 for u in range(60)} | {u: clean_high for u in range(60, 120)}
    result = paired_wilcoxon(a, b)
    assert result['wins'] == result['losses'] == 60
    # all 120 differences share one magnitude: the statistic is the tie mean
    assert result['statistic'] == pytest.approx(60 * 60.5)
    assert result['p_value'] == pytest.approx(1.0)
    # without the rounding the noise breaks every tie the same way
    raw = wilcoxon(np.array(list(a.values())), np.array(list(b.values())), method='approx')
    assert raw.pvalue < 1e-3
    # real differences far above the rounding are kept
    assert paired_wilcoxon({0: third + 1e-9, 1: 0.5}, {0: third, 1: two_thirds})['nonzero'] == 2


def test_paired_wilcoxon_pairs_by_user_and_handles_identical_models():
    a = {1: 0.2, 2: 0.4, 9: 1.0}
    b = {2: 0.4, 1: 0.2, 7: 0.0}
    result = paired_wilcoxon(a, b)
    assert result['users'] == 2 and result['nonzero'] == 0 and math.isnan(result['p_value'])
    with pytest.raises(ValueError, match='share no user'):
        paired_wilcoxon({1: 0.0}, {2: 0.0})
