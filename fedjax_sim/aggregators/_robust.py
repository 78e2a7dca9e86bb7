"""Robust aggregation rules (``reduce`` stages that need all K updates of the cohort).

Every rule here is a *stacked* :class:`~fedjax_sim.aggregators.Reducer`: the engine fills a
``[K, ...]`` buffer with the cohort's updates chunk by chunk (memory O(K x params), plus O(K^2)
for Krum's distance matrix) and hands it over whole; padded and dropped slots are masked out, so
the rules see exactly the real clients. The reduced update is already an average: its weight is
1 (0 for an empty cohort), so a following ``normalize()`` changes nothing.

None of these rules works under secure aggregation (the server would only see the sum) and
central DP noise is not calibrated for them; :func:`~fedjax_sim.aggregators.process` refuses both
combinations. Norm bounding (:func:`norm_bounded_mean`) is a sum of clipped updates and streams.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators._base import (
  Process,
  Reducer,
  identity,
  process,
  sum_reducer,
  weighted_sum_reducer,
)
from fedjax_sim.aggregators._compression import flatten_tree, unflatten_like
from fedjax_sim.aggregators._stages import clip_l2, normalize
from fedjax_sim.types import WeightedUpdate


def _flatten(delta):
  """``[K, ...]`` leaves -> ``[K, P]`` (float32) and the inverse for one ``[P]`` row."""
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), delta)
  return jax.vmap(flatten_tree)(delta), lambda row: unflatten_like(row, one)


def _result(delta, n):
  return WeightedUpdate(delta, (n > 0).astype(jnp.float32))


def _masked_sort(x, mask):
  m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sort(jnp.where(m, x.astype(jnp.float32), jnp.inf), axis=0)


def _count(mask):
  return jnp.sum(mask.astype(jnp.int32))


def _median_leaf(x, mask):
  n = _count(mask)
  s = _masked_sort(x, mask)
  lo = jnp.maximum((n - 1) // 2, 0)
  hi = jnp.maximum(n // 2, 0)
  med = 0.5 * (s[lo] + s[hi])
  return jnp.where(n > 0, med, 0.0).astype(x.dtype)


def median_reducer() -> Reducer:
  """Coordinate-wise median of the real clients' updates (Yin et al. 2018).

  With an even number of clients it is the mean of the two middle values (as ``np.median``).
  Fills a ``[K, P]`` buffer.

  Returns:
    a stacked :class:`Reducer`.
  """

  def stacked(updates, mask, key, context):
    del key, context
    delta = jax.tree.map(lambda x: _median_leaf(x, mask), updates.delta)
    return _result(delta, _count(mask)), {}

  return Reducer(_no_contribute, weighted=False, stacked=stacked)


def _trimmed_leaf(x, mask, beta):
  n = _count(mask)
  t = jnp.floor(beta * n.astype(jnp.float32)).astype(jnp.int32)
  s = _masked_sort(x, mask)
  ranks = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
  keep = (ranks >= t) & (ranks < n - t)
  total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
  count = jnp.maximum(n - 2 * t, 1).astype(jnp.float32)
  return jnp.where(n > 0, total / count, 0.0).astype(x.dtype)


def trimmed_mean_reducer(beta: float) -> Reducer:
  """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ``floor(beta*n)``
  largest and smallest of the n real values and average the rest (as ``scipy.stats.trim_mean``).
  Fills a ``[K, P]`` buffer.

  Args:
    beta: the fraction trimmed from EACH side, in [0, 0.5).

  Returns:
    a stacked :class:`Reducer`.
  """
  beta = _check_beta(beta)

  def stacked(updates, mask, key, context):
    del key, context
    delta = jax.tree.map(lambda x: _trimmed_leaf(x, mask, beta), updates.delta)
    return _result(delta, _count(mask)), {}

  return Reducer(_no_contribute, weighted=False, stacked=stacked)


def _check_beta(beta):
  beta = _v.non_negative("beta", beta)
  if beta >= 0.5:
    raise ValueError(
        f"beta is the fraction trimmed from EACH side, so it must be < 0.5 (0.5 would trim "
        f"every value); got {beta}. Use median() for the limit."
    )
  return beta


def _krum_scores(flat, mask, num_byzantine):
  """Krum scores: sum of squared distances to the n - f - 2 nearest other real updates."""
  k = flat.shape[0]
  n = _count(mask)
  sq = jnp.sum(jnp.square(flat), axis=1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
  valid = mask[:, None] & mask[None, :] & ~jnp.eye(k, dtype=bool)
  dist = jnp.sort(jnp.where(valid, dist, jnp.inf), axis=1)
  c = jnp.maximum(n - num_byzantine - 2, 1)
  near = jnp.arange(k)[None, :] < c
  scores = jnp.sum(jnp.where(near, dist, 0.0), axis=1)
  return jnp.where(mask, scores, jnp.inf), n


def krum_reducer(num_byzantine: int, num_selected: int | None = 1) -> Reducer:
  """Krum / Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018).

  Each real update's score is the sum of squared L2 distances to its ``n - f - 2`` nearest other
  real updates; Krum returns the best-scoring update, Multi-Krum the mean of the ``m``
  best-scoring ones, selected in one pass (no re-scoring after each pick). Needs ``n > 2f + 2``;
  a round whose real cohort is smaller reports ``krum_bound_violated = 1`` and scores with one
  neighbour. Fills a ``[K, P]`` buffer plus a ``[K, K]`` distance matrix.

  Args:
    num_byzantine: f, the number of attackers the rule tolerates.
    num_selected: m, how many updates Multi-Krum averages (1 = Krum); None for ``n - f``.

  Returns:
    a stacked :class:`Reducer`.
  """
  f = _v.non_negative_int("num_byzantine", num_byzantine)
  m = None if num_selected is None else _v.positive_int("num_selected", num_selected)

  def check(context, num_params):
    del num_params
    n = int(math.floor(context.expected_cohort_size))
    if n <= 2 * f + 2:
      raise ValueError(
          f"Krum with num_byzantine={f} needs a cohort of n > 2f + 2 = {2 * f + 2} clients; the "
          f"cohort has {n}. Use a larger cohort or num_byzantine <= {max((n - 3) // 2, 0)}."
      )
    if m is not None and m > n:
      raise ValueError(f"num_selected={m} exceeds the cohort size {n}.")

  def stacked(updates, mask, key, context):
    del key, context
    flat, unflatten = _flatten(updates.delta)
    scores, n = _krum_scores(flat, mask, f)
    count = jnp.maximum(n - f, 1) if m is None else jnp.minimum(m, n)
    rank = jnp.argsort(jnp.argsort(scores))  # 0 = best
    chosen = (rank < count) & mask
    agg = jnp.sum(jnp.where(chosen[:, None], flat, 0.0), axis=0) / jnp.maximum(
        jnp.sum(chosen), 1
    )
    metrics = {"krum_bound_violated": (n <= 2 * f + 2).astype(jnp.float32)}
    return _result(unflatten(agg), n), metrics

  return Reducer(_no_contribute, weighted=False, stacked=stacked, check=check)


def geometric_median_reducer(
    num_iters: int = 4, eps: float = 1e-5, weighted: bool = True
) -> Reducer:
  """Geometric median by the smoothed Weiszfeld iteration (RFA; Pillutla et al. 2022).

  ``v <- sum_i b_i x_i / sum_i b_i`` with ``b_i = a_i / max(eps, ||v - x_i||)``, starting from
  the (weighted) mean, for a fixed ``num_iters`` (RFA's reference uses 4). ``a_i`` is the
  client's weight (example count) or 1. Fills a ``[K, P]`` buffer.

  Returns:
    a stacked :class:`Reducer`.
  """
  iters = _v.positive_int("num_iters", num_iters)
  nu = _v.positive("eps", eps)

  def stacked(updates, mask, key, context):
    del key, context
    flat, unflatten = _flatten(updates.delta)
    alpha = jnp.where(mask, updates.weight if weighted else 1.0, 0.0).astype(jnp.float32)
    total = jnp.maximum(jnp.sum(alpha), 1e-30)
    v0 = alpha @ flat / total

    def body(_, v):
      d = jnp.sqrt(jnp.sum(jnp.square(flat - v[None]), axis=1))
      b = alpha / jnp.maximum(nu, d)
      return b @ flat / jnp.maximum(jnp.sum(b), 1e-30)

    v = jax.lax.fori_loop(0, iters, body, v0)
    return _result(unflatten(v), _count(mask)), {}

  return Reducer(_no_contribute, weighted=weighted, stacked=stacked)


def centered_clip_reducer(radius: float, num_iters: int = 3) -> Reducer:
  """Centered clipping (Karimireddy, He, Jaggi, ICML 2021).

  ``v <- v + (1/n) sum_i (x_i - v) min(1, radius / ||x_i - v||)`` for ``num_iters`` steps from
  ``v = 0`` (the paper starts from the previous aggregate, i.e. server momentum; put momentum in
  the server optimizer). Fills a ``[K, P]`` buffer.

  Returns:
    a stacked :class:`Reducer`.
  """
  tau = _v.positive("radius", radius)
  iters = _v.positive_int("num_iters", num_iters)

  def stacked(updates, mask, key, context):
    del key, context
    flat, unflatten = _flatten(updates.delta)
    n = _count(mask)
    real = mask.astype(jnp.float32)

    def body(_, v):
      diff = flat - v[None]
      norm = jnp.sqrt(jnp.sum(jnp.square(diff), axis=1))
      factor = jnp.where(norm > tau, tau / jnp.where(norm > 0, norm, 1.0), 1.0) * real
      return v + factor @ diff / jnp.maximum(n, 1).astype(jnp.float32)

    v = jax.lax.fori_loop(0, iters, body, jnp.zeros(flat.shape[1], jnp.float32))
    return _result(unflatten(v), n), {}

  return Reducer(_no_contribute, weighted=False, stacked=stacked)


def _no_contribute(update, is_real):
  raise AssertionError("stacked reducers are reduced whole; contribute is never called")


# -- processes ------------------------------------------------------------------------------


def median() -> Process:
  """Coordinate-wise median aggregation (see :func:`median_reducer`).

  Returns:
    a :class:`Process` with the stacked :func:`median_reducer`.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> agg = fs.aggregators.median()
    >>> ups = fs.WeightedUpdate({"w": jnp.array([[1.0], [2.0], [100.0]])}, jnp.ones(3))
    >>> out, _ = agg.reduce.stacked(ups, jnp.array([True, True, True]), None, None)
    >>> out.delta["w"].tolist()
    [2.0]
  """
  return process(identity(), median_reducer(), identity())


def trimmed_mean(beta: float) -> Process:
  """Coordinate-wise trimmed mean aggregation (see :func:`trimmed_mean_reducer`).

  Returns:
    a :class:`Process` with the stacked :func:`trimmed_mean_reducer`.
  """
  return process(identity(), trimmed_mean_reducer(beta), identity())


def krum(num_byzantine: int) -> Process:
  """Krum: the single update closest to its ``n - f - 2`` neighbours (Blanchard et al. 2017).

  Returns:
    a :class:`Process` with the stacked :func:`krum_reducer` selecting one update.
  """
  return process(identity(), krum_reducer(num_byzantine, 1), identity())


def multi_krum(num_byzantine: int, num_selected: int | None = None) -> Process:
  """Multi-Krum: the mean of the ``num_selected`` (default ``n - f``) best Krum scores.

  Returns:
    a :class:`Process` with the stacked :func:`krum_reducer` averaging the selected
      updates.
  """
  return process(identity(), krum_reducer(num_byzantine, num_selected), identity())


def geometric_median(num_iters: int = 4, eps: float = 1e-5, weighted: bool = True) -> Process:
  """Robust federated aggregation by the geometric median (RFA, Pillutla et al. 2022).

  Returns:
    a :class:`Process` with the stacked :func:`geometric_median_reducer`.
  """
  return process(identity(), geometric_median_reducer(num_iters, eps, weighted), identity())


def centered_clip(radius: float, num_iters: int = 3) -> Process:
  """Centered clipping aggregation (Karimireddy et al. 2021).

  Returns:
    a :class:`Process` with the stacked :func:`centered_clip_reducer`.
  """
  return process(identity(), centered_clip_reducer(radius, num_iters), identity())


def norm_bounded_mean(max_norm: float, weighted: bool = True) -> Process:
  """Norm bounding (Sun et al. 2019): clip every update to ``max_norm``, then average.

  A sum of clipped updates, so it streams across chunks like FedAvg (no ``[K, P]`` buffer).

  Returns:
    a :class:`Process` (clip each update to ``max_norm``, weighted mean).
  """
  _v.positive("max_norm", max_norm)
  reducer = weighted_sum_reducer() if weighted else sum_reducer()
  return process(clip_l2(max_norm), reducer, normalize())
