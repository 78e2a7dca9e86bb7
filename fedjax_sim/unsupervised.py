"""Federated unsupervised learning on the round engine: federated k-means (Lloyd), one-shot
k-FED, clustering metrics (ARI, NMI) and autoencoder anomaly detection.

Federated Lloyd: every client assigns its examples to the nearest broadcast centroid and sends
per-cluster sufficient statistics; the server moves each centroid to the mean of its points. As a
pseudo-gradient, client k sends ``n_kj c_j − s_kj`` (its count and sum for cluster j), which sums
linearly across clients and chunks; the server divides by the total count ``N_j``, so
``optax.sgd(1.0)`` lands exactly on Lloyd's update ``c_j ← S_j / N_j``. A cluster that no client
hits keeps its centroid.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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

  Returns:
    an :class:`~fedjax_sim.Algorithm` whose params are the centroids.

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


# -- k-FED: one-shot federated clustering -------------------------------------------------------


class KFedResult(NamedTuple):
  """What :func:`kfed` returns.

  Attributes:
    centroids: float32 ``[k, dim]``, the global centres.
    local_centroids: float32 ``[num_clients, k_prime, dim]``, every client's uploaded centres.
    local_mask: bool ``[num_clients, k_prime]``; False for the slots of a client with fewer than
      ``k_prime`` examples (it uploads only its own points), which the server ignores.
  """

  centroids: jax.Array
  local_centroids: jax.Array
  local_mask: jax.Array


def _masked_kmeans_pp(key, x, m, k):
  """k-means++ over the rows of ``x`` with ``m > 0`` (fixed ``k`` draws; repeats once exhausted)."""
  logm = jnp.where(m > 0, 0.0, -jnp.inf)
  first = jax.random.categorical(jax.random.fold_in(key, 0), logm)
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.sum(jnp.square(x - x[first]), -1)

  def body(j, carry):
    centres, d2 = carry
    w = d2 * m
    logits = jnp.where(jnp.sum(w) > 0, jnp.where(w > 0, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf),
                       logm)
    pick = jax.random.categorical(jax.random.fold_in(key, j), logits)
    return centres.at[j].set(x[pick]), jnp.minimum(d2, jnp.sum(jnp.square(x - x[pick]), -1))

  centres, _ = jax.lax.fori_loop(1, k, body, (centres, d2))
  return centres


def _masked_lloyd(x, m, centres, iters):
  """``iters`` Lloyd steps on the rows with ``m > 0``; an empty cluster keeps its centre."""

  def body(_, c):
    onehot = jax.nn.one_hot(jnp.argmin(_sq_dist(x, c), -1), c.shape[0]) * m[:, None]
    counts = onehot.sum(0)
    means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, c)

  return jax.lax.fori_loop(0, iters, body, centres)


def _kfed_local(key, x, m, k_prime, iters, project, margin):
  """One device of k-FED (Awasthi–Sheffet style when ``project``): returns ``[k_prime, dim]``."""
  if not project:
    return _masked_lloyd(x, m, _masked_kmeans_pp(key, x, m, k_prime), iters)
  xm = x * m[:, None]
  # Zero (padded) rows leave the right singular vectors unchanged.
  _, _, vt = jnp.linalg.svd(xm, full_matrices=False)
  v = vt[:k_prime].T
  xp = xm @ v
  cp = _masked_lloyd(xp, m, _masked_kmeans_pp(key, xp, m, k_prime), iters)
  d = jnp.sqrt(jnp.maximum(_sq_dist(xp, cp), 0.0))
  nearest = jnp.argmin(d, -1)
  if k_prime > 1:
    two = jnp.sort(d, -1)[:, :2]
    keep = (two[:, 0] <= margin * two[:, 1]).astype(x.dtype) * m
  else:
    keep = m
  onehot = jax.nn.one_hot(nearest, k_prime)
  kept, assigned = onehot * keep[:, None], onehot * m[:, None]
  seed_from = lambda a: (a.T @ x) / jnp.maximum(a.sum(0), 1.0)[:, None]
  # Means of the kept points; a cluster with no kept point falls back to all its points, then to
  # a k-means++ pick in the original space (empty-cluster handling).
  fallback = _masked_kmeans_pp(key, x, m, k_prime)
  init = jnp.where(kept.sum(0)[:, None] > 0, seed_from(kept),
                   jnp.where(assigned.sum(0)[:, None] > 0, seed_from(assigned), fallback))
  return _masked_lloyd(x, m, init, iters)


def _kfed_server(key, local, local_mask, k, server_steps=1):
  """Farthest-point seeding from one random device's centres, then one Lloyd step."""
  n, kp, dim = local.shape
  pooled = local.reshape(n * kp, dim)
  valid = local_mask.reshape(-1)
  has = local_mask.any(-1)
  dev = jax.random.categorical(key, jnp.where(has, 0.0, -jnp.inf))
  seeds, seed_mask = local[dev], local_mask[dev]
  num_seeds = jnp.sum(seed_mask)
  seeds = seeds[jnp.argsort(~seed_mask, stable=True)]  # valid seeds first

  def body(i, carry):
    chosen, mind = carry
    far = pooled[jnp.argmax(jnp.where(valid, mind, -jnp.inf))]
    seed = seeds[jnp.minimum(i, kp - 1)]
    # A seed equal to one already chosen (a device's repeated points) is replaced by the
    # farthest pooled centre.
    seen = jnp.min(jnp.where(jnp.arange(k) < i, jnp.sum(jnp.square(chosen - seed), -1), jnp.inf))
    c = jnp.where((i < num_seeds) & (seen > 0), seed, far)
    return chosen.at[i].set(c), jnp.minimum(mind, jnp.sum(jnp.square(pooled - c), -1))

  init = (jnp.zeros((k, dim), local.dtype), jnp.full((n * kp,), jnp.inf, local.dtype))
  chosen, _ = jax.lax.fori_loop(0, k, body, init)
  return _masked_lloyd(pooled, valid.astype(local.dtype), chosen, server_steps)


