"""No silent failure (issue 15): non-finite training, exact inputs, empty clients, truncating
Poisson caps, PLD calibration time, and the secure_mean error bound."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import privacy
from fedjax_sim.nonfinite import NonFiniteError
from fedjax_sim.types import RoundContext, WeightedUpdate

LOSS = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])  # conftest's linear_apply


def _algo(lr=0.1, **kw):
  return fs.algorithms.fedavg(LOSS, client_optimizer=optax.sgd(lr), batch_size=4, local_epochs=1,
                              **kw)


@pytest.fixture(scope="module")
def small_pop(make_population):
  return fs.Population.from_clients(make_population(num_clients=6, max_size=8))


# -- item 7: non-finite training ------------------------------------------------------------


# Slow (default tier budget): three compiles; test_warn_and_ignore_skip_nonfinite_rounds stays.
@pytest.mark.slow
def test_server_step_to_nan_raises_naming_the_round_with_the_last_finite_state(small_pop,
                                                                               init_params):
  # A server learning rate that is 1 for two rounds and then, by schedule, overflows float32.
  sched = lambda count: jnp.where(count < 2, 1e-30, 1e30)
  server = optax.chain(optax.sgd(sched), optax.scale(1e30))
  sim = fs.Simulation(_algo(server_optimizer=server), small_pop, cohort_size=3)
  reference = fs.Simulation(_algo(server_optimizer=optax.sgd(1.0)), small_pop, cohort_size=3)
  want, _ = reference.run(reference.init(init_params(), jax.random.key(0)), 2)
  with pytest.raises(NonFiniteError, match="round 3 is non-finite: the server step") as err:
    sim.run(sim.init(init_params(), jax.random.key(0)), 6, block_size=6)
  e = err.value
  assert e.round == 3 and int(e.state.round) == 2
  chex.assert_trees_all_close(e.state.params, want.params, rtol=1e-5)
  chex.assert_tree_all_finite(e.state.params)
  assert e.metrics["nonfinite"].tolist() == [0.0, 0.0, 1.0]
  # The last finite state resumes (here with a sane schedule) from round 3.
  state, m = reference.run(e.state, 2)
  assert int(state.round) == 4 and np.all(np.isfinite(m["loss"]))


def test_warn_and_ignore_skip_nonfinite_rounds(small_pop, init_params):
  overflow = optax.chain(optax.scale(1e30), optax.scale(1e30))  # any update -> Inf
  sim = fs.Simulation(_algo(server_optimizer=overflow), small_pop, cohort_size=3)
  with pytest.warns(RuntimeWarning, match=r"3 non-finite round\(s\) skipped.*: 1, 2, 3"):
    state, m = sim.run(sim.init(init_params(), jax.random.key(0)), 3, on_nonfinite="warn")
  assert int(state.round) == 3 and m["nonfinite"].tolist() == [1.0, 1.0, 1.0]
  chex.assert_trees_all_close(state.params, init_params())  # nothing applied, nothing NaN
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state, m = sim.run(state, 2, on_nonfinite="ignore")
  assert int(state.round) == 5 and m["nonfinite"].sum() == 2
  with pytest.raises(ValueError, match="on_nonfinite must be one of"):
    sim.run(state, 1, on_nonfinite="skip")


def test_all_clients_diverging_is_nonfinite_and_metrics_are_nan(small_pop, init_params):
  sim = fs.Simulation(_algo(lr=1e30), small_pop, cohort_size=3)
  with pytest.raises(NonFiniteError, match="round 1 .*all 3 selected clients") as err:
    sim.run(sim.init(init_params(), jax.random.key(0)), 4, block_size=2)
  m = err.value.metrics
  assert m["clients"].tolist() == [0.0] and m["nan_clients"].tolist() == [3.0]
  assert np.isnan(m["loss"][0]) and np.isnan(m["accuracy"][0])  # nothing measured: not 0.0
  assert int(err.value.state.round) == 0


def test_empty_poisson_round_reports_nan_metrics(small_pop, init_params):
  sim = fs.Simulation(_algo(), small_pop, sampler=fs.sampling.poisson(1e-9, 6))
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), 2)
  assert m["clients"].tolist() == [0.0, 0.0] and np.all(np.isnan(m["loss"]))
  assert m["nonfinite"].tolist() == [0.0, 0.0]  # empty, not diverged


def test_init_refuses_nonfinite_params(small_pop, init_params):
  sim = fs.Simulation(_algo(), small_pop, cohort_size=3)
  params = init_params()
  params["b"] = params["b"].at[1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"params\['b'\] has 1 non-finite"):
    sim.init(params, jax.random.key(0))


# -- item 8: 64-bit integers ----------------------------------------------------------------


def test_int64_labels_that_do_not_fit_int32_are_refused():
  x = np.zeros((3, 2), np.float32)
  with pytest.raises(ValueError,
                     match=r"features\['y'\] \(int64\) has values in \[0, 4294967297\]"):
    fs.Population.from_arrays({"x": x, "y": np.array([0, 1, 2**32 + 1])}, np.zeros(3, int))
  with pytest.raises(ValueError, match=r"features\['y'\] \(uint64\)"):
    fs.Population.from_arrays({"x": x, "y": np.array([0, 1, 2**63], np.uint64)}, np.zeros(3, int))
  ok = fs.Population.from_arrays({"x": x, "y": np.array([0, 2**31 - 1, -(2**31)])},
                                 np.zeros(3, int))
  assert ok.client(0)["y"].tolist() == [0, 2**31 - 1, -(2**31)]  # kept exactly


def test_float64_beyond_float32_is_refused_as_overflow_not_nan():
  x = np.array([[1.0, 1e300]])
  with pytest.raises(ValueError, match=r"features\['x'\] has float64 values up to 1e\+300"):
    fs.Population.from_arrays({"x": x}, np.zeros(1, int))


# -- item 9: a client with 0 examples does not participate -----------------------------------

REDUCERS = {
    "weighted_mean": lambda: fs.aggregators.weighted_mean(),
    "mean": lambda: fs.aggregators.mean(),
    "median": lambda: fs.aggregators.median(),
    "trimmed_mean": lambda: fs.aggregators.trimmed_mean(0.2),
    "krum": lambda: fs.aggregators.krum(1),
    "multi_krum": lambda: fs.aggregators.multi_krum(1, 3),
    "geometric_median": lambda: fs.aggregators.geometric_median(),
    "centered_clip": lambda: fs.aggregators.centered_clip(0.5),
    "norm_bounded_mean": lambda: fs.aggregators.norm_bounded_mean(0.5),
    "dp_mean_fixed_denominator": lambda: fs.aggregators.dp_mean(0.5, 0.0, denominator=6.0),
}


FAST = ("median",)  # the rest (~3-5 s each on a 2-core box) are slow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(REDUCERS)])
def test_empty_clients_do_not_participate_under_any_reducer(name, init_params, make_population):
  # Oracle: the same population without its empty clients (appended last, so the other
  # clients keep their ids and keys), every client selected each round.
  clients = make_population(num_clients=6, max_size=8)
  empty = {"x": np.zeros((0, 5), np.float32), "y": np.zeros((0,), np.int32)}
  with_empty = fs.Population.from_clients(clients + [empty, empty])
  without = fs.Population.from_clients(clients)
  results = []
  for pop in (with_empty, without):
    sim = fs.Simulation(_algo(aggregator=REDUCERS[name]()), pop, cohort_size=pop.num_clients)
    results.append(sim.run(sim.init(init_params(), jax.random.key(3)), 2))
  (got, got_m), (want, want_m) = results
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
  assert got_m["clients"].tolist() == want_m["clients"].tolist() == [6.0, 6.0]
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-6)


# -- item 10: a Poisson cap far below q * N ---------------------------------------------------


def test_poisson_cap_below_expected_cohort_is_refused_with_the_numbers(small_pop, make_population):
  pop = fs.Population.from_clients(make_population(num_clients=40, max_size=3))
  with pytest.raises(ValueError, match=r"max_cohort_size=4 with q=0.5 on 40 clients \(expected "
                                       r"cohort 20.0 \+- 3.2\) truncates about 100% of rounds"):
    fs.Simulation(_algo(), pop, sampler=fs.sampling.poisson(0.5, 4))
  with pytest.warns(UserWarning, match=r"max_cohort_size=22 .* truncates about 21% of rounds"):
    fs.Simulation(_algo(), pop, sampler=fs.sampling.poisson(0.5, 22))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fs.Simulation(_algo(), pop, sampler=fs.sampling.poisson(0.5, 34))  # q*N + 4 sd: quiet


# -- item 13: clear errors ------------------------------------------------------------------


def _labels_sim(y, params):
  rng = np.random.default_rng(0)
  pop = fs.Population.from_arrays({"x": rng.normal(size=(12, 5)).astype(np.float32), "y": y},
                                  np.arange(12) % 3)
  sim = fs.Simulation(_algo(), pop, cohort_size=2)
  sim.init(params, jax.random.key(0))


@pytest.mark.parametrize("y,exc,match", [
    (np.zeros(12, np.float32), TypeError, r"labels 'y' have dtype float32; classifier_loss"),
    (np.zeros((12, 1), np.int32), ValueError, r"labels 'y' have shape \(12, 1\).*\(12,\)"),
])
def test_label_mistakes_are_named(y, exc, match, init_params):
  with pytest.raises(exc, match=match):
    _labels_sim(y, init_params())


def test_missing_label_feature_gets_the_librarys_message(init_params):
  pop = fs.Population.from_arrays({"x": np.zeros((4, 5), np.float32)}, np.arange(4))
  with pytest.raises(ValueError, match=r"classifier_loss reads features 'x' and 'y'"):
    fs.Simulation(_algo(), pop, cohort_size=2).init(init_params(), jax.random.key(0))


def test_string_delta_is_named(small_pop, init_params):
  agg = fs.aggregators.dp_mean(clip=1.0, noise_multiplier=1.0)
  sim = fs.Simulation(_algo(aggregator=agg), small_pop, cohort_size=3)
  with pytest.raises(TypeError, match=r"delta must be a number in \(0, 1\); got str '1e-5'"):
    sim.run(sim.init(init_params(), jax.random.key(0)), 1, delta="1e-5")


def test_rbg_key_is_refused_by_name(small_pop, init_params):
  sim = fs.Simulation(_algo(), small_pop, cohort_size=3)
  with pytest.raises(ValueError, match="key must use the default PRNG implementation"):
    sim.init(init_params(), jax.random.key(0, impl="rbg"))


def test_zero_size_leaf_with_checkpoint_dir_is_refused_before_any_round(small_pop, tmp_path,
                                                                        init_params):
  sim = fs.Simulation(_algo(), small_pop, cohort_size=3)
  params = {**init_params(), "unused": jnp.zeros((0,))}
  state = sim.init(params, jax.random.key(0))
  with pytest.raises(ValueError, match=r"state\.params\['unused'\] has zero size"):
    sim.run(state, 2, checkpoint_dir=str(tmp_path / "ck"))
  assert int(state.round) == 0 and not state.params["w"].is_deleted()  # nothing ran


def test_reusing_a_donated_state_is_named(small_pop, init_params):
  sim = fs.Simulation(_algo(), small_pop, cohort_size=3)
  state = sim.init(init_params(), jax.random.key(0))
  sim.run(state, 1)
  with pytest.raises(ValueError, match="state was donated to an earlier sim.run"):
    sim.run(state, 1)


def test_state_runs_on_a_rebuilt_identical_simulation(small_pop, init_params):
  sim = fs.Simulation(_algo(), small_pop, cohort_size=3)
  # Two rounds, then two more: one block program compiled for both runs.
  state, _ = sim.run(sim.init(init_params(), jax.random.key(0)), 2)
  want, want_m = sim.run(jax.tree.map(jnp.copy, state), 2)
  rebuilt = fs.Simulation(_algo(), small_pop, cohort_size=3)
  got, got_m = rebuilt.run(state, 2)
  chex.assert_trees_all_close(got.params, want.params)
  np.testing.assert_allclose(got_m["loss"], want_m["loss"])
  other = fs.Simulation(_algo(server_optimizer=optax.adam(0.1)), small_pop, cohort_size=3)
  with pytest.raises(ValueError, match="state does not match this Simulation"):
    other.run(got, 1)


# -- item 15: PLD calibration is bracketed ----------------------------------------------------


def test_pld_calibration_evaluates_few_accountants_near_the_answer(monkeypatch):
  calls = []
  real = privacy.epsilon

  def counting(sampler, n, z, t, delta, *, accountant="rdp", **mechanism):
    if accountant == "pld":
      calls.append(z)
    return real(sampler, n, z, t, delta, accountant=accountant, **mechanism)

  monkeypatch.setattr(privacy, "epsilon", counting)
  sampler = fs.sampling.poisson(0.01, 10_000)
  z = privacy.calibrate_noise_multiplier(2.0, 1e-5, 300, sampler, 10_000, accountant="pld")
  assert len(calls) <= 12, calls  # each PLD evaluation is at most ~0.3 s at these z
  assert min(calls) > 0.5 * z  # never at a tiny z, where one evaluation takes minutes
  monkeypatch.setattr(privacy, "epsilon", real)
  assert privacy.epsilon(sampler, 10_000, z, 300, 1e-5, accountant="pld") <= 2.0
  assert privacy.epsilon(sampler, 10_000, z * (1 - 3e-3), 300, 1e-5, accountant="pld") > 2.0


# -- item 19: secure_mean's error bound with unequal client sizes -----------------------------


def _secure_round(agg, deltas, sizes, key):
  k, p = deltas.shape
  context = RoundContext(
      expected_cohort_size=float(k), num_clients=k, client_sizes=np.asarray(sizes, float),
      params_template={"w": jax.ShapeDtypeStruct((p,), jnp.float32)},
      shared_key=jax.random.fold_in(key, 1), cohort_kept=jnp.ones(k, bool), max_cohort_size=k)
  params = {"w": jnp.zeros(p)}
  total = None
  for i in range(k):
    up, _, _ = agg.per_client.aggregate(
        WeightedUpdate({"w": deltas[i]}, jnp.float32(sizes[i])), agg.init(params)[0],
        jax.random.fold_in(key, 100 + i), context._replace(client_id=jnp.int32(i)))
    c = agg.reduce.contribute(up, jnp.float32(1.0))
    total = c if total is None else jax.tree.map(jnp.add, total, c)
  out, _, metrics = agg.post.aggregate(total, agg.init(params)[1], key, context)
  return np.asarray(out.delta["w"]), metrics


@pytest.mark.parametrize("bits", [16, 32])
def test_weighted_secure_mean_error_within_the_stated_bound(bits):
  sizes = np.array([100.0, 1.0, 1.0, 1.0])
  r = np.minimum(sizes / sizes.max(), 1.0)
  agg = fs.aggregators.secure_mean(bits=bits, clip_range=1.0)
  worst_over_scale = 0.0
  for seed in range(20):
    rng = np.random.default_rng(seed)
    deltas = rng.uniform(-1, 1, size=(4, 64)).astype(np.float32)
    exact = (r[:, None] * deltas.astype(np.float64)).sum(0) / r.sum()  # no clipping: |r x| <= 1
    got, m = _secure_round(agg, jnp.asarray(deltas), sizes, jax.random.key(seed))
    err = float(np.max(np.abs(got - exact)))
    scale, bound = float(m["secagg_scale"]), float(m["secagg_error_bound"])
    assert bound == pytest.approx(4 / (scale * r.sum()) + 2**-24 * (3 * 4 / r.sum() + 2),
                                  rel=1e-5)
    assert err <= bound, (seed, err, bound)
    worst_over_scale = max(worst_over_scale, err * scale)
  if bits == 16:
    assert worst_over_scale > 1.0  # the old "below 1/scale" claim does not hold when weighted


def test_an_inf_sentinel_in_the_optimizer_state_is_not_nonfinite_training(small_pop, init_params):
  # A server optimizer whose state starts at +Inf (a "best so far" value) and stays there.
  def init(params):
    return {"best": jnp.float32(jnp.inf)}

  def update(updates, state, params=None):
    return updates, state

  sim = fs.Simulation(_algo(server_optimizer=optax.GradientTransformation(init, update)),
                      small_pop, cohort_size=3)
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), 2)
  assert m["nonfinite"].tolist() == [0.0, 0.0] and int(state.round) == 2
