"""BandMF correlated noise (DP-FTRL family), participation schedules and their accounting."""

import dataclasses

import chex
import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_privacy.experimental import accounting as jpa
from scipy import stats

import fedjax_sim as fs
from fedjax_sim import core
from fedjax_sim.types import PARTITION_SALT

DIM = 6


def _algorithm(aggregator):
  def client_update(broadcast, data, client_state, key):
    delta = {"w": jax.random.normal(key, (DIM,)) + broadcast["w"]}
    return fs.ClientOutput(delta, data.num_examples.astype(jnp.float32), {}, client_state)

  return fs.Algorithm(client_update, aggregator, optax.sgd(0.5))


def _population(n):
  ids = np.arange(n)
  return fs.Population.from_arrays({"x": np.zeros((n, 1), np.float32)}, ids, num_clients=n)


def _run(aggregator, sampler, rounds, chunk_size=None, n=64, seed=0):
  sim = fs.Simulation(_algorithm(aggregator), _population(n), sampler=sampler,
                      chunk_size=chunk_size)
  state = sim.init({"w": jnp.zeros(DIM)}, jax.random.key(seed))
  state, _ = sim.run(state, num_rounds=rounds, progress=False)
  return state


def _full_matrix(coefs, t):
  c = np.zeros((t, t))
  for j, v in enumerate(coefs):
    c += np.diag(np.full(t - j, v), -j)
  return c


def _noise_sequence(strategy, rounds, d, sigma=1.0):
  """The noise the stage adds over ``rounds`` rounds to a zero update of ``d`` coordinates."""
  stage = fs.aggregators.banded_noise(strategy, noise_multiplier=sigma, clip=1.0)
  zero = fs.WeightedUpdate({"w": jnp.zeros(d)}, jnp.float32(1))

  def body(state, t):
    out, state, _ = stage.aggregate(zero, state, jax.random.fold_in(jax.random.key(7), t), None)
    return state, out.delta["w"]

  _, xs = jax.lax.scan(body, stage.init(zero.delta), jnp.arange(rounds))
  return np.asarray(xs, np.float64)


def test_identity_strategy_is_dp_mean_bit_for_bit():
  sampler = fs.sampling.poisson(0.25, 40)
  a = _run(fs.aggregators.dp_mean(1.0, 0.7), sampler, 3, chunk_size=8)
  b = _run(fs.aggregators.band_mf_mean(1.0, 0.7, bands=1), sampler, 3, chunk_size=8)
  np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(b.params["w"]))
  assert not np.allclose(np.asarray(a.params["w"]), 0)


@pytest.mark.parametrize("strategy", ["toeplitz", "matrix"])
def test_banded_noise_is_c_inverse_of_the_iid_draws(strategy):
  """Oracle: the identity strategy's draws Z (same keys), then solve(C, Z) in float64."""
  t, d = 12, 4000
  if strategy == "toeplitz":
    coefs = fs.aggregators.band_mf_strategy(4)
    c, arg = _full_matrix(coefs, t), coefs
  else:
    rng = np.random.default_rng(0)
    c = np.tril(rng.uniform(0.2, 1.0, (t, t))) * (np.tri(t, k=0) - np.tri(t, k=-3))
    c /= np.linalg.norm(c, axis=0).max()
    arg = c
  z = _noise_sequence([1.0], t, d)
  x = _noise_sequence(arg, t, d)
  np.testing.assert_allclose(x, np.linalg.solve(c, z), rtol=0, atol=2e-4)


def test_banded_noise_covariance_across_rounds():
  """Whitened by C, the noise is i.i.d. N(0, σ²): KS per round, and x's covariance is C⁻¹C⁻ᵀσ²."""
  t, d, sigma = 10, 20000, 0.5
  coefs = fs.aggregators.band_mf_strategy(3)
  c = _full_matrix(coefs, t)
  x = _noise_sequence(coefs, t, d, sigma)  # [T, d]: d independent samples of the T-vector
  y = c @ x / sigma
  for row in y:
    assert stats.kstest(row, "norm").pvalue > 1e-4
  corr = np.corrcoef(y)
  assert np.abs(corr - np.eye(t)).max() < 5 / np.sqrt(d)
  ci = np.linalg.inv(c)
  expected = sigma**2 * ci @ ci.T
  emp = np.cov(x)
  se = np.sqrt((expected**2 + np.outer(np.diag(expected), np.diag(expected))) / d)
  assert np.abs(emp - expected).max() / se.max() < 6
  assert expected[1, 0] < -0.05 * sigma**2 and emp[1, 0] < 0  # correlated, not i.i.d.


