"""Clipping bounds, Gaussian noise statistics (KS tests), chain and process composition."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim.types import RoundContext


def random_updates(num, seed=0):
  rng = np.random.default_rng(seed)
  scale = rng.lognormal(0, 2, size=num).astype(np.float32)
  return {"a": jnp.asarray(rng.normal(size=(num, 7, 3)).astype(np.float32) * scale[:, None, None]),
          "b": jnp.asarray(rng.normal(size=(num, 5)).astype(np.float32) * scale[:, None])}


@pytest.mark.parametrize("per_layer", [False, True])
def test_clip_never_exceeds_bound_and_is_noop_below(per_layer):
  stage = fs.aggregators.clip_l2(0.7, per_layer=per_layer)
  deltas = random_updates(500)

  def one(d):
    out, _, m = stage.aggregate(fs.WeightedUpdate(d, jnp.float32(1)), stage.init(None),
                                jax.random.key(0), None)
    return out.delta, m["fraction_clipped"]

  clipped, flags = jax.vmap(one)(deltas)
  norms = jax.vmap(fs.aggregators.global_norm)(clipped)
  assert float(norms.max()) <= 0.7 * (1 + 1e-6)
  orig = jax.vmap(fs.aggregators.global_norm)(deltas)
  small = np.asarray(flags) == 0
  assert small.any() and (~small).any()
  for k in deltas:
    np.testing.assert_array_equal(np.asarray(clipped[k])[small], np.asarray(deltas[k])[small])
  if not per_layer:
    np.testing.assert_array_equal(small, np.asarray(orig) <= 0.7)


def test_clip_zero_update_stays_zero():
  stage = fs.aggregators.clip_l2(1.0)
  out, _, _ = stage.aggregate(fs.WeightedUpdate({"w": jnp.zeros(4)}, jnp.float32(1)), (),
                              jax.random.key(0), None)
  np.testing.assert_array_equal(out.delta["w"], 0.0)


def noise_sample(sigma_true, n=20_000):
  stage = fs.aggregators.gaussian_noise(noise_multiplier=sigma_true / 0.5, clip=0.5)
  out, _, _ = stage.aggregate(fs.WeightedUpdate({"w": jnp.zeros(n)}, jnp.float32(1)), (),
                              jax.random.key(7), None)
  return np.asarray(out.delta["w"])


def test_noise_ks_right_sigma_passes_wrong_sigma_fails():
  sigma = 1.3
  x = noise_sample(sigma)
  assert stats.kstest(x / sigma, "norm").pvalue > 1e-3
  assert stats.kstest(x / (2 / 3 * sigma), "norm").pvalue < 1e-6
  assert stats.kstest(x / (1.5 * sigma), "norm").pvalue < 1e-6


def test_round_noise_std_is_z_clip_over_cohort(pop, loss_fn):
  # Clients with lr 0 send zero deltas, so the server step is exactly -noise / K.
  z, clip, k = 1.5, 0.2, 6
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.0), batch_size=4,
                              local_epochs=1,
                              aggregator=fs.aggregators.dp_mean(clip=clip, noise_multiplier=z))
  big = {"w": jnp.zeros((5, 600)), "b": jnp.zeros(600)}  # 3600 noise draws per round
  sim = fs.Simulation(algo, pop, cohort_size=k)
  state, _ = sim.run(sim.init(big, jax.random.key(0)), num_rounds=3)
  x = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(state.params)])
  sigma = z * clip / k * np.sqrt(3)  # three rounds of independent noise accumulate
  assert stats.kstest(x / sigma, "norm").pvalue > 1e-3
  assert stats.kstest(x / (2 / 3 * sigma), "norm").pvalue < 1e-6
  assert stats.kstest(x / (1.5 * sigma), "norm").pvalue < 1e-6


def test_noise_differs_between_chain_stages():
  stage = fs.aggregators.chain(fs.aggregators.gaussian_noise(1.0, 1.0),
                               fs.aggregators.gaussian_noise(1.0, 1.0))
  single = fs.aggregators.gaussian_noise(1.0, 1.0)
  u = fs.WeightedUpdate({"w": jnp.zeros(1000)}, jnp.float32(1))
  out, _, _ = stage.aggregate(u, stage.init(None), jax.random.key(0), None)
  one, _, _ = single.aggregate(u, (), jax.random.fold_in(jax.random.key(0), 0), None)
  two = np.asarray(out.delta["w"]) - np.asarray(one.delta["w"])
  assert abs(np.corrcoef(np.asarray(one.delta["w"]), two)[0, 1]) < 0.15
  assert 0.9 < two.std() < 1.1


def test_chain_equals_stages_by_hand():
  a, b = fs.aggregators.clip_l2(1.0), fs.aggregators.divide_by(4.0)
  u = fs.WeightedUpdate({"w": jnp.array([3.0, 4.0])}, jnp.float32(2))
  ctx = RoundContext(4.0, 10)
  out, st, _ = fs.aggregators.chain(a, b).aggregate(u, (None, None), jax.random.key(0), ctx)
  ref, _, _ = a.aggregate(u, None, None, ctx)
  ref, _, _ = b.aggregate(ref, None, None, ctx)
  np.testing.assert_allclose(out.delta["w"], ref.delta["w"])
  assert len(st) == 2


def test_divide_by_default_uses_expected_cohort_size():
  stage = fs.aggregators.divide_by()
  u = fs.WeightedUpdate({"w": jnp.array([6.0])}, jnp.float32(1))
  out, _, _ = stage.aggregate(u, (), jax.random.key(0), RoundContext(3.0, 9))
  np.testing.assert_allclose(out.delta["w"], [2.0])


@pytest.mark.parametrize("make_aggregator", [fs.aggregators.mean, fs.aggregators.sum],
                         ids=["mean", "sum"])
def test_mean_and_sum_processes_equal_hand_reduction(pop, loss_fn, make_aggregator, init_params):
  from oracle import round_keys

  agg = make_aggregator()
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1, aggregator=agg)
  sim = fs.Simulation(algo, pop, cohort_size=5, chunk_size=2)
  key = jax.random.key(3)
  state, _ = sim.round(sim.init(init_params(), key))
  cohort_key, client_key = round_keys(key, 0)[:2]
  ids = np.asarray(sim.sampler.sample(cohort_key, pop.num_clients).ids)
  deltas = []
  for cid in ids:
    data = fs.ClientData(pop.features, pop.offsets[cid], pop.num_examples[cid], pop.max_examples)
    deltas.append(algo.client_update(init_params(), data, (),
                                     jax.random.fold_in(client_key, int(cid))).delta)
  total = jax.tree.map(lambda *d: sum(d), *deltas)
  # unweighted: every client counts once
  scale = 1.0 / len(ids) if make_aggregator is fs.aggregators.mean else 1.0
  expected = jax.tree.map(lambda p, t: p - scale * t, init_params(), total)
  chex.assert_trees_all_close(state.params, expected, rtol=2e-5, atol=2e-6)
