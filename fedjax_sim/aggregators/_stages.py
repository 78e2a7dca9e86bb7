"""Concrete aggregator stages: clipping, noise, normalisation, and the common pipelines."""

from __future__ import annotations

import builtins

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators._base import (
  ADDS_NOISE,
  CLIPS,
  Aggregator,
  Process,
  identity,
  process,
  sum_reducer,
  weighted_sum_reducer,
)
from fedjax_sim.types import EmptyState, WeightedUpdate


def _positive(name: str, value) -> jax.Array:
  return jnp.asarray(_v.positive(name, value), jnp.float32)


def _non_negative(name: str, value) -> jax.Array:
  return jnp.asarray(_v.non_negative(name, value), jnp.float32)


def global_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(builtins.sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _scale_to(x, norm, bound):
  # min(1, bound / norm) without dividing by zero: a zero update stays zero.
  factor = jnp.where(norm > bound, bound / jnp.where(norm > 0, norm, 1.0), 1.0)
  return x * factor.astype(x.dtype)


def clip_l2(clip, *, per_layer: bool = False) -> Aggregator:
  """Per-client L2 clipping (a ``per_client`` stage).

  Flat: the whole update is scaled so that ``||delta||_2 <= clip``. Per-layer: each of the L
  leaves is clipped to ``clip / sqrt(L)``, an equal split of the budget, so the whole update
  still satisfies ``||delta||_2 <= clip`` (same sensitivity as flat clipping).

  Reports ``fraction_clipped`` (mean over the real clients of the cohort).

  Args:
    clip: the L2 bound S > 0.
    per_layer: clip each leaf separately with the equal budget split.

  Returns:
    a ``per_client`` :class:`Aggregator` stage (tagged ``CLIPS``) that reports
      ``fraction_clipped``.

  References:
    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
    ICLR 2018 (flat and per-layer clipping).

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> stage = fs.aggregators.clip_l2(1.0)
    >>> u = fs.WeightedUpdate({"w": jnp.array([3.0, 4.0])}, jnp.float32(1))
    >>> out, _, m = stage.aggregate(u, stage.init(None), jax.random.key(0), None)
    >>> out.delta["w"].tolist(), float(m["fraction_clipped"])
    ([0.6000000238418579, 0.800000011920929], 1.0)
  """
  bound = _positive("clip", clip)

  def aggregate(update, state, key, context):
    del key, context
    if per_layer:
      leaves = jax.tree.leaves(update.delta)
      layer_bound = bound / np.sqrt(len(leaves))
      norms = jax.tree.map(global_norm, update.delta)
      delta = jax.tree.map(lambda d, n: _scale_to(d, n, layer_bound), update.delta, norms)
      clipped = jnp.any(jnp.stack([n > layer_bound for n in jax.tree.leaves(norms)]))
    else:
      norm = global_norm(update.delta)
      delta = jax.tree.map(lambda d: _scale_to(d, norm, bound), update.delta)
      clipped = norm > bound
    return update._replace(delta=delta), state, {"fraction_clipped": clipped.astype(jnp.float32)}

  return Aggregator(lambda params: EmptyState(), aggregate, frozenset({CLIPS}))


def add_gaussian(tree, stddev, key):
  """``tree + N(0, stddev^2)`` per coordinate, an independent key per leaf.

  Returns:
    The noised tree (each leaf keeps its dtype).
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noised = [x + (stddev * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(treedef, noised)


def gaussian_noise(noise_multiplier, clip) -> Aggregator:
  """Adds ``N(0, (noise_multiplier * clip)^2)`` to every coordinate of the summed update.

  A ``post`` stage for the unweighted sum of clipped updates, whose L2 sensitivity to adding or
  removing one client is ``clip``. Each round's noise comes from the round's aggregator key.

  Args:
    noise_multiplier: z >= 0 (0 adds no noise).
    clip: the clipping bound S > 0 used by the per-client stage.

  Returns:
    a ``post`` :class:`Aggregator` stage (tagged ``ADDS_NOISE``).

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> stage = fs.aggregators.gaussian_noise(noise_multiplier=1.0, clip=0.5)
    >>> u = fs.WeightedUpdate({"w": jnp.zeros(10_000)}, jnp.float32(1))
    >>> out, _, _ = stage.aggregate(u, stage.init(None), jax.random.key(0), None)
    >>> round(float(out.delta["w"].std()), 1)
    0.5
  """
  z = _non_negative("noise_multiplier", noise_multiplier)
  stddev = z * _positive("clip", clip)

  def aggregate(update, state, key, context):
    del context
    return update._replace(delta=add_gaussian(update.delta, stddev, key)), state, {}

  return Aggregator(lambda params: EmptyState(), aggregate, frozenset({ADDS_NOISE}))


def divide_by(denominator=None) -> Aggregator:
  """Divides the summed update by a fixed denominator (a ``post`` stage).

  Args:
    denominator: a positive number, or None for the expected cohort size of the sampler in use
      (K for fixed-size cohorts, q*N for Poisson sampling), the fixed denominator of DP-FedAvg.

  Returns:
    a ``post`` :class:`Aggregator` stage.
  """
  fixed = None if denominator is None else _positive("denominator", denominator)

  def aggregate(update, state, key, context):
    del key
    d = jnp.float32(context.expected_cohort_size) if fixed is None else fixed
    return update._replace(delta=jax.tree.map(lambda x: x / d, update.delta)), state, {}

  return Aggregator(lambda params: EmptyState(), aggregate)


def normalize() -> Aggregator:
  """Divides the summed update by the summed weight (0 stays 0 when the weight is 0).

  Returns:
    a ``post`` :class:`Aggregator` stage.
  """

  def aggregate(update, state, key, context):
    del key, context
    w = update.weight
    safe = jnp.where(w > 0, w, 1.0)
    delta = jax.tree.map(lambda x: jnp.where(w > 0, x / safe, 0.0).astype(x.dtype), update.delta)
    return WeightedUpdate(delta, w), state, {}

  return Aggregator(lambda params: EmptyState(), aggregate)


def weighted_mean() -> Process:
  """Example-weighted mean of client updates (FedAvg's aggregation): sum w_k delta_k / sum w_k.

  Not differentially private: one client's weight is unbounded.

  Returns:
    a :class:`Process` (weighted sum, divide by the summed weight).
  """
  return process(identity(), weighted_sum_reducer(), normalize())


def mean() -> Process:
  """Unweighted mean of the real clients' updates.

  Returns:
    a :class:`Process` (unweighted sum, divide by the number of real clients).
  """
  return process(identity(), sum_reducer(), normalize())


def sum() -> Process:  # noqa: A001 - mirrors the name of the operation, like optax
  """Unweighted sum of the real clients' updates.

  Returns:
    a :class:`Process` (unweighted sum, no division).
  """
  return process(identity(), sum_reducer(), identity())