def kfed(population, k: int, k_prime: int, *, key=None, feature_key: str = "x",
         local_iters: int = 50, project: bool = True, margin: float = 0.9,
         server_steps: int = 1) -> KFedResult:
  """k-FED one-shot federated clustering: local k′-means per device, one upload, server merge.

  Every device (vmapped, in one compiled program) clusters its own data into ``k_prime``
  centres: by default Awasthi–Sheffet style (project onto its top-``k_prime`` right singular
  vectors, k-means++ and Lloyd there, keep the points within ``margin`` × the distance to the
  second-nearest centre, seed the original-space centres with their means, then Lloyd);
  ``project=False`` runs k-means++ and Lloyd directly. A device with fewer than ``k_prime``
  examples uploads only as many centres as it has points. The server takes one random device's
  centres as seeds (repeats dropped), adds the pooled centre farthest from the chosen set until
  it has ``k``
  (max–min seeding), then runs one Lloyd step over the pooled centres (unweighted). Empty
  clusters keep their centre, locally and on the server.

  Args:
    population: the clients' data (:class:`~fedjax_sim.Population`).
    k: global number of clusters, in ``[k_prime, uploaded centres]``.
    k_prime: clusters per device (the paper takes ``k_prime <= sqrt(k)`` for its theory).
    key: a ``jax.random.key``; default ``key(0)``.
    feature_key: the feature to cluster (flattened per example).
    local_iters: Lloyd iterations on a device.
    project: use the SVD projection + pruning of the paper's local step.
    margin: the pruning margin (multiplicative, in (0, 1]).
    server_steps: Lloyd steps over the pooled centres on the server (the paper: 1).

  Returns:
    A :class:`KFedResult`.

  References:
    Dennis, Li, Smith, "Heterogeneity for the Win: One-Shot Federated Clustering", ICML 2021.

  Examples:
    >>> import numpy as np, fedjax_sim as fs
    >>> x = np.concatenate([np.random.default_rng(0).normal(c, 0.1, (20, 2)) for c in (0, 5, 10)])
    >>> pop = fs.Population.from_arrays({"x": x.astype(np.float32)}, np.arange(60) % 4)
    >>> res = fs.unsupervised.kfed(pop, k=3, k_prime=3)
    >>> np.sort(np.round(np.asarray(res.centroids)[:, 0])).tolist() == [0.0, 5.0, 10.0]
    True
  """
  _v.positive_int("k", k)
  _v.positive_int("k_prime", k_prime)
  _v.positive_int("local_iters", local_iters)
  _v.positive_int("server_steps", server_steps)
  margin = _v.positive("margin", margin)
  if margin > 1:
    raise ValueError(f"margin must lie in (0, 1]; got {margin!r}.")
  if k_prime > k:
    raise ValueError(f"k_prime ({k_prime}) must be <= k ({k}): each device finds at most k "
                     "of the global clusters. Lower k_prime.")
  if feature_key not in population.features:
    raise ValueError(f"kfed reads feature {feature_key!r}; the population has "
                     f"{sorted(population.features)}. Pass feature_key=.")
  sizes = np.asarray(population.num_examples)
  uploaded = int(np.minimum(sizes, k_prime).sum())
  if k > int(sizes.sum()):
    raise ValueError(f"k={k} is larger than the population's {int(sizes.sum())} examples; "
                     "lower k.")
  if k > uploaded:
    raise ValueError(f"k={k} is larger than the {uploaded} centres the clients upload "
                     f"(min(examples, k_prime={k_prime}) per client); raise k_prime or lower k.")
  key = jax.random.key(0) if key is None else key
  return _kfed_jit(population, key, k, k_prime, feature_key, local_iters, project, margin,
                   server_steps)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _kfed_jit(population, key, k, k_prime, feature_key, local_iters, project, margin,
              server_steps):
  feats = population.features[feature_key]
  feats = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
  nmax = population.max_examples
  local_key, server_key = jax.random.split(key)

  def one(cid):
    n = population.num_examples[cid]
    idx = jnp.arange(nmax)
    m = (idx < n).astype(jnp.float32)
    x = feats[population.offsets[cid] + jnp.where(idx < n, idx, 0)] * m[:, None]
    c = _kfed_local(jax.random.fold_in(local_key, cid), x, m, k_prime, local_iters, project,
                    margin)
    return c, jnp.arange(k_prime) < n

  local, mask = jax.vmap(one)(jnp.arange(population.num_clients))
  return KFedResult(_kfed_server(server_key, local, mask, k, server_steps), local, mask)