SETTINGS = [  # (bands, cycle_length, q, z, rounds)
    (b, b, q, z, t)
    for b in (1, 4, 16)
    for q in (0.1, 1.0)
    for z in (0.8, 2.0)
    for t in (64, 256)
] + [(2, 8, 0.5, 1.0, 100), (1, 8, 0.3, 1.5, 37)]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_jax_privacy(accountant):
  settings = SETTINGS if accountant == "rdp" else SETTINGS[::6]
  n = 1000
  for i, (bands, cycle, q, z, t) in enumerate(settings):
    sampler = fs.sampling.cyclic_poisson(q, cycle, max_cohort_size=n)
    ours = fs.privacy.epsilon(sampler, n, z, t, 1e-6, accountant=accountant, num_bands=bands)
    rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    acc = (dpa.rdp.RdpAccountant(neighboring_relation=rel) if accountant == "rdp" else
           dpa.pld.PLDAccountant(neighboring_relation=rel, value_discretization_interval=1e-3))
    acc.compose(jpa.amplified_bandmf_event(z, t, num_bands=cycle, sampling_prob=q))
    assert ours == pytest.approx(acc.get_epsilon(1e-6), rel=1e-9), (bands, cycle, q, z, t)
    if accountant == "rdp" and i % 6 == 0:  # the run's column (what run(delta=) reports)
      col = fs.privacy.epsilon_column(sampler, n, z, None, 0, t, 1e-6, num_bands=bands)(0, t)
      assert col[-1] == pytest.approx(ours, rel=1e-9)
  assert len(settings) >= (20 if accountant == "rdp" else 4)


@pytest.mark.slow  # a compile / calibration searches (CPU budget of the default tier)
def test_calibrate_reaches_target_and_bad_pairs_refused():
  s = fs.sampling.cyclic_poisson(0.5, 4, 400)
  z = fs.privacy.calibrate_noise_multiplier(4.0, 1e-5, 80, s, 400, num_bands=4)
  assert fs.privacy.epsilon(s, 400, z, 80, 1e-5, num_bands=4) <= 4.0
  assert fs.privacy.epsilon(s, 400, z * 0.98, 80, 1e-5, num_bands=4) > 4.0
  with pytest.raises(ValueError, match="no valid accountant.*PoissonSampler"):
    fs.privacy.epsilon(fs.sampling.poisson(0.1, 400), 400, 1.0, 80, 1e-5, num_bands=4)
  with pytest.raises(ValueError, match="cycle_length=2.*smaller"):
    fs.privacy.epsilon(fs.sampling.cyclic_poisson(0.5, 2, 400), 400, 1.0, 80, 1e-5, num_bands=4)
  with pytest.raises(ValueError, match="no valid accountant.*UniformSampler"):
    fs.privacy.calibrate_noise_multiplier(4.0, 1e-5, 80, fs.sampling.uniform(10), 400,
                                          num_bands=2)
  with pytest.raises(ValueError, match="larger than the number of rounds"):
    fs.privacy.epsilon_column(s, 400, 1.0, None, 0, 3, 1e-5, num_bands=4)


def _tracker(ids, mask, n, b):
  """An independent tracker over the cohort ids only (vectorised: the per-round loop of 10^4
  rounds was seconds of Python): no client twice in a round, none again within b rounds of its
  last participation. Returns each client's participation count."""
  rounds, slots = np.nonzero(mask)
  who = ids[rounds, slots]
  order = np.lexsort((rounds, who))  # by client, then round
  who, rounds = who[order], rounds[order]
  same = who[1:] == who[:-1]
  gaps = rounds[1:][same] - rounds[:-1][same]
  assert np.all(gaps != 0), "a client twice in one cohort"
  assert np.all(gaps >= b), rounds[1:][same][gaps < b][:5]
  return np.bincount(who, minlength=n)


