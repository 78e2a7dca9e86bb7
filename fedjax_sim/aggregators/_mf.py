"""Correlated noise across rounds: banded matrix-factorization (BandMF) mechanisms (DP-FTRL
family), fused in the compiled round.

A matrix mechanism with strategy ``C`` (lower-triangular, ``T x T``) releases the prefix sums of
the rounds' clipped sums ``g_1..g_T`` as ``A C⁻¹ (C g + σ Z)``. Equivalently, the noise added to
round t's sum is row t of ``C⁻¹ σ Z``: correlated across rounds, so it partly cancels in the
running sum the server optimizer accumulates. With a ``b``-banded ``C`` the recursion

    x_t = (σ z_t − Σ_{j=1}^{b−1} C[t, t−j] x_{t−j}) / C[t, t]

needs only the last ``b − 1`` noise vectors ``x``: that buffer (``(b−1) × params`` floats) and the
round counter are this stage's state, in the server state, checkpointed and resumed exactly.
``z_t`` is the very draw ``gaussian_noise`` makes from the round's aggregator key, so the identity
strategy (``b = 1``, ``C = I``) *is* ``dp_mean`` bit for bit.

Taken from jax_privacy (2.0.0): the default strategies (``toeplitz.optimize_banded_toeplitz``,
``toeplitz.optimal_max_error_strategy_coefs``) and the accounting
(``experimental.accounting.amplified_bandmf_event``, see :mod:`fedjax_sim.privacy`). The noise
recursion is ours (jax_privacy's ``inverse_as_streaming_matrix`` is the same recursion for
Toeplitz strategies; ours also takes non-Toeplitz banded matrices and keeps the buffer as
one array per parameter leaf).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators._base import (
    ADDS_NOISE,
    Aggregator,
    Process,
    chain,
    process,
    sum_reducer,
)
from fedjax_sim.aggregators._stages import _non_negative, _positive, clip_l2, divide_by

_NORM_TOL = 1e-6


class BandedNoiseState(NamedTuple):
  """State of :func:`banded_noise`.

  Attributes:
    round: int32, rounds noised so far (the row of ``C`` used next).
    history: per parameter leaf, float32 ``[b − 1, *leaf.shape]``: the last ``b − 1`` noise
      vectors added, most recent first (zeros before the first rounds).
  """

  round: jax.Array
  history: tuple


def _as_band_table(strategy, num_rounds):
  """``(table [rows, b], horizon | None)``, ``table[t, j] = C[t, t − j]``; checks ``strategy``."""
  c = np.asarray(strategy, dtype=np.float64)
  if c.ndim == 1:
    if c.size < 1 or not np.all(np.isfinite(c)):
      raise ValueError(f"strategy: Toeplitz coefficients must be a non-empty finite 1-D array; "
                       f"got {strategy!r}.")
    if c[0] <= 0:
      raise ValueError(f"strategy: the diagonal coefficient C[t, t] = {c[0]} must be > 0 "
                       "(C must be invertible).")
    norm = float(np.linalg.norm(c))
    if abs(norm - 1.0) > _NORM_TOL:
      raise ValueError(
          f"strategy: the Toeplitz coefficients have L2 norm {norm:.6g}; the accountant needs "
          "column norm 1 (sensitivity = clip). Divide them by their norm.")
    if num_rounds is not None and c.size > num_rounds:
      raise ValueError(f"strategy has {c.size} bands, more than num_rounds={num_rounds}.")
    return c[None, :], None
  if c.ndim != 2 or c.shape[0] != c.shape[1]:
    raise ValueError(f"strategy must be 1-D Toeplitz coefficients or a square [T, T] matrix; got "
                     f"shape {c.shape}.")
  t = c.shape[0]
  if num_rounds is not None and t != num_rounds:
    raise ValueError(f"strategy is a [{t}, {t}] matrix but num_rounds={num_rounds}: the strategy "
                     "matrix must be of the run's length.")
  if not np.all(np.isfinite(c)):
    raise ValueError("strategy contains non-finite entries.")
  if np.any(np.triu(c, 1) != 0):
    raise ValueError("strategy must be lower-triangular (noise of round t may only depend on "
                     "rounds <= t); it has non-zero entries above the diagonal.")
  if np.any(np.diag(c) <= 0):
    raise ValueError("strategy: every diagonal entry C[t, t] must be > 0 (C invertible).")
  norms = np.linalg.norm(c, axis=0)
  if np.any(norms > 1 + _NORM_TOL):
    raise ValueError(f"strategy: the largest column norm is {norms.max():.6g} > 1; the "
                     "accountant needs column norms <= 1. Normalise the columns.")
  rows, cols = np.nonzero(c)
  b = int((rows - cols).max()) + 1
  table = np.zeros((t, b))
  for j in range(b):
    table[j:, j] = np.diagonal(c, -j)
  return table, t


def banded_noise(strategy, noise_multiplier, clip) -> Aggregator:
  """Post stage: adds the correlated noise ``C⁻¹ σ Z`` of a banded strategy ``C``.

  Args:
    strategy: 1-D Toeplitz coefficients ``c_0..c_{b−1}`` of ``C`` (unit L2 norm, ``c_0 > 0``), or
      a lower-triangular banded ``[T, T]`` matrix with column norms <= 1.
    noise_multiplier: z >= 0; σ = z · clip.
    clip: the per-client L2 bound S (the sum's sensitivity per participation).

  Returns:
    a ``post`` :class:`Aggregator` stage (tagged ``ADDS_NOISE``) whose state is a
      :class:`BandedNoiseState`. Memory: ``(b − 1) × params`` float32.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> stage = fs.aggregators.banded_noise([1.0], noise_multiplier=1.0, clip=0.5)
    >>> u = fs.WeightedUpdate({"w": jnp.zeros(10_000)}, jnp.float32(1))
    >>> out, st, _ = stage.aggregate(u, stage.init(u.delta), jax.random.key(0), None)
    >>> round(float(out.delta["w"].std()), 1), int(st.round)
    (0.5, 1)
  """
  table, horizon = _as_band_table(strategy, None)
  b = table.shape[1]
  coefs = jnp.asarray(table, jnp.float32)
  stddev = _non_negative("noise_multiplier", noise_multiplier) * _positive("clip", clip)

  def init(params):
    hist = tuple(jnp.zeros((b - 1, *jnp.shape(x)), jnp.float32) for x in jax.tree.leaves(params))
    return BandedNoiseState(jnp.zeros((), jnp.int32), hist)

  def aggregate(update, state, key, context):
    del context
    leaves, treedef = jax.tree.flatten(update.delta)
    keys = jax.random.split(key, len(leaves))  # exactly gaussian_noise's draws
    row = coefs[0] if horizon is None else coefs[jnp.minimum(state.round, horizon - 1)]
    out, hist = [], []
    for x, k, h in zip(leaves, keys, state.history, strict=True):
      noise = stddev * jax.random.normal(k, x.shape, jnp.float32)
      if b > 1:
        noise = noise - jnp.tensordot(row[1:], h, axes=1)
        h = jnp.concatenate([(noise / row[0])[None], h[:-1]])
      noise = noise / row[0]
      out.append(x + noise.astype(x.dtype))
      hist.append(h)
    new_state = BandedNoiseState(state.round + 1, tuple(hist))
    return update._replace(delta=jax.tree.unflatten(treedef, out)), new_state, {}

  stage = Aggregator(init, aggregate, frozenset({ADDS_NOISE}))
  return stage


def band_mf_strategy(bands: int, num_rounds: int | None = None, *,
                     optimizer_steps: int = 250) -> np.ndarray:
  """RMSE-optimal ``bands``-banded Toeplitz strategy coefficients, from jax_privacy.

  With ``num_rounds``: ``jax_privacy.matrix_factorization.toeplitz.optimize_banded_toeplitz``
  (mean squared error of the prefix sums over ``num_rounds``; Choquette-Choo et al. 2023).
  Without: the first ``bands`` coefficients of the max-error-optimal Toeplitz square root of the
  prefix-sum matrix (``optimal_max_error_strategy_coefs``; Fichtenberger et al. 2023),
  normalised. ``bands = 1`` gives ``[1.0]`` (the identity strategy: DP-FedAvg's noise).

  Returns:
    float64 ``[bands]`` coefficients with unit L2 norm.
  """
  b = _v.positive_int("bands", bands)
  if num_rounds is not None:
    _v.positive_int("num_rounds", num_rounds)
    if b > num_rounds:
      raise ValueError(f"bands={b} is larger than num_rounds={num_rounds}; use bands <= "
                       "num_rounds.")
  if b == 1:
    return np.ones(1)
  from jax_privacy.matrix_factorization import toeplitz

  if num_rounds is None:
    c = np.asarray(toeplitz.optimal_max_error_strategy_coefs(b), np.float64)
  else:
    c = np.asarray(toeplitz.optimize_banded_toeplitz(
        int(num_rounds), b, max_optimizer_steps=optimizer_steps), np.float64)
  return c / np.linalg.norm(c)


def band_mf_mean(clip, noise_multiplier, *, bands: int = 1, strategy=None,
                 num_rounds: int | None = None, denominator=None) -> Process:
  """DP-FTRL with banded matrix-factorization noise (BandMF): clip, sum, correlated noise, divide.

  Estimator of round t: ``(Σ_k clip(Δ_k) + x_t) / D`` with ``x = C⁻¹ σ Z`` the BandMF noise
  (:func:`banded_noise`, σ = z · clip). ``bands = 1`` is exactly :func:`dp_mean`. Account with a
  participation schedule whose min-separation is at least ``bands``
  (``fs.sampling.cyclic_poisson(q, cycle_length=b, ...)``): ``fs.privacy`` refuses any other.

  Args:
    clip: the per-client L2 bound S > 0.
    noise_multiplier: z >= 0.
    bands: b >= 1, the number of bands (ignored when ``strategy`` is given).
    strategy: optional Toeplitz coefficients or lower-triangular ``[T, T]`` matrix (default:
      :func:`band_mf_strategy(bands, num_rounds) <band_mf_strategy>`).
    num_rounds: T, the horizon the default strategy is optimised for (and the size a matrix
      strategy must have).
    denominator: fixed denominator D (default: expected cohort size).

  Returns:
    a :class:`Process` with ``noise_multiplier = z`` and ``num_bands = b`` for the accountant.

  References:
    Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning without
    Sampling or Shuffling", ICML 2021 (arXiv:2103.00039). Choquette-Choo, Ganesh, McKenna,
    McMahan, Rush, Thakurta, Xu, "(Amplified) Banded Matrix Factorization: A unified approach to
    private training", NeurIPS 2023 (arXiv:2306.08153).

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.band_mf_mean(clip=1.0, noise_multiplier=1.0, bands=4)
    >>> agg.num_bands, agg.noise_multiplier
    (4, 1.0)
  """
  z = float(_non_negative("noise_multiplier", noise_multiplier))
  if strategy is None:
    strategy = band_mf_strategy(bands, num_rounds)
  table, horizon = _as_band_table(strategy, num_rounds)
  stage = banded_noise(strategy, z, clip)
  return process(clip_l2(clip), sum_reducer(), chain(stage, divide_by(denominator)),
                 noise_multiplier=z, num_bands=table.shape[1], horizon=horizon)



# -- tree aggregation (the original DP-FTRL) ------------------------------------------------------


class TreeNoiseState(NamedTuple):
  """State of :func:`tree_noise`.

  Attributes:
    round: int32, rounds noised so far.
    nodes: per parameter leaf, float32 ``[L, *leaf.shape]``: for each level l of the binary tree,
      the noise of the level-l node in the current prefix (``L = bit_length(num_rounds)``).
  """

  round: jax.Array
  nodes: tuple


def tree_gram(num_rounds: int) -> np.ndarray:
  """``CᵀC`` of the binary-tree strategy over ``num_rounds`` rounds (C: one row per tree node).

  ``(CᵀC)[i, j]`` is the number of tree levels l at which rounds i and j fall in the same node
  (``i >> l == j >> l``, 0-indexed rounds); every node of every level is counted, so the
  sensitivity computed from it is an upper bound for the online tree.

  Returns:
    float64 ``[T, T]``.
  """
  t = _v.positive_int("num_rounds", num_rounds)
  levels = max(int(t).bit_length(), 1)
  r = np.arange(t)
  return sum((r[:, None] >> lv == r[None, :] >> lv).astype(np.float64) for lv in range(levels))


def tree_noise(noise_multiplier, clip, num_rounds: int) -> Aggregator:
  """Post stage: tree-aggregation noise (DP-FTRL, Kairouz et al. 2021), online.

  Each node of a binary tree over the rounds gets an independent ``N(0, σ²)`` vector
  (σ = z · clip); the noise of the running sum after round t is the sum of the nodes of t's
  dyadic decomposition, so the noise added in round t is the difference of consecutive prefix
  noises: ``new node at level r − Σ_{l<r} current node at level l`` with r the number of
  trailing zeros of t (1-indexed). State: one node per level, ``L × params`` floats with
  ``L = bit_length(num_rounds)``; the new node is the very draw ``gaussian_noise`` makes.

  Args:
    noise_multiplier: z >= 0.
    clip: the per-client L2 bound S > 0.
    num_rounds: T, the rounds the tree covers (a run may not go past it).

  Returns:
    a ``post`` :class:`Aggregator` stage (tagged ``ADDS_NOISE``) with a :class:`TreeNoiseState`.

  References:
    Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning
    without Sampling or Shuffling", ICML 2021 (arXiv:2103.00039).
  """
  t_max = _v.positive_int("num_rounds", num_rounds)
  levels = max(int(t_max).bit_length(), 1)
  stddev = _non_negative("noise_multiplier", noise_multiplier) * _positive("clip", clip)

  def init(params):
    nodes = tuple(jnp.zeros((levels, *jnp.shape(x)), jnp.float32)
                  for x in jax.tree.leaves(params))
    return TreeNoiseState(jnp.zeros((), jnp.int32), nodes)

  def aggregate(update, state, key, context):
    del context
    t = state.round + 1
    r = jnp.minimum(jax.lax.population_count((t & -t) - 1), levels - 1)  # trailing zeros
    below = (jnp.arange(levels) < r).astype(jnp.float32)
    at = jnp.arange(levels) == r
    leaves, treedef = jax.tree.flatten(update.delta)
    keys = jax.random.split(key, len(leaves))
    out, nodes = [], []
    for x, k, nd in zip(leaves, keys, state.nodes, strict=True):
      new = stddev * jax.random.normal(k, x.shape, jnp.float32)
      noise = new - jnp.tensordot(below, nd, axes=1)
      shape = (levels,) + (1,) * x.ndim
      nodes.append(jnp.where(at.reshape(shape), new[None], nd))
      out.append(x + noise.astype(x.dtype))
    return (update._replace(delta=jax.tree.unflatten(treedef, out)),
            TreeNoiseState(t, tuple(nodes)), {})

  return Aggregator(init, aggregate, frozenset({ADDS_NOISE}))


def dp_ftrl_mean(clip, noise_multiplier, *, num_rounds: int, denominator=None) -> Process:
  """DP-FTRL with tree aggregation: clip, sum, tree noise (:func:`tree_noise`), divide.

  Accounted without amplification: the whole run is one Gaussian mechanism whose L2
  sensitivity is jax_privacy's ``get_min_sep_sensitivity_upper_bound_for_X`` of the tree's
  ``CᵀC`` under the sampler's participation schema (min-separation b and ``ceil(T/b)``
  participations for ``cyclic_poisson``, ``min(ceil(T/b), k)`` with its
  ``max_participations=k``; any round, up to T times, for other samplers).

  Returns:
    a :class:`Process` whose ``strategy_gram`` gives the accountant the tree's ``CᵀC``.

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.dp_ftrl_mean(clip=1.0, noise_multiplier=2.0, num_rounds=16)
    >>> agg.horizon
    16
  """
  z = float(_non_negative("noise_multiplier", noise_multiplier))
  t = _v.positive_int("num_rounds", num_rounds)
  return process(clip_l2(clip), sum_reducer(),
                 chain(tree_noise(z, clip, t), divide_by(denominator)),
                 noise_multiplier=z, horizon=t, strategy_gram=tree_gram)
