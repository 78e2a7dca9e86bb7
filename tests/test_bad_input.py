"""Bad input raises a clear Python error naming the argument, before anything is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import init_params, linear_apply

import fedjax_sim as fs

X = np.zeros((6, 2), np.float32)


def fedavg(loss_fn=None, **kw):
  loss_fn = loss_fn or fs.models.classifier_loss(linear_apply)
  args = dict(client_optimizer=optax.sgd(0.1), batch_size=2, local_epochs=1)
  args.update(kw)
  return fs.algorithms.fedavg(loss_fn, **args)


CASES = [
    ("mismatched feature lengths",
     lambda: fs.Population.from_arrays({"x": X, "y": np.zeros(5)}, np.zeros(6, int)),
     ValueError, "same number of examples"),
    ("client_ids wrong length",
     lambda: fs.Population.from_arrays({"x": X}, np.zeros(5, int)), ValueError, "client_ids"),
    ("client_ids non-integer",
     lambda: fs.Population.from_arrays({"x": X}, np.zeros(6)), TypeError, "integer"),
    ("empty population",
     lambda: fs.Population.from_arrays({"x": X[:0]}, np.zeros(0, int)), ValueError, "empty"),
    ("empty features", lambda: fs.Population.from_arrays({}, np.zeros(0, int)), ValueError,
     "non-empty"),
    ("non-finite features",
     lambda: fs.Population.from_arrays({"x": np.full((6, 2), np.nan)}, np.zeros(6, int)),
     ValueError, "non-finite"),
    ("reserved feature name",
     lambda: fs.Population.from_arrays({fs.MASK_KEY: X}, np.zeros(6, int)), ValueError,
     "reserved"),
    ("client id out of range",
     lambda: fs.Population.from_arrays({"x": X}, np.arange(6), num_clients=3), ValueError,
     "num_clients"),
    ("cohort larger than population",
     lambda: fs.Simulation(fedavg(), fs.Population.from_arrays({"x": X}, np.arange(6)),
                           cohort_size=7), ValueError, "cohort_size=7 exceeds"),
    ("cohort_size and sampler",
     lambda: fs.Simulation(fedavg(), fs.Population.from_arrays({"x": X}, np.arange(6)),
                           cohort_size=2, sampler=fs.sampling.uniform(2)), ValueError,
     "exactly one"),
    ("q above 1", lambda: fs.sampling.poisson(1.5, 10), ValueError, "q must"),
    ("q zero", lambda: fs.sampling.poisson(0.0, 10), ValueError, "q must"),
    ("batch_size < 1", lambda: fedavg(batch_size=0), ValueError, "batch_size"),
    ("epochs and steps", lambda: fedavg(local_steps=3), ValueError, "exactly one of local_epochs"),
    ("neither epochs nor steps", lambda: fedavg(local_epochs=None), ValueError,
     "exactly one of local_epochs"),
    ("clip <= 0", lambda: fs.aggregators.clip_l2(0.0), ValueError, "clip"),
    ("negative noise", lambda: fs.aggregators.dp_mean(clip=1.0, noise_multiplier=-1.0),
     ValueError, "noise_multiplier"),
    ("noise without clipping",
     lambda: fs.aggregators.process(post=fs.aggregators.gaussian_noise(1.0, 1.0)), ValueError,
     "clip"),
    ("DP on weighted mean",
     lambda: fs.aggregators.process(per_client=fs.aggregators.clip_l2(1.0),
                                    reduce=fs.aggregators.weighted_sum_reducer(),
                                    post=fs.aggregators.gaussian_noise(1.0, 1.0)),
     ValueError, "weighted"),
    ("lone stage as aggregator", lambda: fedavg(aggregator=fs.aggregators.clip_l2(1.0)),
     TypeError, "Process"),
    ("optimizer not optax", lambda: fedavg(client_optimizer="sgd"), TypeError,
     "client_optimizer"),
    ("negative mu",
     lambda: fs.algorithms.fedprox(fs.models.classifier_loss(linear_apply), mu=-1,
                                   client_optimizer=optax.sgd(0.1), batch_size=2, local_epochs=1),
     ValueError, "mu"),
    ("chunk_size 0",
     lambda: fs.Simulation(fedavg(), fs.Population.from_arrays({"x": X}, np.arange(6)),
                           cohort_size=2, chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("name,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(name, fn, exc, match):
  with pytest.raises(exc, match=match):
    fn()


def _sim(loss_fn=None, **kw):
  rng = np.random.default_rng(0)
  pop = fs.Population.from_arrays(
      {"x": rng.normal(size=(30, 5)).astype(np.float32), "y": rng.integers(0, 3, 30)},
      rng.integers(0, 6, 30))
  return fs.Simulation(fedavg(loss_fn, **kw), pop, cohort_size=3)


def test_non_scalar_loss_is_reported_before_compiling():
  def per_example(p, batch, key):
    logits = linear_apply(p, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), {}

  with pytest.raises(ValueError, match="scalar loss"):
    _sim(per_example).init(init_params(), jax.random.key(0))


def test_params_that_do_not_fit_the_model():
  with pytest.raises(ValueError, match="loss_fn.*failed"):
    _sim().init({"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, jax.random.key(0))


def test_params_optimizer_mismatch():
  bad = optax.masked(optax.sgd(0.1), {"w": True})  # mask tree lacks "b"
  with pytest.raises(ValueError, match="client_optimizer"):
    _sim(client_optimizer=bad).init(init_params(), jax.random.key(0))


def test_integer_params_and_bad_key():
  with pytest.raises(TypeError, match="floating"):
    _sim().init({"w": jnp.zeros((5, 3), int), "b": jnp.zeros(3)}, jax.random.key(0))
  with pytest.raises(TypeError, match="key"):
    _sim().init(init_params(), 0)


def test_zero_example_client_is_allowed():
  pop = fs.Population.from_clients([{"x": X[:0]}, {"x": X}])
  assert pop.num_examples.tolist() == [0, 6]


def _tiny_pop():
  rng = np.random.default_rng(0)
  return fs.Population.from_arrays(
      {"x": rng.normal(size=(40, 3)).astype(np.float32), "y": rng.integers(0, 2, 40)},
      rng.integers(0, 4, 40))


def _kmeans_run(centroids, **kw):
  sim = fs.Simulation(fs.unsupervised.kmeans(3, **kw), _tiny_pop(), cohort_size=4)
  sim.run(sim.init(centroids, jax.random.key(0)), 1)


_LOSS = fs.models.classifier_loss(lambda p, x: x @ p)
MORE_CASES = [
    ("evaluate_clients batch 0", lambda: fs.evaluation.evaluate_clients(
        _LOSS, jnp.zeros((3, 2)), _tiny_pop(), batch_size=0), "batch_size"),
    ("evaluate_clients chunk 0", lambda: fs.evaluation.evaluate_clients(
        _LOSS, jnp.zeros((3, 2)), _tiny_pop(), chunk_size=0), "chunk_size"),
    ("evaluate mismatched lengths", lambda: fs.evaluation.evaluate(
        _LOSS, jnp.zeros((3, 2)), {"x": np.zeros((4, 3)), "y": np.zeros(3, int)}),
     "same number of examples"),
    ("kmeans wrong centroid count", lambda: _kmeans_run(jnp.zeros((5, 3))), r"shape \(3, 3\)"),
    ("kmeans missing feature", lambda: _kmeans_run(jnp.zeros((3, 3)), feature_key="z"),
     "feature_key"),
    ("kmeans batch 0", lambda: fs.unsupervised.kmeans(3, batch_size=0), "batch_size"),
    ("threshold batch 0", lambda: fs.unsupervised.federated_threshold(
        lambda p, x: x, None, _tiny_pop(), batch_size=0), "batch_size"),
    ("qffl loss batch 0", lambda: fs.algorithms.qffl(
        _LOSS, q=1, client_learning_rate=0.1, batch_size=4, local_epochs=1, loss_batch_size=0),
     "loss_batch_size"),
    ("cohort_size bool", lambda: fs.sampling.uniform(True), "cohort_size"),
    ("q nan", lambda: fs.sampling.poisson(float("nan"), 5), "q must"),
    ("mu inf", lambda: fs.algorithms.fedprox(
        _LOSS, mu=float("inf"), client_optimizer=optax.sgd(0.1), batch_size=2, local_epochs=1),
     "mu must"),
]


@pytest.mark.parametrize("name,fn,match", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_more_bad_input_is_clear(name, fn, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fn()