def test_min_separation_over_ten_thousand_rounds():
  n, b, rounds = 300, 8, 10_000
  for sampler in (fs.sampling.cyclic_poisson(0.6, b, 60), fs.sampling.balls_in_bins(b, 80)):
    algorithm = _algorithm(fs.aggregators.band_mf_mean(1.0, 1.0, bands=b))
    plan = core.plan_for(algorithm, sampler, _population(n), {"w": jnp.zeros(DIM)}, chunk_size=4)
    key = jax.random.key(3)
    cohorts = jax.jit(jax.vmap(lambda r: core.sample_cohort(plan, key, r)[0]))(
        jnp.arange(rounds))
    count = _tracker(np.asarray(cohorts.ids), np.asarray(cohorts.mask), n, b).sum()
    assert not np.asarray(cohorts.truncated).any()
    assert not np.asarray(cohorts.schedule_violations).any()
    # The counter itself counts: a cohort holding a client of another bin is reported.
    bins_j = sampler.bins(jax.random.fold_in(key, PARTITION_SALT), n)
    other = int(np.flatnonzero(np.asarray(bins_j) != 0)[0])
    bad = sampler.violations(jnp.array([other, 0]), jnp.array([True, False]), bins_j, 0)
    assert int(bad) == 1
    assert count > 0.5 * rounds * sampler.expected_cohort_size(n)
    bins = np.asarray(sampler.bins(jax.random.fold_in(key, PARTITION_SALT), n))
    assert stats.chisquare(np.bincount(bins, minlength=b)).pvalue > 1e-4


# slow tier (~4 s): CI runs it with the slow tests; BandMF and the tree also run in
# test_sharding's slow device-count workers, and test_resume_with_another_mechanism_state_is_refused
# keeps the mechanism state's resume check in the default tier
@pytest.mark.slow
def test_chunk_size_invariance_and_resume_exact():
  agg = fs.aggregators.band_mf_mean(1.0, 0.5, bands=3)
  sampler = fs.sampling.cyclic_poisson(0.75, 3, 24)
  a = _run(agg, sampler, 5, chunk_size=4)
  b = _run(agg, sampler, 5, chunk_size=8)
  sim = fs.Simulation(_algorithm(agg), _population(64), sampler=sampler, chunk_size=4)
  _, m = sim.run(sim.init({"w": jnp.zeros(DIM)}, jax.random.key(1)), 6, progress=False)
  assert np.all(np.asarray(m["schedule_violations"]) == 0) and m["clients"].sum() > 0
  np.testing.assert_allclose(np.asarray(a.params["w"]), np.asarray(b.params["w"]), atol=1e-5)
  sim = fs.Simulation(_algorithm(agg), _population(64), sampler=sampler, chunk_size=4)
  s0 = sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0))
  s2, _ = sim.run(s0, num_rounds=2, progress=False)
  s5, _ = sim.run(s2, num_rounds=3, progress=False)
  np.testing.assert_array_equal(np.asarray(s5.params["w"]), np.asarray(a.params["w"]))


def test_bad_input_named():
  with pytest.raises(ValueError, match="bands"):
    fs.aggregators.band_mf_mean(1.0, 1.0, bands=0)
  with pytest.raises(ValueError, match="bands=8 is larger than num_rounds=4"):
    fs.aggregators.band_mf_mean(1.0, 1.0, bands=8, num_rounds=4)
  with pytest.raises(ValueError, match="lower-triangular"):
    fs.aggregators.band_mf_mean(1.0, 1.0, strategy=np.triu(np.ones((4, 4))) / 2, num_rounds=4)
  with pytest.raises(ValueError, match="of the run's length"):
    fs.aggregators.band_mf_mean(1.0, 1.0, strategy=np.eye(4), num_rounds=5)
  with pytest.raises(ValueError, match="norm"):
    fs.aggregators.band_mf_mean(1.0, 1.0, strategy=[1.0, 0.5])
  with pytest.raises(ValueError, match="cycle_length"):
    fs.sampling.cyclic_poisson(0.5, 0, 10)
  with pytest.raises(ValueError, match="cycle_length=20 exceeds the number of clients"):
    fs.Simulation(_algorithm(fs.aggregators.dp_mean(1.0, 1.0)), _population(10),
                  sampler=fs.sampling.balls_in_bins(20, 4))
  agg = fs.aggregators.band_mf_mean(1.0, 1.0, strategy=np.eye(3), num_rounds=3)
  sim = fs.Simulation(_algorithm(agg), _population(16), sampler=fs.sampling.balls_in_bins(2, 8))
  with pytest.raises(ValueError, match="runs past the aggregator's strategy matrix"):
    sim.run(sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0)), num_rounds=4, progress=False)


