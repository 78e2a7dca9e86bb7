"""Robust aggregation rules and attacks against NumPy oracles, in isolation and in the round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import round_keys, train_client
from scipy import stats

import fedjax_sim as fs

K, REAL = 11, 9  # two padded slots


def stack(seed=0, k=K, real=REAL):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(k, 4, 3)).astype(np.float32)
  b = rng.normal(size=(k, 5)).astype(np.float32) * 3
  a[real:] = 0  # padded slots are zeroed by the engine
  b[real:] = 0
  w = rng.integers(1, 20, k).astype(np.float32)
  mask = np.arange(k) < real
  perm = rng.permutation(k)  # padded slots anywhere in the stack
  return {"a": a[perm], "b": b[perm]}, w[perm], mask[perm]


def flat_real(delta, mask):
  return np.concatenate([np.asarray(delta[k]).reshape(len(mask), -1) for k in ("a", "b")],
                        axis=1)[mask]


def unflat(row):
  return {"a": row[:12].reshape(4, 3), "b": row[12:]}


def run_stacked(reducer, delta, w, mask):
  ups = fs.WeightedUpdate({k: jnp.asarray(v) for k, v in delta.items()}, jnp.asarray(w))
  out, metrics = jax.jit(reducer.stacked, static_argnums=(2, 3))(ups, jnp.asarray(mask), None,
                                                                 None)
  return {k: np.asarray(v) for k, v in out.delta.items()}, float(out.weight), metrics


def assert_tree_close(got, want, rtol=1e-5, atol=1e-5):
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol)


def krum_oracle(x, f, m):
  n = len(x)
  scores = []
  for i in range(n):
    d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
    scores.append(sum(d[: n - f - 2]))
  best = np.argsort(scores, kind="stable")[:m]
  return x[best].mean(axis=0)


def geomed_oracle(x, alpha, iters, eps):
  v = (alpha[:, None] * x).sum(0) / alpha.sum()
  for _ in range(iters):
    b = np.array([a / max(eps, np.linalg.norm(v - xi)) for a, xi in zip(alpha, x)])
    v = (b[:, None] * x).sum(0) / b.sum()
  return v


def cc_oracle(x, tau, iters):
  v = np.zeros(x.shape[1])
  for _ in range(iters):
    step = np.zeros_like(v)
    for xi in x:
      d = xi - v
      nrm = np.linalg.norm(d)
      step += d * min(1.0, tau / nrm)
    v = v + step / len(x)
  return v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rules_equal_numpy_oracles(seed):
  delta, w, mask = stack(seed)
  x = flat_real(delta, mask).astype(np.float64)
  cases = [
      (fs.aggregators.median_reducer(), np.median(x, axis=0)),
      (fs.aggregators.trimmed_mean_reducer(0.2), stats.trim_mean(x, 0.2, axis=0)),
      (fs.aggregators.trimmed_mean_reducer(0.0), x.mean(axis=0)),
      (fs.aggregators.krum_reducer(2, 1), krum_oracle(x, 2, 1)),
      (fs.aggregators.krum_reducer(2, 4), krum_oracle(x, 2, 4)),
      (fs.aggregators.krum_reducer(2, None), krum_oracle(x, 2, REAL - 2)),
      (fs.aggregators.geometric_median_reducer(6, 1e-5), geomed_oracle(x, w[mask], 6, 1e-5)),
      (fs.aggregators.geometric_median_reducer(3, 1e-5, weighted=False),
       geomed_oracle(x, np.ones(REAL), 3, 1e-5)),
      (fs.aggregators.centered_clip_reducer(1.5, 4), cc_oracle(x, 1.5, 4)),
  ]
  for reducer, want in cases:
    got, weight, _ = run_stacked(reducer, delta, w, mask)
    assert weight == 1.0
    assert_tree_close(got, unflat(want), rtol=2e-5, atol=2e-5)


def test_median_even_count_and_empty_cohort():
  delta, w, mask = stack(3, k=6, real=4)
  got, _, _ = run_stacked(fs.aggregators.median_reducer(), delta, w, mask)
  assert_tree_close(got, unflat(np.median(flat_real(delta, mask), axis=0)))
  none = np.zeros_like(mask)
  got, weight, _ = run_stacked(fs.aggregators.median_reducer(), delta, w, none)
  assert weight == 0.0 and all(np.all(v == 0) for v in got.values())


def test_robust_rules_resist_outliers():
  rng = np.random.default_rng(0)
  honest = rng.normal(1.0, 0.1, size=(16, 8)).astype(np.float32)
  bad = np.full((4, 8), -50.0, np.float32)
  delta = {"w": np.concatenate([honest, bad])}
  mask = np.ones(20, bool)
  w = np.ones(20, np.float32)
  for reducer in [fs.aggregators.median_reducer(), fs.aggregators.trimmed_mean_reducer(0.25),
                  fs.aggregators.krum_reducer(4), fs.aggregators.geometric_median_reducer(20),
                  fs.aggregators.centered_clip_reducer(1.0, 10)]:
    ups = fs.WeightedUpdate({"w": jnp.asarray(delta["w"])}, jnp.asarray(w))
    out, _ = reducer.stacked(ups, jnp.asarray(mask), None, None)
    assert np.all(np.abs(np.asarray(out.delta["w"]) - 1.0) < 0.35), reducer


# -- in the round ---------------------------------------------------------------------------


def median_oracle_round(pop, params, run_key, r, ids, loss_fn):
  _, client_key, _, _ = round_keys(run_key, r)
  deltas = []
  for cid in ids:
    n = int(pop.num_examples[cid])
    w = train_client(loss_fn, optax.sgd(0.2), params, pop.client(int(cid)), n, pop.max_examples,
                     jax.random.fold_in(client_key, int(cid)), batch_size=4, epochs=1)
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w))
  agg = jax.tree.map(lambda *ds: np.median(np.stack(ds), axis=0), *deltas)
  return jax.tree.map(lambda p, d: np.asarray(p) - d, params, agg)


# Slow (default tier budget): several chunkings compiled; test_robust_rules_resist_outliers stays.
@pytest.mark.slow
def test_median_round_matches_oracle_and_chunking(pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, aggregator=fs.aggregators.median())
  key = jax.random.key(3)
  results = []
  for chunk in (3, 8):
    sim = fs.Simulation(algo, pop, cohort_size=8, chunk_size=chunk)
    state = sim.init(init_params(), key)
    state, _ = sim.round(state)
    results.append(state.params)
  ids = np.asarray(sim.sampler.sample(round_keys(key, 0)[0], pop.num_clients).ids)
  want = median_oracle_round(pop, init_params(), key, 0, ids, loss_fn)
  for got in results:
    for k in want:
      np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=2e-6)


def _fedavg(loss_fn, agg):
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, aggregator=agg)


@pytest.fixture(scope="module")
def delta_of(init_params):
  """``delta_of(sim, key)``: ``init_params() - params`` after one round, and its metrics."""

  def delta(sim, key):
    state = sim.init(init_params(), key)
    state, metrics = sim.round(state)
    return jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), state.params,
                        init_params()), metrics

  return delta


@pytest.mark.slow  # (~3 s) test_alie_in_round_rewrites_the_attackers_rows stays
def test_sign_flip_and_scaling_rewrite_only_attackers(pop, loss_fn, delta_of):
  key = jax.random.key(9)
  n = pop.num_clients
  clean, _ = delta_of(fs.Simulation(_fedavg(loss_fn, fs.aggregators.sum()), pop, cohort_size=n),
                    key)
  everyone = fs.attacks.choose(n, ids=np.arange(n))
  flipped, m = delta_of(fs.Simulation(_fedavg(loss_fn, fs.attacks.apply(
      fs.aggregators.sum(), fs.attacks.sign_flip(everyone, scale=2.0))), pop, cohort_size=n), key)
  assert m["malicious"] == 1.0
  for k in clean:
    np.testing.assert_allclose(flipped[k], -2.0 * clean[k], rtol=1e-5, atol=1e-6)
  nobody = fs.attacks.choose(n, ids=np.array([], int))
  same, m = delta_of(fs.Simulation(_fedavg(loss_fn, fs.attacks.apply(
      fs.aggregators.sum(), fs.attacks.scaling(nobody, 10.0))), pop, cohort_size=n), key)
  assert m["malicious"] == 0.0
  for k in clean:
    np.testing.assert_allclose(same[k], clean[k], rtol=1e-6, atol=1e-7)


def test_omniscient_attacks_equal_oracle():
  delta, w, mask = stack(5)
  ids = np.arange(K) * 3
  bad = np.zeros(3 * K, bool)
  bad[ids[[0, 4, 7]]] = True
  x = flat_real(delta, np.ones(K, bool)).astype(np.float64)
  rows_bad = bad[ids] & mask
  honest = x[mask & ~rows_bad]
  mu, sd = honest.mean(0), honest.std(0)
  n, f = mask.sum(), rows_bad.sum()
  s = np.floor(n / 2 + 1) - f
  z = stats.norm.ppf((n - s) / n)
  for attack, row in [(fs.attacks.alie(bad), mu - z * sd), (fs.attacks.alie(bad, z=1.5),
                                                          mu - 1.5 * sd),
                      (fs.attacks.ipm(bad, 0.5), -0.5 * mu)]:
    agg = fs.attacks.apply(fs.aggregators.sum(), attack)
    ups = fs.WeightedUpdate({k: jnp.asarray(v) for k, v in delta.items()}, jnp.asarray(w))
    out, metrics = agg.reduce.attack(ups, jnp.asarray(mask), jnp.asarray(ids), None, None)
    got = flat_real(out.delta, np.ones(K, bool))
    want = x.copy()
    want[rows_bad] = row
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-5)
    assert metrics[f"{attack.name}_attackers"] == f


def test_alie_in_round_rewrites_the_attackers_rows(pop, loss_fn, init_params, delta_of):
  # In the round, the mean of the attacked stack equals: honest updates plus 3 copies of
  # mu - z sigma of the honest ones (the oracle of test_omniscient_attacks_equal_oracle).
  key = jax.random.key(2)
  bad = fs.attacks.choose(pop.num_clients, fraction=0.25, seed=1)
  n = pop.num_clients
  # Per-client honest updates from the engine's own client update and keys.
  _, client_key, _, _ = round_keys(key, 0)
  honest = []
  for cid in range(n):
    w = train_client(loss_fn, optax.sgd(0.2), init_params(), pop.client(cid),
                     int(pop.num_examples[cid]), pop.max_examples,
                     jax.random.fold_in(client_key, cid), batch_size=4, epochs=1)
    honest.append(np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in zip(
        jax.tree.leaves(init_params()), jax.tree.leaves(w))]))
  honest = np.stack(honest).astype(np.float64)
  good = honest[~bad]
  s = np.floor(n / 2 + 1) - bad.sum()
  row = good.mean(0) - stats.norm.ppf((n - s) / n) * good.std(0)
  want = (good.sum(0) + bad.sum() * row) / n
  sim = fs.Simulation(_fedavg(loss_fn, fs.attacks.apply(fs.aggregators.mean(),
                                                        fs.attacks.alie(bad))),
                      pop, cohort_size=n, chunk_size=5)
  delta, m = delta_of(sim, key)
  assert m["alie_attackers"] == 3
  got = np.concatenate([np.ravel(delta[k]) for k in sorted(delta)])  # the server's mean
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_flip_labels_only_touches_attackers(clients):
  pop = fs.Population.from_clients(clients)
  bad = fs.attacks.choose(pop.num_clients, ids=np.array([1, 4]))
  poisoned = fs.attacks.flip_labels(pop, bad, num_classes=3)
  for i in range(pop.num_clients):
    y0, y1 = pop.client(i)["y"], poisoned.client(i)["y"]
    np.testing.assert_array_equal(y1, 2 - y0 if bad[i] else y0)


def test_bad_robust_inputs(pop, loss_fn, init_params):
  with pytest.raises(ValueError, match="EACH side"):
    fs.aggregators.trimmed_mean(0.5)
  with pytest.raises(ValueError, match=r"n > 2f \+ 2 = 8"):
    fs.Simulation(_fedavg(loss_fn, fs.aggregators.krum(3)), pop, cohort_size=7).init(
        init_params(), jax.random.key(0))
  with pytest.raises(ValueError, match="robust rules"):
    fs.aggregators.process(fs.aggregators.clip_l2(1.0), fs.aggregators.median_reducer(),
                           fs.aggregators.gaussian_noise(1.0, 1.0))
  with pytest.raises(ValueError, match="cannot stream"):
    fs.Simulation(_fedavg(loss_fn, fs.aggregators.median()), pop, cohort_size=8,
                  memory_budget=100).init(init_params(), jax.random.key(0))
  bad = fs.attacks.choose(5, fraction=0.2)
  with pytest.raises(ValueError, match="malicious mask has 5"):
    fs.Simulation(_fedavg(loss_fn, fs.attacks.apply(fs.aggregators.mean(),
                                                    fs.attacks.sign_flip(bad))), pop,
                  cohort_size=4)
  with pytest.raises(TypeError, match="boolean mask"):
    fs.attacks.sign_flip([1, 2])
