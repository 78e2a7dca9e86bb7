"""Bad input raises a clear Python error naming the argument, before anything is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs

X = np.zeros((6, 2), np.float32)


def linear_apply(p, x):  # conftest.py's linear model, used in the parametrize lists below
  return x @ p["w"] + p["b"]


def init_params():
  w = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32) * 0.1
  return {"w": jnp.asarray(w), "b": jnp.zeros(3, jnp.float32)}


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


# -- what a user of optax / flax / Flower plausibly gets wrong (issue 15) ---------------------

_OPT = dict(batch_size=2, local_epochs=1)
API_CASES = [
    # optax: the factory instead of a transformation.
    ("client_optimizer=optax.sgd (uncalled)",
     lambda: fs.algorithms.fedavg(_LOSS, client_optimizer=optax.sgd, **_OPT), TypeError,
     r"client_optimizer must be an optax.GradientTransformation .*got function"),
    ("server_optimizer=optax.adam (uncalled)",
     lambda: fs.algorithms.fedavg(_LOSS, client_optimizer=optax.sgd(0.1), **_OPT,
                                  server_optimizer=optax.adam), TypeError,
     r"server_optimizer must be an optax.GradientTransformation"),
    ("local_epochs=0", lambda: fedavg(local_epochs=0), ValueError,
     r"local_epochs must be a positive int; got 0"),
    ("batch_size=2.5", lambda: fedavg(batch_size=2.5), ValueError,
     r"batch_size .*must be a positive int; got 2.5"),
    # Flower: fractions given as percentages, counts of zero.
    ("poisson q as a percentage", lambda: fs.sampling.poisson(10, 5), ValueError,
     r"q must lie in \[0, 1\]; got 10"),
    ("uniform cohort 0", lambda: fs.sampling.uniform(0), ValueError,
     r"cohort_size must be a positive int; got 0"),
    ("poisson cap 0", lambda: fs.sampling.poisson(0.1, 0), ValueError,
     r"max_cohort_size must be a positive int; got 0"),
    ("availability above 1", lambda: fs.sampling.poisson(0.1, 10, availability=[1.5, 0.2]),
     ValueError, r"availability must lie in \[0, 1\]; got values up to 1.5"),
    ("all-zero sampling weights", lambda: fs.sampling.uniform(2, weights=[0, 0, 0]), ValueError,
     "weights are all zero"),
    # Data: shapes and dtypes.
    ("client_ids 2-D", lambda: fs.Population.from_arrays({"x": X[:4]}, np.zeros((2, 2), int)),
     ValueError, r"client_ids must be 1-D .*shape \(2, 2\)"),
    ("object feature", lambda: fs.Population.from_arrays({"x": np.array([None] * 3)},
                                                         np.zeros(3, int)),
     TypeError, r"features\['x'\] has dtype object"),
    ("scalar feature", lambda: fs.Population.from_arrays({"x": np.float32(1)}, np.zeros(1, int)),
     ValueError, r"features\['x'\] is a scalar"),
    ("from_clients given a dict", lambda: fs.Population.from_clients({"x": np.zeros(3)}),
     ValueError, "clients must be a non-empty list of per-client dicts"),
    ("from_clients feature names differ",
     lambda: fs.Population.from_clients([{"x": np.zeros(3)}, {"z": np.zeros(3)}]), ValueError,
     r"clients\[1\] has features \['z'\] but clients\[0\] has \['x'\]"),
    ("int64 label beyond int32",
     lambda: fs.Population.from_arrays({"y": np.array([0, 2**32 + 1])}, np.zeros(2, int)),
     ValueError, r"features\['y'\] \(int64\) has values in \[0, 4294967297\], outside int32"),
    ("float64 beyond float32",
     lambda: fs.Population.from_arrays({"x": np.array([1e39])}, np.zeros(1, int)), ValueError,
     r"features\['x'\] has float64 values up to 1e\+39, beyond float32"),
    # Aggregators.
    ("trimmed_mean beta 0.5", lambda: fs.aggregators.trimmed_mean(0.5), ValueError,
     "beta is the fraction trimmed from EACH side"),
    ("dp_mean negative clip", lambda: fs.aggregators.dp_mean(clip=-1.0, noise_multiplier=1.0),
     ValueError, r"clip must be > 0 \(a finite number\); got -1.0"),
    ("secure_mean bits 1", lambda: fs.aggregators.secure_mean(bits=1), ValueError,
     r"bits must be an int in \[2, 32\]"),
    ("krum negative f", lambda: fs.aggregators.krum(-1), ValueError,
     r"num_byzantine must be a non-negative int; got -1"),
    ("krum on a small cohort",
     lambda: _sim(aggregator=fs.aggregators.krum(2)).init(init_params(), jax.random.key(0)),
     ValueError, r"Krum with num_byzantine=2 needs a cohort of n > 2f \+ 2 = 6 clients; the "
                 r"cohort has 3"),
    ("top_k k 0", lambda: fs.aggregators.top_k(0), ValueError, r"k must be a positive int"),
    # Simulation construction.
    ("loss function as algorithm",
     lambda: fs.Simulation(_LOSS, fs.Population.from_arrays({"x": X}, np.arange(6)),
                           cohort_size=2), TypeError, "algorithm must be an fs.algorithms"),
    ("dict as population", lambda: fs.Simulation(fedavg(), {"x": X}, cohort_size=2), TypeError,
     "population must be an fs.Population"),
    ("sampler as a string",
     lambda: fs.Simulation(fedavg(), fs.Population.from_arrays({"x": X}, np.arange(6)),
                           sampler="uniform"), TypeError, "sampler must be fs.sampling"),
    ("population_on typo",
     lambda: fs.Simulation(fedavg(), fs.Population.from_arrays({"x": X}, np.arange(6)),
                           cohort_size=2, population_on="gpu"), ValueError,
     "population_on must be 'device', 'sharded' or 'host'"),
    ("Poisson cap far below q*N",
     lambda: fs.Simulation(fedavg(), fs.Population.from_arrays({"x": X}, np.arange(6)),
                           sampler=fs.sampling.poisson(1.0, 2)), ValueError,
     r"max_cohort_size=2 with q=1.0 on 6 clients \(expected cohort 6.0"),
    # Privacy.
    ("epsilon delta as a string",
     lambda: fs.privacy.epsilon(fs.sampling.poisson(0.1, 100), 100, 1.0, 10, "1e-5"), TypeError,
     r"delta must be a number in \(0, 1\); got str '1e-5'"),
    ("epsilon unknown accountant",
     lambda: fs.privacy.epsilon(fs.sampling.poisson(0.1, 100), 100, 1.0, 10, 1e-5,
                                accountant="moments"), ValueError,
     r"accountant must be one of \('rdp', 'pld'\)"),
    ("calibrate target 0",
     lambda: fs.privacy.calibrate_noise_multiplier(0, 1e-5, 10, fs.sampling.poisson(0.1, 100),
                                                   100), ValueError,
     "target_epsilon must be > 0"),
]


@pytest.mark.parametrize("name,fn,exc,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_mistakes_are_named(name, fn, exc, match):
  with pytest.raises(exc, match=match):
    fn()


@pytest.fixture(scope="module")
def ready():
  """A Simulation and its initial state (init traces shapes only: nothing is compiled)."""
  sim = _sim()
  return sim, sim.init(init_params(), jax.random.key(0))


RUN_CASES = [
    ("num_rounds 0", dict(num_rounds=0), ValueError, "num_rounds must be a positive int"),
    ("num_rounds 2.5", dict(num_rounds=2.5), ValueError, "num_rounds must be a positive int"),
    ("eval_every without eval_fn", dict(num_rounds=2, eval_every=1), ValueError,
     "eval_every is set but eval_fn is None"),
    ("checkpoint_every without dir", dict(num_rounds=2, checkpoint_every=1), ValueError,
     "checkpoint_every is set but checkpoint_dir is None"),
    ("tensorboard without log_dir", dict(num_rounds=2, tensorboard=True), ValueError,
     "tensorboard=True needs log_dir"),
    ("on_nonfinite typo", dict(num_rounds=2, on_nonfinite="skip"), ValueError,
     "on_nonfinite must be one of"),
    ("delta without DP", dict(num_rounds=2, delta=1e-5), ValueError,
     "delta is set but the aggregator is not central DP"),
    ("delta as a string", dict(num_rounds=2, delta="1e-5"), TypeError,
     r"delta must be a number in \(0, 1\)"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_arguments_are_checked_before_any_round(ready, name, kwargs, exc, match):
  sim, state = ready
  with pytest.raises(exc, match=match):
    sim.run(state, **kwargs)
  assert int(state.round) == 0 and not state.params["w"].is_deleted()  # nothing ran


def test_params_instead_of_state(ready):
  sim, _ = ready
  with pytest.raises(TypeError, match="state must be the ServerState from sim.init"):
    sim.run(init_params(), 1)


def test_flax_variables_dict_instead_of_params():
  # flax users often pass module.init(...) (a {"params": ...} dict) instead of its "params".
  with pytest.raises(ValueError, match=r"loss_fn\(params, batch, key\) failed"):
    _sim().init({"params": init_params()}, jax.random.key(0))


def test_legacy_prng_key_gives_the_same_run_key():
  sim = _sim()
  legacy = sim.init(init_params(), jax.random.PRNGKey(7)).key
  typed = sim.init(init_params(), jax.random.key(7)).key
  np.testing.assert_array_equal(jax.random.key_data(legacy), jax.random.key_data(typed))


def test_narrow_dtypes_are_kept_exactly():
  img = np.arange(6, dtype=np.uint8).reshape(3, 2) * 40
  x64 = np.array([0.5, -1.25, 3e38])  # float64 values float32 represents exactly / in range
  pop = fs.Population.from_arrays({"img": img, "x": x64, "y": np.array([0, 5, 2**31 - 1])},
                                  np.zeros(3, int))
  got = pop.client(0)
  assert got["img"].dtype == np.uint8 and got["img"].tolist() == img.tolist()
  assert got["x"].dtype == np.float32 and got["x"].tolist() == x64.astype(np.float32).tolist()
  assert got["y"].dtype == np.int32 and got["y"].tolist() == [0, 5, 2**31 - 1]