@pytest.mark.slow
def test_resume_with_another_mechanism_state_is_refused(tmp_path):
  sampler = fs.sampling.balls_in_bins(4, 32)
  sim = fs.Simulation(_algorithm(fs.aggregators.band_mf_mean(1.0, 1.0, bands=4)), _population(64),
                      sampler=sampler, chunk_size=8)
  state, _ = sim.run(sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0)), num_rounds=4,
                     checkpoint_dir=str(tmp_path), checkpoint_every=2, progress=False)
  restored = sim.restore(str(tmp_path), {"w": jnp.zeros(DIM)})
  chex.assert_trees_all_equal(restored.agg_state, state.agg_state)
  assert int(restored.agg_state[1][0].round) == 4
  other = fs.Simulation(_algorithm(fs.aggregators.band_mf_mean(1.0, 1.0, bands=3)),
                        _population(64), sampler=sampler, chunk_size=8)
  with pytest.raises(ValueError, match="another configuration.*history"):
    other.restore(str(tmp_path), {"w": jnp.zeros(DIM)})


def test_cli_privacy_min_separation_and_bands(capsys):
  from fedjax_sim import cli

  cli.main(["privacy", "--num-clients", "1000", "--q", "0.5", "--min-separation", "4",
            "--bands", "4", "--noise-multiplier", "1.0", "--rounds", "40"])
  out = capsys.readouterr().out
  ours = fs.privacy.epsilon(fs.sampling.cyclic_poisson(0.5, 4, 1000), 1000, 1.0, 40, 1e-5,
                            num_bands=4)
  assert "min-separation 4" in out and "BandMF with 4 bands" in out
  assert f"RDP: epsilon = {ours:.4f}" in out
  cli.main(["privacy", "--num-clients", "1000", "--q", "0.5", "--bands", "4",
            "--noise-multiplier", "1.0", "--rounds", "40"])
  assert "not available: no valid accountant" in capsys.readouterr().out


def test_tree_noise_prefix_sums_are_the_tree_nodes():
  """Oracle: the running sum of the noise after round t is Σ over t's dyadic nodes of the node
  draws (node at level l of prefix t is drawn in round (t >> l) << l)."""
  t_max, d = 13, 50
  draws = _noise_sequence([1.0], t_max, d)  # the same keys: round t's fresh node
  stage = fs.aggregators.tree_noise(1.0, 1.0, t_max)
  zero = fs.WeightedUpdate({"w": jnp.zeros(d)}, jnp.float32(1))

  def body(state, t):
    out, state, _ = stage.aggregate(zero, state, jax.random.fold_in(jax.random.key(7), t), None)
    return state, out.delta["w"]

  _, xs = jax.lax.scan(body, stage.init(zero.delta), jnp.arange(t_max))
  prefix = np.cumsum(np.asarray(xs, np.float64), axis=0)
  for t in range(1, t_max + 1):
    nodes = [((t >> lv) << lv) for lv in range(t.bit_length()) if t >> lv & 1]
    np.testing.assert_allclose(prefix[t - 1], sum(draws[e - 1] for e in nodes), atol=1e-5)


@pytest.mark.slow  # a compile / calibration searches (CPU budget of the default tier)
def test_tree_accounting_is_jax_privacy_sensitivity_with_dp_accounting():
  from jax_privacy.matrix_factorization import sensitivity

  gram = fs.aggregators.tree_gram
  one = fs.sampling.cyclic_poisson(1.0, 16, 100)  # 16 rounds, min-sep 16: one participation
  assert fs.privacy.tree_sensitivity(gram, one, 16) == pytest.approx(np.sqrt(5))  # 5 levels
  for sampler, t, z in ((fs.sampling.cyclic_poisson(0.5, 4, 100), 32, 3.0),
                        (fs.sampling.poisson(0.1, 100), 20, 5.0)):
    sep = getattr(sampler, "cycle_length", 1)
    d = sensitivity.get_min_sep_sensitivity_upper_bound_for_X(gram(t), sep, -(-t // sep))
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dpa.GaussianDpEvent(z / d))
    ours = fs.privacy.epsilon(sampler, 100, z, t, 1e-5, strategy_gram=gram)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
  agg = fs.aggregators.dp_ftrl_mean(1.0, 4.0, num_rounds=8)
  sampler = fs.sampling.cyclic_poisson(0.5, 2, 32)
  sim = fs.Simulation(_algorithm(agg), _population(64), sampler=sampler, chunk_size=8)
  _, m = sim.run(sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0)), 8, delta=1e-5,
                 progress=False)
  assert m["epsilon"][-1] == pytest.approx(
      fs.privacy.epsilon(sampler, 64, 4.0, 8, 1e-5, strategy_gram=agg.strategy_gram))
  with pytest.raises(ValueError, match="strategy matrix"):
    sim.run(sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0)), 9, progress=False)


