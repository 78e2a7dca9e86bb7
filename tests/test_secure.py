"""Secure aggregation (modular and masked, with dropouts) and the distributed Skellam mechanism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.types import RoundContext


def _algo(loss_fn, agg, lr=0.2):
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), batch_size=4,
                              local_epochs=1, aggregator=agg)


@pytest.fixture(scope="module")
def run_rounds(init_params):
  """``run_rounds(pop, loss_fn, agg, rounds=2, cohort=6, chunk=4, seed=0, lr=0.2)``: the state
  and metrics of a FedAvg run with aggregator ``agg``."""

  def run(pop, loss_fn, agg, rounds=2, cohort=6, chunk=4, seed=0, lr=0.2):
    sim = fs.Simulation(_algo(loss_fn, agg, lr), pop, cohort_size=cohort, chunk_size=chunk)
    return sim.run(sim.init(init_params(), jax.random.key(seed)), num_rounds=rounds)

  return run


def test_field_encoding_roundtrip():
  ints = jnp.array([-(2**7), -1, 0, 1, 2**7 - 1], jnp.int32)
  np.testing.assert_array_equal(fs.aggregators.from_field(fs.aggregators.to_field(ints, 8), 8),
                                ints)
  big = jnp.array([-(2**31), -5, 2**31 - 1], jnp.int32)
  np.testing.assert_array_equal(fs.aggregators.from_field(fs.aggregators.to_field(big, 32), 32),
                                big)
  # Sums wrap modulo 2^b: 100 + 100 in Z_2^8 is -56.
  s = fs.aggregators.to_field(jnp.int32(100), 8) + fs.aggregators.to_field(jnp.int32(100), 8)
  assert int(fs.aggregators.from_field(s, 8)) == -56


@pytest.mark.parametrize("dropout", [  # masked == modular stays in the default tier below
    pytest.param(0.0, marks=pytest.mark.slow), pytest.param(0.4, marks=pytest.mark.slow)])
def test_masked_equals_modular_bit_for_bit(pop, loss_fn, dropout, run_rounds):
  out = {}
  for mode in ("modular", "masked"):
    agg = fs.aggregators.secure_mean(bits=20, clip_range=0.5, mode=mode, dropout=dropout)
    state, metrics = run_rounds(pop, loss_fn, agg, rounds=3)
    out[mode] = (state.params, metrics)
  chex.assert_trees_all_equal(out["modular"][0], out["masked"][0])
  dropped = np.asarray(out["masked"][1]["secagg_dropped"])
  assert (dropped > 0).any() == (dropout > 0)
  assert np.all(np.asarray(out["masked"][1]["secagg_wrapped"]) == 0)


@pytest.mark.slow  # (~4 s) test_masked_equals_modular_bit_for_bit (with dropouts) stays
def test_masked_with_system_dropouts_and_padding(pop, loss_fn, init_params):
  system = fs.systems.SystemModel(dropout=0.3)
  res = []
  for mode in ("modular", "masked"):
    sim = fs.Simulation(_algo(loss_fn, fs.aggregators.secure_mean(bits=16, mode=mode,
                                                                  dropout=0.2)),
                        pop, cohort_size=7, chunk_size=3, system=system)
    state, metrics = sim.run(sim.init(init_params(), jax.random.key(4)), num_rounds=3)
    res.append(state.params)
  assert float(np.sum(metrics["dropped"])) > 0
  chex.assert_trees_all_equal(res[0], res[1])


# Slow (default tier budget): several bit widths compiled;
# test_skellam_without_noise_is_the_clipped_mean stays.
@pytest.mark.slow
def test_enough_bits_recover_the_mean_within_the_quantisation_bound(pop, loss_fn, run_rounds):
  k = 6
  plain, _ = run_rounds(pop, loss_fn, fs.aggregators.mean(), rounds=1, cohort=k, lr=0.05)
  for bits in (12, 24):
    agg = fs.aggregators.secure_mean(bits=bits, clip_range=1.0, weighted=False)
    secure, metrics = run_rounds(pop, loss_fn, agg, rounds=1, cohort=k, lr=0.05)
    assert float(metrics["secagg_clipped"][0]) == 0.0
    assert float(metrics["secagg_wrapped"][0]) == 0.0
    scale = float(metrics["secagg_scale"][0])
    assert scale == pytest.approx(((1 << (bits - 1)) - 1 - k) / k, rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(secure.params)):
      err = float(jnp.abs(a - b).max())
      assert err <= 1.0 / scale + 1e-6  # each of the k roundings errs by < 1/scale on the sum
      if bits == 12:
        assert err > 0  # the quantisation error is really there


def test_too_few_bits_wrap_and_are_counted(pop, loss_fn, run_rounds):
  agg = fs.aggregators.secure_mean(bits=8, clip_range=1.0, scale=5000.0, weighted=False)
  _, metrics = run_rounds(pop, loss_fn, agg, rounds=1)
  assert float(metrics["secagg_wrapped"][0]) > 0


def test_weighted_secure_mean_matches_weighted_mean(pop, loss_fn, run_rounds):
  plain, _ = run_rounds(pop, loss_fn, fs.aggregators.weighted_mean(), rounds=2, lr=0.05)
  secure, _ = run_rounds(pop, loss_fn, fs.aggregators.secure_mean(bits=32, clip_range=1.0),
                         rounds=2, lr=0.05)
  chex.assert_trees_all_close(plain.params, secure.params, rtol=1e-7, atol=1e-5)


def test_bad_secure_inputs(pop, loss_fn, init_params):
  with pytest.raises(ValueError, match=r"needs bits >= 4"):
    fs.Simulation(_algo(loss_fn, fs.aggregators.secure_mean(bits=3)), pop, cohort_size=6)
  for bits in (1, 33, 8.0):
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 32\]"):
      fs.aggregators.secure_mean(bits=bits)
  with pytest.raises(ValueError, match="mode must be"):
    fs.aggregators.secure_mean(mode="plain")
  with pytest.raises(ValueError, match="reveals only their sum"):
    agg = fs.aggregators.secure_mean()
    fs.aggregators.process(agg.per_client, fs.aggregators.median_reducer(), agg.post)
  with pytest.raises(ValueError, match="would overflow int32"):
    fs.aggregators.secure_mean(bits=32, clip_range=2.0, scale=2.0**30)
  with pytest.raises(ValueError, match=r"bits must be an int in \[2, 22\] \(float32"):
    fs.aggregators.distributed_dp_mean(1.0, 1.0, bits=24)
  with pytest.raises(ValueError, match=r"bits must be an int in \[2, 22\]"):
    fs.privacy.skellam_epsilon(1.0, 1.0, 32, 100, 10, 1, 1e-5)
  with pytest.raises(ValueError, match="too small for 6 clients"):
    fs.Simulation(_algo(loss_fn, fs.aggregators.distributed_dp_mean(1.0, 1.0, bits=2)), pop,
                  cohort_size=6).init(init_params(), jax.random.key(0))


# -- distributed DP (Skellam) ---------------------------------------------------------------


def _ddp_aggregate(agg, updates, n, seed=0):
  """Runs the encode stage for n clients (vmapped), sums the fields, decodes."""
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), updates)
  ctx = RoundContext(float(n), n, params_template=template, shared_key=jax.random.key(seed),
                     max_cohort_size=n)
  ids = jnp.arange(n)

  def one(u, cid):
    out, _, _ = agg.per_client.aggregate(fs.WeightedUpdate(u, jnp.float32(1)), (),
                                         jax.random.fold_in(jax.random.key(seed + 1), cid),
                                         ctx._replace(client_id=cid))
    return out

  outs = jax.jit(jax.vmap(one))(updates, ids)
  summed = jax.tree.map(lambda x: jnp.sum(x, axis=0), outs)
  res, _, metrics = agg.post.aggregate(summed, (), None, ctx)
  return res.delta, metrics


def test_skellam_without_noise_is_the_clipped_mean():
  n, d = 20, 3000
  rng = np.random.default_rng(0)
  x = {"w": jnp.asarray(rng.normal(size=(n, d)).astype(np.float32) * 0.02)}
  norms = np.linalg.norm(np.asarray(x["w"]), axis=1, keepdims=True)
  clipped = np.asarray(x["w"]) * np.minimum(1.0, 1.0 / norms)
  got, metrics = _ddp_aggregate(fs.aggregators.distributed_dp_mean(1.0, 0.0, bits=20), x, n)
  assert float(metrics["secagg_wrapped"]) == 0
  err = np.asarray(got["w"]) - clipped.mean(0)
  scale = float(metrics["secagg_scale"])
  # Worst-case rounding std of the sum is sqrt(n) / (2 scale); 5 of those bound the max error.
  assert np.abs(err).max() < 5 * np.sqrt(n) / (2 * scale) / n
  assert np.abs(err).max() > 0


# slow tier: (~3 s) test_skellam_without_noise_is_the_clipped_mean and the in-round test stay
@pytest.mark.slow
def test_skellam_noise_has_the_central_std():
  n, d, z, c = 50, 4096, 1.0, 1.0
  x = {"w": jnp.zeros((n, d), jnp.float32)}
  got, metrics = _ddp_aggregate(fs.aggregators.distributed_dp_mean(c, z, bits=18), x, n)
  std = float(np.std(np.asarray(got["w"])))
  assert abs(std / (z * c / n) - 1) < 0.05
  assert float(metrics["secagg_wrapped"]) == 0


def test_skellam_too_few_bits_wrap():
  n, d = 50, 1024
  x = {"w": jnp.zeros((n, d), jnp.float32)}
  _, metrics = _ddp_aggregate(
      fs.aggregators.distributed_dp_mean(1.0, 1.0, bits=8, k_stddevs=0.3), x, n)
  assert float(metrics["secagg_wrapped"]) > 0


def test_skellam_accounting_approaches_the_gaussian():
  gauss = fs.privacy.gaussian_epsilon(1.0, 100, 1e-5)
  eps = {b: fs.privacy.skellam_epsilon(1.0, 1.0, b, 10_000, 100, 100, 1e-5) for b in (12, 16, 20)}
  assert gauss < eps[20] <= eps[16] <= eps[12]
  assert eps[20] / gauss < 1.02
  assert eps[12] / gauss > 1.05  # coarse quantisation costs privacy (inflated sensitivity)


def test_skellam_in_round_runs_and_reports(pop, loss_fn, run_rounds):
  _, metrics = run_rounds(pop, loss_fn, fs.aggregators.distributed_dp_mean(0.5, 0.5, bits=16))
  assert float(metrics["secagg_wrapped"][-1]) == 0
  assert float(metrics["bits_uploaded"][-1]) == 32 * 16