def assign_clusters(x, centroids) -> np.ndarray:
  """Index of the nearest centroid for every row of ``x`` (host-side)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  c = np.asarray(centroids, np.float64)
  return np.argmin((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 1)


def _contingency(labels_true, labels_pred) -> np.ndarray:
  a, b = np.asarray(labels_true), np.asarray(labels_pred)
  if a.ndim != 1 or b.ndim != 1:
    raise ValueError(f"labels_true and labels_pred must be 1-D (one label per example); got "
                     f"shapes {a.shape} and {b.shape}.")
  if a.shape != b.shape:
    raise ValueError(f"labels_true and labels_pred need the same length; got {a.shape} and "
                     f"{b.shape}.")
  _, ia = np.unique(a, return_inverse=True)
  _, ib = np.unique(b, return_inverse=True)
  table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1), np.int64)
  np.add.at(table, (ia, ib), 1)
  return table


def adjusted_rand_index(labels_true, labels_pred) -> float:
  """Adjusted Rand index (Hubert & Arabie 1985) from the pair-confusion counts; 1.0 for
  identical partitions (up to relabelling), about 0 for random ones.

  Examples:
    >>> adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
  """
  c = _contingency(labels_true, labels_pred)
  n = int(c.sum())
  sq = int((c * c).sum())
  rows, cols = int((c.sum(1) ** 2).sum()), int((c.sum(0) ** 2).sum())
  tp, fp, fn = sq - n, cols - sq, rows - sq
  tn = n * n - fp - fn - sq
  if fn == 0 and fp == 0:
    return 1.0
  return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def normalized_mutual_info(labels_true, labels_pred) -> float:
  """Normalized mutual information, ``MI / mean(H(true), H(pred))`` (arithmetic normalisation,
  as scikit-learn's default).

  Examples:
    >>> round(normalized_mutual_info([0, 0, 1, 1], [0, 0, 1, 2]), 4)
    0.8
  """
  c = _contingency(labels_true, labels_pred).astype(np.float64)
  if c.shape[0] == c.shape[1] == 1 or c.size == 0:
    return 1.0
  n = c.sum()
  pa, pb, pab = c.sum(1) / n, c.sum(0) / n, c / n
  nz = pab > 0
  mi = float(np.sum(pab[nz] * (np.log(pab[nz]) - np.log(np.outer(pa, pb)[nz]))))
  ent = lambda p: float(-np.sum(p[p > 0] * np.log(p[p > 0])))
  denom = 0.5 * (ent(pa) + ent(pb))
  return float(mi / max(denom, np.finfo(np.float64).eps))
