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
