"""DP aggregation inside the compiled round: adaptive clipping, capped weights, local DP, ε."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs


def synthetic_algorithm(aggregator, make_delta, dim=8):
  """An Algorithm whose client sends ``make_delta(key, data)``; the server applies sgd(1.0)."""

  def client_update(broadcast, data, client_state, key):
    delta = {"w": make_delta(key, data, dim)}
    return fs.ClientOutput(delta, data.num_examples.astype(jnp.float32), {}, client_state)

  return fs.Algorithm(client_update, aggregator, optax.sgd(1.0))


def index_population(num_clients, sizes=None):
  sizes = np.ones(num_clients, int) if sizes is None else np.asarray(sizes)
  ids = np.repeat(np.arange(num_clients), sizes)
  x = np.repeat(np.arange(num_clients, dtype=np.float32), sizes)[:, None]
  return fs.Population.from_arrays({"x": x}, ids, num_clients=num_clients)


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_tracks_quantile(quantile):
  sigma = 0.5

  def lognormal_norm(key, data, dim):
    k1, k2 = jax.random.split(key)
    direction = jax.random.normal(k1, (dim,))
    norm = jnp.exp(sigma * jax.random.normal(k2, ()))
    return direction / jnp.linalg.norm(direction) * norm

  agg = fs.aggregators.adaptive_dp_mean(0.0, target_quantile=quantile, initial_clip=0.1)
  sim = fs.Simulation(synthetic_algorithm(agg, lognormal_norm), index_population(2000),
                      cohort_size=200)
  state, m = sim.run(sim.init({"w": jnp.zeros(8)}, jax.random.key(0)), num_rounds=150)
  true_q = np.exp(sigma * stats.norm.ppf(quantile))
  final = float(np.mean(m["clip"][-40:]))
  assert abs(final - true_q) / true_q < 0.1, (final, true_q)
  assert m["clip"][0] == pytest.approx(0.1)
  assert abs(np.mean(m["fraction_clipped"][-40:]) - (1 - quantile)) < 0.1


def test_adaptive_noise_split_and_bad_split():
  assert fs.aggregators.split_noise_multiplier(1.0, 5.0) == pytest.approx(
      (1.0 - 1 / 100.0) ** -0.5)
  agg = fs.aggregators.adaptive_dp_mean(1.0)  # sigma_b = K/20 = 0.5 for K = 10: z >= 2 sigma_b
  with pytest.raises(ValueError, match="cannot split the noise"):
    fs.Simulation(synthetic_algorithm(agg, lambda k, d, dim: jnp.zeros(dim)),
                  index_population(50), cohort_size=10)


def test_adaptive_noise_std_uses_current_clip():
  z, k = 1.0, 100  # sigma_b = 5, z_delta = (1 - 1/100)^-1/2
  agg = fs.aggregators.adaptive_dp_mean(z, initial_clip=0.3, learning_rate=1e-9)
  sim = fs.Simulation(synthetic_algorithm(agg, lambda key, d, dim: jnp.zeros(dim), dim=3000),
                      index_population(400), cohort_size=k)
  state, _ = sim.round(sim.init({"w": jnp.zeros(3000)}, jax.random.key(1)))
  sigma = fs.aggregators.split_noise_multiplier(z, k / 20) * 0.3 / k
  x = -np.asarray(state.params["w"])
  assert stats.kstest(x / sigma, "norm").pvalue > 1e-3
  assert stats.kstest(x / (1.5 * sigma), "norm").pvalue < 1e-6


def test_capped_weights_fixed_denominator_estimator():
  sizes = np.array([1, 3, 10, 40, 2, 7])
  clip, cap = 2.0, 5.0

  def own_vector(key, data, dim):  # client with n examples sends (1 + n/4) * ones: big ones clip
    return jnp.full((dim,), 1.0 + data.num_examples.astype(jnp.float32) / 4)

  agg = fs.aggregators.dp_mean(clip, 0.0, weight_cap=cap)
  pop = index_population(6, sizes)
  sim = fs.Simulation(synthetic_algorithm(agg, own_vector, dim=4), pop, cohort_size=6)
  state, _ = sim.round(sim.init({"w": jnp.zeros(4)}, jax.random.key(0)))
  w = np.minimum(sizes / cap, 1.0)
  deltas = np.stack([np.full(4, 1.0 + n / 4) for n in sizes])
  norms = np.linalg.norm(deltas, axis=1)
  clipped = deltas * np.minimum(1.0, clip / norms)[:, None]
  expected = (w[:, None] * clipped).sum(0) / (6 / 6 * w.sum())
  np.testing.assert_allclose(-np.asarray(state.params["w"]), expected, rtol=1e-5)


def test_local_dp_noise_is_per_client():
  z, clip, k = 0.5, 1.0, 50
  agg = fs.aggregators.local_dp_mean(clip, z)
  sim = fs.Simulation(synthetic_algorithm(agg, lambda key, d, dim: jnp.zeros(dim), dim=4000),
                      index_population(200), cohort_size=k)
  state, _ = sim.round(sim.init({"w": jnp.zeros(4000)}, jax.random.key(0)))
  sigma = z * clip / np.sqrt(k)  # K independent client noises, averaged over K
  x = -np.asarray(state.params["w"])
  assert stats.kstest(x / sigma, "norm").pvalue > 1e-3
  assert stats.kstest(x / (1.5 * sigma), "norm").pvalue < 1e-6


@pytest.mark.slow  # test_run_integrity checks the epsilon column too
def test_run_reports_epsilon_for_the_sampler_used():
  pop = index_population(300)
  agg = fs.aggregators.dp_mean(1.0, 1.1)
  algo = synthetic_algorithm(agg, lambda key, d, dim: jnp.zeros(dim))
  for sampler in (fs.sampling.uniform(30), fs.sampling.poisson(0.1, max_cohort_size=300)):
    sim = fs.Simulation(algo, pop, sampler=sampler)
    state, m = sim.run(sim.init({"w": jnp.zeros(8)}, jax.random.key(0)), num_rounds=12,
                       block_size=5, delta=1e-5)
    expected = fs.privacy.epsilon(sampler, 300, 1.1, 12, 1e-5)
    assert m["epsilon"][-1] == pytest.approx(expected, rel=1e-6)
    assert np.all(np.diff(m["epsilon"]) > 0)
    state, m2 = sim.run(state, num_rounds=3, delta=1e-5)  # continues the count
    assert m2["epsilon"][-1] == pytest.approx(fs.privacy.epsilon(sampler, 300, 1.1, 15, 1e-5))


def test_epsilon_requested_without_dp_is_an_error():
  algo = synthetic_algorithm(fs.aggregators.mean(), lambda key, d, dim: jnp.zeros(dim))
  sim = fs.Simulation(algo, index_population(20), cohort_size=5)
  with pytest.raises(ValueError, match="not central DP"):
    sim.run(sim.init({"w": jnp.zeros(8)}, jax.random.key(0)), num_rounds=2, delta=1e-5)


def test_weighted_dp_refused_unless_capped():
  with pytest.raises(ValueError, match="weighted"):
    fs.aggregators.process(fs.aggregators.clip_l2(1.0), fs.aggregators.weighted_sum_reducer(),
                           fs.aggregators.gaussian_noise(1.0, 1.0))
  fs.aggregators.dp_mean(1.0, 1.0, weight_cap=10.0)  # capped: allowed


def test_epsilon_refused_when_availability_changes_sampling():
  pop = index_population(50)
  algo = synthetic_algorithm(fs.aggregators.dp_mean(1.0, 1.0), lambda k, d, dim: jnp.zeros(dim))
  avail = fs.systems.SystemModel(availability=np.full(50, 0.5))
  sim = fs.Simulation(algo, pop, cohort_size=5, system=avail)
  with pytest.raises(ValueError, match="under-report epsilon"):
    sim.run(sim.init({"w": jnp.zeros(8)}, jax.random.key(0)), num_rounds=2, delta=1e-5)
  dropout = fs.systems.SystemModel(dropout=0.2)  # data-independent: accounting stays valid
  sim = fs.Simulation(algo, pop, cohort_size=5, system=dropout)
  _, m = sim.run(sim.init({"w": jnp.zeros(8)}, jax.random.key(0)), num_rounds=2, delta=1e-5)
  assert np.all(np.isfinite(m["epsilon"]))
