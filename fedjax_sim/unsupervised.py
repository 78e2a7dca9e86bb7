"""Federated unsupervised learning on the round engine: federated k-means (Lloyd).

Federated Lloyd: every client assigns its examples to the nearest broadcast centroid and sends
per-cluster sufficient statistics; the server moves each centroid to the mean of its points. As a
pseudo-gradient, client k sends ``n_kj c_j − s_kj`` (its count and sum for cluster j), which sums
linearly across clients and chunks; the server divides by the total count ``N_j``, so
``optax.sgd(1.0)`` lands exactly on Lloyd's update ``c_j ← S_j / N_j``. A cluster that no client
hits keeps its centroid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators import sum as sum_process
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.client import NUM_STEPS, ClientData
from fedjax_sim.types import MASK_KEY, ClientOutput


def _sq_dist(x, centroids):
  return (jnp.sum(x * x, -1, keepdims=True) - 2 * x @ centroids.T
          + jnp.sum(centroids * centroids, -1)[None, :])


def kmeans(num_clusters: int, *, feature_key: str = "x", batch_size: int = 256) -> Algorithm:
  """Federated Lloyd k-means (one Lloyd step per round over the sampled clients' data).

  The params are the centroids ``[num_clusters, dim]`` (e.g. from :func:`kmeans_plus_plus`).
  Round metrics: ``cost`` (mean squared distance of the cohort's points to the broadcast
  centroids, i.e. before the round's update).

  With every client in every round this is exactly centralized Lloyd from the same start.

  References:
    Lloyd, "Least squares quantization in PCM", 1982; federated use e.g. Dennis, Li, Smith,
    "Heterogeneity for the Win: One-Shot Federated Clustering", ICML 2021.

  Examples:
    >>> import fedjax_sim as fs
    >>> fs.unsupervised.kmeans(3).name
    'kmeans'
  """
  _v.positive_int("num_clusters", num_clusters)
  _v.positive_int("batch_size", batch_size)

  def client_update(centroids, data: ClientData, client_state, key):
    del key
    # Trace-time (before compiling) checks of the centroids against the population.
    if feature_key not in data.features:
      raise ValueError(f"kmeans reads feature {feature_key!r}; the population has "
                       f"{sorted(data.features)}. Pass feature_key=.")
    dim = int(np.prod(data.features[feature_key].shape[1:]))
    if getattr(centroids, "shape", None) != (num_clusters, dim):
      raise ValueError(f"kmeans({num_clusters}) needs centroids of shape ({num_clusters}, "
                       f"{dim}); got params of shape {getattr(centroids, 'shape', None)}. "
                       "Seed them with kmeans_plus_plus(x, num_clusters).")
    order = jnp.arange(data.max_examples, dtype=jnp.int32)
    steps = (data.num_examples + batch_size - 1) // batch_size

    def body(carry):
      step, sums, counts, cost = carry
      batch = data.batch(order, step, batch_size)
      x = batch[feature_key].reshape(batch_size, -1).astype(jnp.float32)
      m = batch[MASK_KEY]
      d2 = _sq_dist(x, centroids)
      nearest = jnp.argmin(d2, -1)
      onehot = jax.nn.one_hot(nearest, num_clusters) * m[:, None]
      return (step + 1, sums + onehot.T @ x, counts + onehot.sum(0),
              cost + jnp.sum(jnp.min(d2, -1) * m))

    init = (0, jnp.zeros_like(centroids), jnp.zeros(num_clusters), jnp.zeros(()))
    _, sums, counts, cost = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    delta = counts[:, None] * centroids - sums
    n = data.num_examples.astype(jnp.float32)
    metrics = {"cost": cost / jnp.maximum(n, 1.0), NUM_STEPS: steps.astype(jnp.float32)}
    return ClientOutput(delta, n, metrics, client_state, extra=counts)

  def server_update(delta_sum, counts, server_extra, stats, context):
    del stats, context
    safe = jnp.where(counts > 0, counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, delta_sum / safe, 0.0), server_extra

  return Algorithm(client_update, sum_process(), optax.sgd(1.0), name="kmeans",
                   server_update=server_update)


def kmeans_plus_plus(x: np.ndarray, num_clusters: int, *, seed: int = 0) -> np.ndarray:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) on host data, e.g. a public or pooled
  sample; returns float32 centroids ``[num_clusters, dim]``."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  if not 0 < num_clusters <= len(x):
    raise ValueError(f"num_clusters must lie in [1, {len(x)}] (the examples given); "
                     f"got {num_clusters}.")
  rng = np.random.default_rng(seed)
  centres = [x[rng.integers(len(x))]]
  d2 = np.sum((x - centres[0]) ** 2, 1)
  for _ in range(1, num_clusters):
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
    centres.append(x[rng.choice(len(x), p=p)])
    d2 = np.minimum(d2, np.sum((x - centres[-1]) ** 2, 1))
  return np.asarray(centres, np.float32)


def kmeans_cost(x: np.ndarray, centroids: np.ndarray) -> float:
  """Sum of squared distances of ``x`` to their nearest centroid."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  c = np.asarray(centroids, np.float64)
  d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
  return float(np.maximum(d2.min(1), 0).sum())


# -- federated autoencoder anomaly detection ----------------------------------------------------


def _client_error_stats(apply_fn, params, population, bins: np.ndarray, feature_key: str,
                        batch_size: int):
  """Per client: sum, sum of squares, count and histogram of reconstruction errors (vmapped)."""
  edges = jnp.asarray(bins, jnp.float32)

  def one(cid):
    data = ClientData(population.features, population.offsets[cid],
                      population.num_examples[cid], population.max_examples)
    order = jnp.arange(data.max_examples, dtype=jnp.int32)
    steps = (data.num_examples + batch_size - 1) // batch_size

    def body(carry):
      step, s, s2, n, hist = carry
      batch = data.batch(order, step, batch_size)
      x = batch[feature_key].astype(jnp.float32)
      m = batch[MASK_KEY]
      err = jnp.mean(jnp.square(apply_fn(params, x) - x).reshape(batch_size, -1), -1)
      idx = jnp.clip(jnp.searchsorted(edges, err, side="right") - 1, 0, edges.shape[0] - 2)
      hist = hist + jnp.zeros(edges.shape[0] - 1).at[idx].add(m)
      return step + 1, s + jnp.sum(err * m), s2 + jnp.sum(err * err * m), n + m.sum(), hist

    init = (0, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jnp.zeros(edges.shape[0] - 1))
    _, s, s2, n, hist = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    return s, s2, n, hist

  return jax.jit(jax.vmap(one))(jnp.arange(population.num_clients))


def federated_threshold(
    apply_fn, params, population, *, method: str = "mean_std", k: float = 3.0,
    percentile: float = 95.0, bins=None, feature_key: str = "x", batch_size: int = 64,
    per_client: bool = False,
):
  """Anomaly threshold on reconstruction error, from client statistics only.

  Each client computes its reconstruction errors locally and shares only aggregates: sums and
  sums of squares (``method="mean_std"``: threshold = mean + k·std of the pooled errors) or a
  histogram over fixed bins (``method="percentile"``: the pooled percentile, read off the summed
  histogram by linear interpolation within a bin). Raw errors never leave a client.

  Args:
    apply_fn: ``apply_fn(params, x) -> reconstruction``.
    params: the (federated) autoencoder.
    population: the clients' (normal) data.
    method: ``"mean_std"`` or ``"percentile"``.
    k: standard deviations above the mean (``mean_std``), >= 0.
    percentile: in (0, 100) (``percentile``).
    bins: histogram edges (default: 512 log-spaced edges from 1e-6 to 1e2).
    per_client: also return each client's own threshold (from its own statistics).

  Returns:
    The global threshold (float), or ``(threshold, per_client_thresholds)``.
  """
  _v.positive_int("batch_size", batch_size)
  if feature_key not in population.features:
    raise ValueError(f"feature {feature_key!r} not in the population "
                     f"({sorted(population.features)}); pass feature_key=.")
  if method not in ("mean_std", "percentile"):
    raise ValueError(f"method must be 'mean_std' or 'percentile'; got {method!r}.")
  _v.non_negative("k", k)
  if not 0 < percentile < 100:
    raise ValueError(f"percentile must lie in (0, 100); got {percentile!r}.")
  edges = np.geomspace(1e-6, 1e2, 513) if bins is None else np.asarray(bins, np.float64)
  if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError("bins must be increasing histogram edges (at least two).")
  s, s2, n, hist = jax.device_get(
      _client_error_stats(apply_fn, params, population, edges, feature_key, batch_size))

  def from_stats(s, s2, n, hist):
    if n <= 0:
      return np.nan
    if method == "mean_std":
      mean = s / n
      return float(mean + k * np.sqrt(max(s2 / n - mean * mean, 0.0)))
    cdf = np.cumsum(hist) / max(hist.sum(), 1e-12)
    target = percentile / 100.0
    j = int(np.searchsorted(cdf, target))
    j = min(j, len(hist) - 1)
    below = cdf[j - 1] if j > 0 else 0.0
    frac = (target - below) / max(cdf[j] - below, 1e-12)
    return float(edges[j] + frac * (edges[j + 1] - edges[j]))

  threshold = from_stats(s.sum(), s2.sum(), n.sum(), hist.sum(0))
  if not per_client:
    return threshold
  return threshold, np.asarray([from_stats(*t) for t in zip(s, s2, n, hist, strict=True)])


def reconstruction_error(apply_fn, params, x) -> np.ndarray:
  """Per-example mean squared reconstruction error (host-side scoring of test data)."""
  x = jnp.asarray(x, jnp.float32)
  err = jnp.mean(jnp.square(apply_fn(params, x) - x).reshape(x.shape[0], -1), -1)
  return np.asarray(err)


def anomaly_metrics(scores, is_anomaly, threshold: float) -> dict[str, float]:
  """AUROC, average precision, and F1 / TPR / FPR at ``threshold`` (score > threshold)."""
  from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

  scores, y = np.asarray(scores), np.asarray(is_anomaly).astype(bool)
  pred = scores > threshold
  return {
      "auroc": float(roc_auc_score(y, scores)),
      "average_precision": float(average_precision_score(y, scores)),
      "f1": float(f1_score(y, pred)),
      "tpr": float(np.mean(pred[y])) if y.any() else float("nan"),
      "fpr": float(np.mean(pred[~y])) if (~y).any() else float("nan"),
  }