# -- at most k participations (max_participations) -----------------------------------------------


def _cohorts(sampler, n, rounds, seed=3):
  algorithm = _algorithm(fs.aggregators.dp_mean(1.0, 1.0))
  plan = core.plan_for(algorithm, sampler, _population(n), {"w": jnp.zeros(DIM)}, chunk_size=4)
  key = jax.random.key(seed)
  cohorts = jax.jit(jax.vmap(lambda r: core.sample_cohort(plan, key, r)[0]))(jnp.arange(rounds))
  return cohorts, key


def test_participation_cap_holds_over_the_run():
  """An independent tracker (counts and last round per client, from the cohort ids only): no
  client exceeds k or breaks min-separation b; under balls-in-bins every client reaches k."""
  n, b, k, rounds = 1000, 4, 10, 400
  for sampler in (fs.sampling.balls_in_bins(b, 60, max_participations=k, num_rounds=rounds),
                  fs.sampling.cyclic_poisson(0.5, b, 40, max_participations=k,
                                             num_rounds=rounds)):
    cohorts, key = _cohorts(sampler, n, rounds)
    count = _tracker(np.asarray(cohorts.ids), np.asarray(cohorts.mask), n, b)
    assert count.max() <= k, count.max()
    assert not np.asarray(cohorts.truncated).any()
    assert not np.asarray(cohorts.schedule_violations).any()
    if sampler.q == 1:  # every client joins each round of its window: exactly k times
      np.testing.assert_array_equal(count, k)
    else:
      assert count.sum() == pytest.approx(rounds * sampler.expected_cohort_size(n), rel=0.1)
    # The counter counts a client outside its window (same bin, another cycle).
    pk = jax.random.fold_in(key, PARTITION_SALT)
    bins, starts = sampler.bins(pk, n), sampler.window_starts(pk, n)
    c = int(np.flatnonzero(np.asarray(bins) == 0)[0])
    outside = (int(starts[c]) + k) % sampler.num_cycles  # the cycle just past its window
    bad = sampler.violations(jnp.array([c]), jnp.array([True]), bins, outside * b, starts)
    assert int(bad) == 1


