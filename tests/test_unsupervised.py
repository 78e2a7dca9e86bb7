"""Federated k-means equals centralized Lloyd; quality against scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

import fedjax_sim as fs
from fedjax_sim.unsupervised import kmeans, kmeans_cost, kmeans_plus_plus


def lloyd(x, c, steps):
  x = np.asarray(x, np.float64)
  c = np.asarray(c, np.float64).copy()
  for _ in range(steps):
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    a = d2.argmin(1)
    for j in range(len(c)):
      if np.any(a == j):
        c[j] = x[a == j].mean(0)
  return c


def test_federated_lloyd_with_all_clients_equals_centralized():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(m, 1.0, (60, 2)) for m in (-5, 0, 5)]).astype(np.float32)
  ids = fs.partition.dirichlet(np.repeat([0, 1, 2], 60), 12, alpha=0.3, seed=0)
  pop = fs.Population.from_arrays({"x": x}, ids, num_clients=12)
  init = kmeans_plus_plus(x, 4, seed=1)
  sim = fs.Simulation(kmeans(4, batch_size=7), pop, cohort_size=12, chunk_size=5)
  state, m = sim.run(sim.init(jnp.asarray(init), jax.random.key(0)), num_rounds=6)
  np.testing.assert_allclose(np.asarray(state.params), lloyd(x, init, 6), rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(m["cost"]) <= 1e-4)  # Lloyd never increases the cost


@pytest.mark.parametrize("name,k", [("iris", 3), ("wine", 3)])
def test_cost_close_to_sklearn(name, k):
  pop, _ = fs.datasets.sklearn_dataset(name, 10, alpha=0.5, seed=0)
  x = np.asarray(pop.features["x"])
  sim = fs.Simulation(kmeans(k), pop, cohort_size=10)
  state, _ = sim.run(sim.init(jnp.asarray(kmeans_plus_plus(x, k, seed=0)), jax.random.key(0)),
                     num_rounds=30)
  ours = kmeans_cost(x, np.asarray(state.params))
  ref = KMeans(k, n_init=10, random_state=0).fit(x).inertia_
  assert ours <= 1.05 * ref


def test_kmeans_bad_input():
  with pytest.raises(ValueError, match="num_clusters"):
    kmeans(0)
  with pytest.raises(ValueError, match="num_clusters must lie"):
    kmeans_plus_plus(np.zeros((3, 2)), 5)


def _ae_setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 6)).astype(np.float32)
  ids = rng.integers(0, 9, 300)
  pop = fs.Population.from_arrays({"x": x}, ids, num_clients=9)
  w = jnp.asarray(rng.normal(size=(6, 6)).astype(np.float32) * 0.3)
  apply_fn = lambda p, x: x @ p  # noqa: E731 - a linear "autoencoder" with known errors
  return pop, apply_fn, w


def test_federated_threshold_equals_pooled_statistics():
  from fedjax_sim.unsupervised import federated_threshold, reconstruction_error
  pop, apply_fn, w = _ae_setup()
  errs = [reconstruction_error(apply_fn, w, pop.client(c)["x"]) for c in range(pop.num_clients)]
  pooled = np.concatenate(errs)
  thr, per = federated_threshold(apply_fn, w, pop, k=2.0, per_client=True, batch_size=7)
  assert thr == pytest.approx(pooled.mean() + 2.0 * pooled.std(), rel=1e-4)
  np.testing.assert_allclose(per, [e.mean() + 2 * e.std() for e in errs], rtol=1e-4)
  edges = np.linspace(0, pooled.max() * 1.01, 2001)
  p95 = federated_threshold(apply_fn, w, pop, method="percentile", percentile=95, bins=edges)
  bw = edges[1] - edges[0]
  # An inverse-CDF quantile at the histogram's resolution: the empirical CDF crosses 0.95
  # within one bin of the threshold.
  assert np.mean(pooled <= p95 - bw) <= 0.95 <= np.mean(pooled <= p95 + bw)


def test_anomaly_threshold_bad_input_and_metrics():
  from fedjax_sim.unsupervised import anomaly_metrics, federated_threshold
  pop, apply_fn, w = _ae_setup()
  for kw, match in [({"method": "max"}, "method"), ({"k": -1.0}, "k must"),
                    ({"method": "percentile", "percentile": 100}, "percentile"),
                    ({"bins": [1.0, 0.5]}, "bins")]:
    with pytest.raises(ValueError, match=match):
      federated_threshold(apply_fn, w, pop, **kw)
  m = anomaly_metrics([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], threshold=0.5)
  assert m["auroc"] == 1.0 and m["tpr"] == 1.0 and m["fpr"] == 0.0 and m["f1"] == 1.0


# -- k-FED and clustering metrics ----------------------------------------------------------------


def test_ari_nmi_equal_sklearn():
  from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

  from fedjax_sim.unsupervised import adjusted_rand_index, normalized_mutual_info

  rng = np.random.default_rng(0)
  cases = [(rng.integers(0, 4, 50), rng.integers(0, 6, 50)) for _ in range(5)]
  a = rng.integers(0, 3, 40)
  cases += [(a, (a + 1) % 3), (a, np.zeros(40, int)), (np.zeros(5, int), np.zeros(5, int)),
            (np.arange(6), np.arange(6)), (a, np.where(rng.random(40) < 0.2, 3, a))]
  for t, p in cases:
    np.testing.assert_allclose(adjusted_rand_index(t, p), adjusted_rand_score(t, p), atol=1e-12)
    np.testing.assert_allclose(normalized_mutual_info(t, p), normalized_mutual_info_score(t, p),
                               atol=1e-12)


def _blobs(num_clients=6, per=30, seed=0):
  rng = np.random.default_rng(seed)
  means = np.array([[0, 0], [8, 0], [0, 8], [8, 8]], np.float32)
  y = np.repeat(np.arange(4), per)
  x = (means[y] + rng.normal(0, 0.5, (len(y), 2))).astype(np.float32)
  # Heterogeneous: client c holds parts of clusters c % 4 and (c + 1) % 4 only.
  first = rng.integers(0, num_clients, len(y))
  ids = np.where(first % 4 == y, first, 0)
  for i in np.flatnonzero(first % 4 != y):
    ids[i] = rng.choice([c for c in range(num_clients) if y[i] in (c % 4, (c + 1) % 4)])
  return fs.Population.from_arrays({"x": x}, ids, num_clients=num_clients), x, y


@pytest.mark.parametrize("project", [True, False])
def test_kfed_local_step_equals_loop_and_recovers_clusters(project):
  from fedjax_sim.unsupervised import _kfed_local, adjusted_rand_index, assign_clusters, kfed

  pop, x, y = _blobs()
  key = jax.random.key(3)
  res = kfed(pop, k=4, k_prime=2, key=key, project=project)
  # The vmapped local step equals a Python loop over clients with the same keys.
  local_key, _ = jax.random.split(key)
  local = jax.jit(_kfed_local, static_argnums=(3, 4, 5, 6))
  feats = np.asarray(pop.features["x"])
  for cid in range(pop.num_clients):
    n, off = int(pop.num_examples[cid]), int(pop.offsets[cid])
    xc = np.zeros((pop.max_examples, 2), np.float32)
    xc[:n] = feats[off:off + n]
    m = (np.arange(pop.max_examples) < n).astype(np.float32)
    want = local(jax.random.fold_in(local_key, cid), jnp.asarray(xc), jnp.asarray(m), 2,
                       50, project, 0.9)
    np.testing.assert_allclose(res.local_centroids[cid], want, rtol=1e-5, atol=1e-5)
  # Well separated clusters, at most k' per client: the one-shot result is the true partition,
  # at about the centralized optimum's cost (centres are unweighted means of local centres).
  assert adjusted_rand_index(y, assign_clusters(x, res.centroids)) == 1.0
  ref = KMeans(4, n_init=10, random_state=0).fit(x).inertia_
  assert kmeans_cost(x, res.centroids) <= ref * 1.05


def test_kfed_small_clients_and_empty_clusters():
  from fedjax_sim.unsupervised import kfed

  # Client 0 has 1 example (< k'): it uploads one centre. Client 1's points are all equal: its
  # second local cluster stays empty and keeps its (repeated) seed; the server drops the repeat.
  x = np.array([[0, 0], [5, 5], [5, 5], [5, 5], [9, 0], [9, 0.5], [0, 9], [0.5, 9]], np.float32)
  pop = fs.Population.from_arrays({"x": x}, np.array([0, 1, 1, 1, 2, 2, 2, 2]))
  want = np.array([[0, 0], [0.25, 9], [5, 5], [9, 0.25]])
  for seed in range(4):  # whichever device seeds the server
    res = kfed(pop, k=4, k_prime=2, key=jax.random.key(seed))
    assert np.asarray(res.local_mask).tolist() == [[True, False], [True, True], [True, True]]
    np.testing.assert_allclose(np.asarray(res.local_centroids)[1], [[5, 5], [5, 5]])
    got = np.asarray(res.centroids)
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want, atol=1e-5)


def test_kfed_bad_input():
  from fedjax_sim.unsupervised import kfed

  pop, _, _ = _blobs()
  with pytest.raises(ValueError, match="k must be a positive int"):
    kfed(pop, k=0, k_prime=1)
  with pytest.raises(ValueError, match="k_prime must be a positive int"):
    kfed(pop, k=3, k_prime=-1)
  with pytest.raises(ValueError, match=r"k_prime \(5\) must be <= k"):
    kfed(pop, k=4, k_prime=5)
  tiny = fs.Population.from_arrays({"x": np.zeros((3, 2), np.float32)}, np.array([0, 1, 1]))
  with pytest.raises(ValueError, match="larger than the population's 3 examples"):
    kfed(tiny, k=4, k_prime=4)
  with pytest.raises(ValueError, match="raise k_prime or lower k"):
    kfed(tiny, k=3, k_prime=1)
  with pytest.raises(ValueError, match="feature_key"):
    kfed(pop, k=4, k_prime=2, feature_key="y")
  with pytest.raises(ValueError, match="margin"):
    kfed(pop, k=4, k_prime=2, margin=1.5)


def test_cluster_scores_refuse_2d_labels():
  with pytest.raises(ValueError, match="must be 1-D"):
    fs.unsupervised.adjusted_rand_index([[0, 1], [1, 0]], [0, 1, 1, 0])
