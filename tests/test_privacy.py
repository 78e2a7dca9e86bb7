"""Accounting against dp-accounting called directly and against published figures."""

import dp_accounting as dpa
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import privacy

GRID = [(q, z, t, d) for q in (0.001, 0.01, 0.1) for z in (0.7, 1.0, 2.5)
        for t in (10, 1000) for d in (1e-5,)][:18] + [(0.05, 1.2, 300, 1e-6), (0.2, 3.0, 50, 1e-3)]
# The same check at every grid point: the corners and the two other deltas run in the default
# tier, the rest are slow (default tier budget).
FAST_GRID = [(0.001, 0.7, 10, 1e-5), (0.1, 2.5, 1000, 1e-5), (0.05, 1.2, 300, 1e-6),
             (0.2, 3.0, 50, 1e-3)]


@pytest.mark.parametrize("q,z,t,delta", [
    g if g in FAST_GRID else pytest.param(*g, marks=pytest.mark.slow) for g in GRID])
def test_poisson_epsilon_equals_dp_accounting(q, z, t, delta):
  n = 100_000
  ours = privacy.epsilon(fs.sampling.poisson(q, max_cohort_size=n), n, z, t, delta)
  acc = dpa.rdp.RdpAccountant()
  acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), t)
  assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-12)


@pytest.mark.parametrize("k,z,t", [(10, 1.0, 100), (100, 1.5, 500),  # the same check: one slow
                                   pytest.param(1000, 0.8, 50, marks=pytest.mark.slow)])
def test_fixed_size_uses_replace_one_with_half_noise(k, z, t):
  n = 10_000
  ours = privacy.epsilon(fs.sampling.uniform(k), n, z, t, 1e-5)
  acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
  acc.compose(dpa.SampledWithoutReplacementDpEvent(n, k, dpa.GaussianDpEvent(z / 2)), t)
  assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
  poisson = privacy.epsilon(fs.sampling.poisson(k / n, max_cohort_size=n), n, z, t, 1e-5)
  assert ours > poisson  # replace-one (sensitivity 2S) costs more than add/remove


def test_pld_poisson_matches_and_is_tighter():
  n, q, z, t = 10_000, 0.01, 1.0, 1000
  s = fs.sampling.poisson(q, max_cohort_size=n)
  pld = privacy.epsilon(s, n, z, t, 1e-5, accountant="pld")
  acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
  acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), t)
  assert pld == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
  assert pld < privacy.epsilon(s, n, z, t, 1e-5)


def test_abadi_2016_moments_accountant():
  # Abadi et al. 2016, q = 0.01, sigma = 4, 10k steps, delta = 1e-5: eps = 1.26 (orders 2..32).
  assert privacy.epsilon_moments_accountant(0.01, 4.0, 10_000, 1e-5) == pytest.approx(1.26,
                                                                                        rel=0.005)
  modern = privacy.epsilon(fs.sampling.poisson(0.01, 10_000), 10_000, 4.0, 10_000, 1e-5)
  assert modern < 1.26


@pytest.mark.parametrize("z,epochs,published", [(1.12, 60, 2.92), (0.6, 30, 9.74),
                                                (1.2, 10, 1.20)])
def test_tf_privacy_tutorial_table(z, epochs, published):
  steps = epochs * 60_000 // 256
  ma = privacy.epsilon_moments_accountant(256 / 60_000, z, steps, 1e-5)
  assert ma == pytest.approx(published, rel=0.005)
  modern = privacy.epsilon(fs.sampling.poisson(256 / 60_000, 60_000), 60_000, z, steps, 1e-5)
  assert modern < published


@pytest.mark.parametrize("target", [0.5, 2.0,  # the same check at a third target: slow
                                    pytest.param(8.0, marks=pytest.mark.slow)])
def test_calibration_round_trips(target):
  n, t = 50_000, 500
  s = fs.sampling.poisson(0.02, max_cohort_size=n)
  z = privacy.calibrate_noise_multiplier(target, 1e-6, t, s, n)
  eps = privacy.epsilon(s, n, z, t, 1e-6)
  assert eps <= target and eps == pytest.approx(target, rel=0.01)


@pytest.mark.slow  # test_calibration_round_trips (Poisson) stays in the default tier
def test_calibration_fixed_size():
  n, t = 5_000, 200
  s = fs.sampling.uniform(50)
  z = privacy.calibrate_noise_multiplier(4.0, 1e-5, t, s, n)
  assert privacy.epsilon(s, n, z, t, 1e-5) == pytest.approx(4.0, rel=0.01)


def test_truncated_poisson_bound_and_pld_event():
  n = 10_000
  roomy = fs.sampling.poisson(0.01, max_cohort_size=200)  # mean 100, cap 10 sd above
  untruncated = fs.sampling.poisson(0.01, max_cohort_size=n)
  eps = privacy.epsilon(roomy, n, 1.0, 100, 1e-5)
  assert eps == pytest.approx(privacy.epsilon(untruncated, n, 1.0, 100, 5e-6), rel=1e-12)
  tight = fs.sampling.poisson(0.01, max_cohort_size=105)
  with pytest.raises(ValueError, match="max_cohort_size to at least"):
    privacy.epsilon(tight, n, 1.0, 100, 1e-5)
  event, _ = privacy.dp_event(tight, n, 1.0, 100, accountant="pld")
  assert isinstance(event.event, dpa.TruncatedSubsampledGaussianDpEvent)


def test_epsilon_per_round_matches_epsilon():
  n = 1000
  s = fs.sampling.uniform(20)
  per_round = privacy.epsilon_per_round(s, n, 1.0, 50, 1e-5)
  assert np.all(np.diff(per_round) > 0)
  assert per_round[-1] == pytest.approx(privacy.epsilon(s, n, 1.0, 50, 1e-5), rel=1e-6)


BAD = [
    (lambda: privacy.epsilon(fs.sampling.uniform(5), 100, 1.0, 10, 1.5), "delta"),
    (lambda: privacy.epsilon(fs.sampling.uniform(5), 100, 1.0, 10, 0.0), "delta"),
    (lambda: privacy.epsilon(fs.sampling.uniform(5), 100, 0.0, 10, 1e-5), "noise_multiplier"),
    (lambda: privacy.calibrate_noise_multiplier(0.0, 1e-5, 10, fs.sampling.uniform(5), 100),
     "target_epsilon"),
    (lambda: privacy.epsilon(fs.sampling.uniform(5, weights=np.arange(100.0)), 100, 1.0, 10,
                             1e-5), "weights"),
    (lambda: privacy.epsilon(fs.sampling.poisson(0.1, 50, availability=np.ones(100)), 100, 1.0,
                             10, 1e-5), "availability"),
    (lambda: privacy.epsilon(fs.sampling.uniform(5), 100, 1.0, 10, 1e-5, accountant="pld"),
     "PLD"),
    (lambda: privacy.epsilon("poisson", 100, 1.0, 10, 1e-5), "cannot account"),
]


@pytest.mark.parametrize("fn,match", BAD)
def test_bad_privacy_input(fn, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fn()


def test_local_epsilon_grows_with_participation():
  one = privacy.local_epsilon(4.0, 1, 1e-5)
  ten = privacy.local_epsilon(4.0, 10, 1e-5)
  assert 0 < one < ten