@pytest.mark.slow  # (~3 s) test_epsilon_equals_jax_privacy and the cap's tracker test stay
def test_participation_cap_epsilon_is_the_libraries():
  """ε with the cap: dp-accounting's k-fold Poisson-sampled Gaussian (jax_privacy's dpsgd_event,
  the per-participation event of amplified BandMF); the tree's sensitivity is jax_privacy's with
  max_participations=k."""
  from jax_privacy.matrix_factorization import sensitivity

  n, delta = 1000, 1e-6
  rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
  for b, k, t, q, z in ((4, 3, 80, 0.5, 1.0), (8, 5, 100, 0.8, 1.5), (1, 7, 50, 0.1, 0.9),
                        (2, 40, 60, 0.3, 1.2)):  # the last: k >= ceil(T/b), the cap is vacuous
    capped = fs.sampling.cyclic_poisson(q, b, n, max_participations=k, num_rounds=t)
    acc = dpa.rdp.RdpAccountant(neighboring_relation=rel)
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), min(k, -(-t // b)))
    ours = fs.privacy.epsilon(capped, n, z, t, delta, num_bands=b)
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-9), (b, k, t)
    col = fs.privacy.epsilon_column(capped, n, z, None, 0, t, delta, num_bands=b)(0, t)
    assert col[-1] == pytest.approx(ours, rel=1e-9)
    uncapped = fs.privacy.epsilon(fs.sampling.cyclic_poisson(q, b, n), n, z, t, delta,
                                  num_bands=b)
    assert ours < uncapped if k < -(-t // b) else ours == pytest.approx(uncapped, rel=1e-12)
  gram = fs.aggregators.tree_gram
  capped = fs.sampling.cyclic_poisson(0.5, 2, n, max_participations=3, num_rounds=32)
  d = sensitivity.get_min_sep_sensitivity_upper_bound_for_X(gram(32), min_sep=2,
                                                            max_participations=3)
  assert fs.privacy.tree_sensitivity(gram, capped, 32) == pytest.approx(d, rel=1e-12)
  acc = dpa.rdp.RdpAccountant(neighboring_relation=rel)
  acc.compose(dpa.GaussianDpEvent(3.0 / d))
  assert fs.privacy.epsilon(capped, n, 3.0, 32, delta, strategy_gram=gram) == pytest.approx(
      acc.get_epsilon(delta), rel=1e-9)


def test_participation_cap_bad_input_before_compiling():
  with pytest.raises(ValueError, match="max_participations=3 needs num_rounds"):
    fs.sampling.cyclic_poisson(0.5, 4, 40, max_participations=3)
  with pytest.raises(ValueError, match="num_rounds=40 is only used with max_participations"):
    fs.sampling.cyclic_poisson(0.5, 4, 40, num_rounds=40)
  with pytest.raises(ValueError, match="max_participations must be a positive int"):
    fs.sampling.balls_in_bins(4, 40, max_participations=0, num_rounds=40)
  algorithm = _algorithm(fs.aggregators.dp_mean(1.0, 1.0))
  # 20 clients joining at most twice cannot fill 100 rounds: refused when the simulation is made.
  with pytest.raises(ValueError, match="max_participations=2 cannot fill num_rounds=100.*at "
                                       "least 5"):
    fs.Simulation(algorithm, _population(20),
                  sampler=fs.sampling.balls_in_bins(2, 10, max_participations=2, num_rounds=100))
  with pytest.raises(ValueError, match="max_cohort_size=2 is below the expected cohort.*"
                                       "max_participations=2 of 10 cycles"):
    fs.Simulation(algorithm, _population(200),
                  sampler=fs.sampling.balls_in_bins(4, 2, max_participations=2, num_rounds=40))
  sampler = fs.sampling.balls_in_bins(2, 16, max_participations=2, num_rounds=6)
  sim = fs.Simulation(algorithm, _population(32), sampler=sampler)
  with pytest.raises(ValueError, match="runs past the sampler's num_rounds=6"):
    sim.run(sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0)), num_rounds=7, progress=False)
  with pytest.raises(ValueError, match="num_rounds=7 exceeds the sampler's num_rounds=6"):
    fs.privacy.epsilon(sampler, 32, 1.0, 7, 1e-5)
  # Every other way to run rounds is held to the cap's rounds too (its windows would wrap):
  # one round at a time, the benchmark (compile block + timed block) and fs.sweep.
  state = sim.init({"w": jnp.zeros(DIM)}, jax.random.key(0))
  state.round.block_until_ready()
  with pytest.raises(ValueError, match="runs past the sampler's num_rounds=6"):
    sim.benchmark(state, 4)
  with pytest.raises(ValueError, match="runs past the sampler's num_rounds=6"):
    fs.sweep(lambda lr: algorithm, _population(32), {"w": jnp.zeros(DIM)}, seeds=[0],
             hyperparameters={"lr": [0.1]}, num_rounds=7, sampler=sampler)
  late = dataclasses.replace(state, round=jnp.asarray(6, state.round.dtype))
  with pytest.raises(ValueError, match="runs past the sampler's num_rounds=6"):
    sim.round(late)


def test_cli_privacy_max_participations(capsys):
  """`fedjax-sim privacy --max-participations K` prints the capped schedule's library ε (BandMF
  and the tree), and refuses a cap that cannot fill the rounds, naming the flag."""
  import re

  from fedjax_sim import cli

  args = ["privacy", "--num-clients", "1000", "--q", "0.5", "--min-separation", "4",
          "--rounds", "40", "--noise-multiplier", "2.0", "--max-participations", "3"]
  sampler = fs.sampling.cyclic_poisson(0.5, 4, 1000, max_participations=3, num_rounds=40)
  for extra, kwargs in ((["--bands", "4"], {"num_bands": 4}),
                        (["--tree"], {"strategy_gram": fs.aggregators.tree_gram})):
    assert cli.main(args + extra) == 0
    out = capsys.readouterr().out
    assert "at most 3 participations per client" in out
    got = float(re.search(r"RDP: epsilon = ([0-9.]+)", out).group(1))
    assert got == pytest.approx(fs.privacy.epsilon(sampler, 1000, 2.0, 40, 1e-5, **kwargs),
                                abs=1e-4)
  assert cli.main(["privacy", "--num-clients", "10", "--q", "1.0", "--rounds", "100",
                   "--noise-multiplier", "1", "--max-participations", "2"]) == 2
  assert "--max-participations=2 cannot fill" in capsys.readouterr().err
