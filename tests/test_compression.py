"""Compression stages: unbiasedness and variance of quantisation, exact rotation, top-k with
error feedback, sign compression, and their effect inside the round."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.types import RoundContext


def context_for(template, seed=0):
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
  return RoundContext(1.0, 1, params_template=shapes, shared_key=jax.random.key(seed))


def test_quantize_unbiased_with_analytical_variance():
  x = jnp.asarray(np.random.default_rng(0).normal(size=300).astype(np.float32))
  draws = 4000
  keys = jax.random.split(jax.random.key(1), draws)
  q = jax.jit(jax.vmap(lambda k: fs.aggregators._compression.quantize_leaf(x, 3, k)))(keys)
  values, var = np.asarray(q[0], np.float64), np.asarray(q[1][0], np.float64)
  xn = np.asarray(x, np.float64)
  # Unbiased: every coordinate's mean over the draws lies within 5 standard errors.
  se = np.sqrt(var / draws)
  err = np.abs(values.mean(0) - xn)
  assert np.all(err <= 5 * se + 1e-6)
  # The error's empirical variance matches step^2 p (1 - p), summed over the coordinates.
  empirical = np.mean(np.sum((values - xn) ** 2, axis=1))
  assert abs(empirical / var.sum() - 1) < 0.03
  # Every value lies on the 2^3-level grid of the [min, max] range.
  lo, hi = xn.min(), xn.max()
  levels = (values - lo) / ((hi - lo) / 7)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


def test_quantize_constant_leaf_is_exact_and_bits_reported():
  stage = fs.aggregators.quantize(4)
  u = fs.WeightedUpdate({"a": jnp.full((5, 2), 0.3), "b": jnp.arange(7.0)}, jnp.float32(1))
  out, _, m = stage.aggregate(u, stage.init(None), jax.random.key(0), None)
  np.testing.assert_array_equal(out.delta["a"], u.delta["a"])
  assert float(m["bits_uploaded"]) == 17 * 4 + 2 * 64


@pytest.mark.parametrize("size", [1, 8, 37, 1000])
def test_rotation_is_orthonormal_and_exactly_invertible(size):
  template = {"w": jnp.zeros((size,)), "m": jnp.zeros((3, 2))}
  x = jax.tree.map(lambda t: jnp.asarray(np.random.default_rng(size).normal(
      size=t.shape).astype(np.float32)), template)
  rot = fs.aggregators.hadamard_rotation()
  ctx = context_for(template)
  u = fs.WeightedUpdate(x, jnp.float32(2))
  r, _, _ = rot.rotate.aggregate(u, (), None, ctx)
  assert r.delta.shape == (1 << int(np.ceil(np.log2(size + 6))),)
  np.testing.assert_allclose(float(jnp.linalg.norm(r.delta)),
                             float(fs.aggregators.global_norm(x)), rtol=1e-5)
  back, _, _ = rot.unrotate.aggregate(r, (), None, ctx)
  for k in x:
    np.testing.assert_allclose(back.delta[k], x[k], atol=1e-6)


def test_fwht_matches_hadamard_matrix():
  from scipy.linalg import hadamard
  v = np.random.default_rng(0).normal(size=16).astype(np.float32)
  np.testing.assert_allclose(fs.aggregators.fwht(jnp.asarray(v)), hadamard(16) @ v / 4,
                             rtol=1e-5, atol=1e-6)


def test_top_k_error_feedback_conserves_the_update():
  stage = fs.aggregators.top_k(3)
  template = {"a": jnp.zeros((4,)), "b": jnp.zeros((2, 2))}
  rng = np.random.default_rng(0)
  state = stage.client_init(template)
  total_sent = np.zeros(8)
  total_delta = np.zeros(8)
  for _ in range(5):
    d = {"a": jnp.asarray(rng.normal(size=4).astype(np.float32)),
         "b": jnp.asarray(rng.normal(size=(2, 2)).astype(np.float32))}
    out, _, m = stage.aggregate(fs.WeightedUpdate(d, jnp.float32(1), state), (), None, None)
    sent = np.concatenate([np.asarray(out.delta["a"]), np.asarray(out.delta["b"]).ravel()])
    assert np.count_nonzero(sent) == 3
    state = out.client_state
    total_sent += sent
    total_delta += np.concatenate([np.asarray(d["a"]), np.asarray(d["b"]).ravel()])
  residual = np.concatenate([np.asarray(state["a"]), np.asarray(state["b"]).ravel()])
  np.testing.assert_allclose(total_sent + residual, total_delta, rtol=1e-5, atol=1e-5)
  assert float(m["bits_uploaded"]) == 3 * (32 + 3)


def test_top_k_keeps_the_largest():
  stage = fs.aggregators.top_k(2, error_feedback=False)
  d = {"w": jnp.array([0.1, -5.0, 0.2, 3.0, -0.3])}
  out, _, _ = stage.aggregate(fs.WeightedUpdate(d, jnp.float32(1)), (), None, None)
  np.testing.assert_array_equal(out.delta["w"], [0, -5.0, 0, 3.0, 0])


def test_sign_compression_with_error_feedback():
  stage = fs.aggregators.sign_compression(error_feedback=True)
  d = {"w": jnp.array([1.0, -3.0, 2.0])}
  state = stage.client_init(d)
  out, _, m = stage.aggregate(fs.WeightedUpdate(d, jnp.float32(1), state), (), None, None)
  np.testing.assert_allclose(out.delta["w"], [2.0, -2.0, 2.0])
  np.testing.assert_allclose(out.client_state["w"], [-1.0, -1.0, 0.0])
  assert float(m["bits_uploaded"]) == 3 + 32


def _algo(loss_fn, agg):
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, aggregator=agg)


@pytest.mark.slow  # (~2 s) test_quantized_mean_in_round_is_close_and_reports_bits stays
def test_rotation_in_round_equals_plain_mean(pop, loss_fn, init_params):
  rot = fs.aggregators.hadamard_rotation()
  rotated = fs.aggregators.process(rot.rotate, fs.aggregators.weighted_sum_reducer(),
                                   fs.aggregators.chain(rot.unrotate, fs.aggregators.normalize()))
  out = []
  for agg in (fs.aggregators.weighted_mean(), rotated):
    sim = fs.Simulation(_algo(loss_fn, agg), pop, cohort_size=6, chunk_size=4)
    state, _ = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=3)
    out.append(state.params)
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_quantized_mean_in_round_is_close_and_reports_bits(pop, loss_fn, init_params):
  sims = {}
  for name, agg in [("plain", fs.aggregators.weighted_mean()),
                    ("q16", fs.aggregators.quantized_mean(16)),
                    ("q2", fs.aggregators.quantized_mean(2, rotate=False))]:
    sim = fs.Simulation(_algo(loss_fn, agg), pop, cohort_size=6)
    state, metrics = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=2)
    sims[name] = (state.params, metrics)
  err16 = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(sims["plain"][0]), jax.tree.leaves(sims["q16"][0])))
  err2 = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(sims["plain"][0]), jax.tree.leaves(sims["q2"][0])))
  assert err16 < 1e-3 < err2
  assert float(sims["q16"][1]["bits_uploaded"][-1]) == 32 * 16 + 64  # 18 params padded to 32
  assert float(sims["q2"][1]["bits_uploaded"][-1]) == 18 * 2 + 2 * 64


@pytest.mark.slow  # test_finetune covers a top-k state
def test_top_k_state_lives_in_the_population(pop, loss_fn, init_params):
  sim = fs.Simulation(_algo(loss_fn, fs.aggregators.process(
      fs.aggregators.top_k(4), fs.aggregators.weighted_sum_reducer(),
      fs.aggregators.normalize())), pop, cohort_size=5)
  state = sim.init(init_params(), jax.random.key(1))
  ids = np.asarray(sim.sampler.sample(
      jax.random.split(jax.random.fold_in(state.key, 0), 3)[0], pop.num_clients).ids)
  state, _ = sim.round(state)
  norms = np.asarray(jax.vmap(fs.aggregators.global_norm)(state.agg_client_states))
  assert np.all(norms[ids] > 0)
  assert np.all(np.delete(norms, ids) == 0)
  # k = P sends everything: no residual, same result as the plain mean.
  full = fs.Simulation(_algo(loss_fn, fs.aggregators.process(
      fs.aggregators.top_k(18), fs.aggregators.weighted_sum_reducer(),
      fs.aggregators.normalize())), pop, cohort_size=5)
  plain = fs.Simulation(_algo(loss_fn, fs.aggregators.weighted_mean()), pop, cohort_size=5)
  a, _ = full.run(full.init(init_params(), jax.random.key(1)), num_rounds=2)
  b, _ = plain.run(plain.init(init_params(), jax.random.key(1)), num_rounds=2)
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(a.agg_client_states["w"]).max()) == 0.0


def test_bad_compression_inputs(pop, loss_fn, init_params):
  for bits in (0, 25, 2.5, True):
    with pytest.raises(ValueError, match="bits must be an int in"):
      fs.aggregators.quantize(bits)
  agg = fs.aggregators.process(fs.aggregators.top_k(19), fs.aggregators.weighted_sum_reducer(),
                               fs.aggregators.normalize())
  with pytest.raises(ValueError, match="only 18 parameters"):
    fs.Simulation(_algo(loss_fn, agg), pop, cohort_size=4).init(init_params(),
                                                                jax.random.key(0))
  with pytest.raises(ValueError, match="exactly one of k"):
    fs.aggregators.top_k().init(init_params())
