"""Update compression (``per_client`` stages): quantisation, rotation, sparsification, signs.

Each stage simulates what the client uploads and reports ``bits_uploaded`` per client (the mean
over the cohort's real clients); the server sees the decoded (dequantised) values, so the
aggregate carries exactly the compression error. Keys: a stage's randomness is the client's
per-stage key; the rotation uses the round's shared (public) key so that the server can invert
it on the sum.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators._base import (
  Aggregator,
  Process,
  chain,
  process,
  sum_reducer,
  weighted_sum_reducer,
)
from fedjax_sim.aggregators._stages import normalize
from fedjax_sim.types import EmptyState

_FLOAT_BITS = 32


def _num_params(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _check_bits(bits, low=1, high=24):
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
    raise ValueError(
        f"bits must be an int in [{low}, {high}] (levels are exact float32 integers up to 2^24); "
        f"got {bits!r}."
    )
  return int(bits)


def quantize_leaf(x, bits, key):
  """Unbiased stochastic uniform quantisation of one array to ``2^bits`` levels on [min, max].

  Returns the dequantised array and the per-coordinate variance ``step^2 p (1 - p)`` it adds.
  """
  x32 = x.astype(jnp.float32)
  lo, hi = jnp.min(x32), jnp.max(x32)
  levels = float(2**bits - 1)
  step = (hi - lo) / levels
  safe = jnp.where(step > 0, step, 1.0)
  u = (x32 - lo) / safe
  base = jnp.floor(u)
  p = jnp.clip(u - base, 0.0, 1.0)
  up = jax.random.uniform(key, x.shape) < p
  q = jnp.minimum(base + up, levels)
  out = jnp.where(step > 0, lo + q * step, x32)
  var = jnp.where(step > 0, step**2 * p * (1 - p), 0.0)
  return out.astype(x.dtype), var


def quantize(bits: int) -> Aggregator:
  """Unbiased stochastic uniform quantisation to ``bits`` bits per coordinate (per leaf, on the
  leaf's [min, max] range; QSGD-style randomized rounding, Alistarh et al. 2017; Suresh et al.
  2017). Uploads ``bits`` per coordinate plus two float32 per leaf.

  Args:
    bits: 1..24.

  Returns:
    a ``per_client`` :class:`Aggregator` stage that reports ``bits_uploaded``.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> stage = fs.aggregators.quantize(8)
    >>> u = fs.WeightedUpdate({"w": jnp.linspace(-1, 1, 1000)}, jnp.float32(1))
    >>> out, _, m = stage.aggregate(u, stage.init(None), jax.random.key(0), None)
    >>> float(m["bits_uploaded"]), bool(jnp.abs(out.delta["w"] - u.delta["w"]).max() < 2 / 255)
    (8064.0, True)
  """
  b = _check_bits(bits)

  def aggregate(update, state, key, context):
    del context
    leaves, treedef = jax.tree.flatten(update.delta)
    keys = jax.random.split(key, len(leaves))
    out = [quantize_leaf(x, b, k)[0] for x, k in zip(leaves, keys, strict=True)]
    sent = sum(x.size * b + 2 * _FLOAT_BITS for x in leaves)
    return (update._replace(delta=jax.tree.unflatten(treedef, out)), state,
            {"bits_uploaded": jnp.float32(sent)})

  return Aggregator(lambda params: EmptyState(), aggregate)


# -- randomized Hadamard rotation ----------------------------------------------------------------


def fwht(x: jax.Array) -> jax.Array:
  """Orthonormal fast Walsh-Hadamard transform of a length-2^m vector (its own inverse)."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"fwht needs a power-of-two length; got {n}.")
  h = 1
  y = x
  while h < n:
    y = y.reshape(-1, 2, h)
    y = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1)
    h *= 2
  return y.reshape(x.shape) / jnp.sqrt(jnp.float32(n))


def flatten_tree(tree):
  """All leaves of ``tree`` concatenated into one float32 vector (leaf order of ``jax.tree``)."""
  return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def unflatten_like(vec, template):
  """The inverse of :func:`flatten_tree` for ``template``'s shapes and dtypes (arrays or
  ``ShapeDtypeStruct``); entries past the template's size (padding) are dropped."""
  leaves, treedef = jax.tree.flatten(template)
  sizes = [int(np.prod(x.shape)) for x in leaves]
  parts = jnp.split(vec[: sum(sizes)], np.cumsum(sizes)[:-1])
  return jax.tree.unflatten(
      treedef, [p.reshape(x.shape).astype(x.dtype) for p, x in zip(parts, leaves, strict=True)]
  )


def _padded_dim(d: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(d, 1))))


def _signs(context, tag, n):
  key = jax.random.fold_in(context.shared_key, tag)
  return jax.random.rademacher(key, (n,), jnp.float32)


def rotate_vector(vec, context, tag):
  d = _padded_dim(vec.shape[0])
  padded = jnp.zeros(d, jnp.float32).at[: vec.shape[0]].set(vec)
  return fwht(padded * _signs(context, tag, d))


def unrotate_vector(vec, context, tag):
  return fwht(vec) * _signs(context, tag, vec.shape[0])


class Rotation(NamedTuple):
  """The two halves of a shared random rotation: ``rotate`` (per_client) and ``unrotate``
  (post)."""

  rotate: Aggregator
  unrotate: Aggregator


def hadamard_rotation(seed_tag: int = 0) -> Rotation:
  """Randomized Hadamard rotation ``x -> H D x`` with signs D from the round's shared key.

  The client flattens its update, zero-pads it to a power of two ``d'`` and rotates it (so its
  coordinates are spread evenly, which makes quantisation error smaller); the server applies the
  inverse ``D H`` to the SUM (the rotation is linear and shared by all clients), and restores
  the parameter shapes. Exactly invertible up to float rounding. Use the same ``seed_tag`` for
  the pair; two rotations in one pipeline need different tags.

  Returns:
    a :class:`Rotation`: a ``per_client`` stage that rotates and its ``post`` inverse.

  References:
    Suresh, Yu, Kumar, McMahan, "Distributed Mean Estimation with Limited Communication",
    ICML 2017.

  Examples:
    >>> import fedjax_sim as fs
    >>> rot = fs.aggregators.hadamard_rotation()
    >>> agg = fs.aggregators.process(
    ...     fs.aggregators.chain(rot.rotate, fs.aggregators.quantize(8)),
    ...     fs.aggregators.weighted_sum_reducer(),
    ...     fs.aggregators.chain(rot.unrotate, fs.aggregators.normalize()))
  """
  tag = int(seed_tag)

  def rotate(update, state, key, context):
    del key
    vec = rotate_vector(flatten_tree(update.delta), context, tag)
    return update._replace(delta=vec), state, {}

  def unrotate(update, state, key, context):
    del key
    vec = unrotate_vector(update.delta, context, tag)
    return update._replace(delta=unflatten_like(vec, context.params_template)), state, {}

  return Rotation(Aggregator(lambda params: EmptyState(), rotate),
                  Aggregator(lambda params: EmptyState(), unrotate))


def quantized_mean(bits: int, *, rotate: bool = True, weighted: bool = True) -> Process:
  """FedAvg's mean of ``bits``-bit stochastically quantised updates, optionally after a shared
  randomized Hadamard rotation (inverted on the server).

  Returns:
    a :class:`Process`: (rotate,) quantise per client, sum, (unrotate,) normalise.
  """
  q = quantize(bits)
  reducer = weighted_sum_reducer() if weighted else sum_reducer()
  if not rotate:
    return process(q, reducer, normalize())
  rot = hadamard_rotation()
  return process(chain(rot.rotate, q), reducer, chain(rot.unrotate, normalize()))


# -- sparsification and signs -----------------------------------------------------------------


def _resolve_k(k, fraction, num_params):
  if (k is None) == (fraction is None):
    raise ValueError("pass exactly one of k= (coordinates kept) or fraction= (of all params).")
  if k is not None:
    kk = _v.positive_int("k", k)
  else:
    frac = _v.probability("fraction", fraction)
    kk = max(1, int(round(frac * num_params)))
  if kk > num_params:
    raise ValueError(
        f"top_k keeps k={kk} coordinates but the model has only {num_params} parameters; use "
        f"k <= {num_params} (or fraction <= 1)."
    )
  return kk


def top_k(k: int | None = None, *, fraction: float | None = None,
          error_feedback: bool = True) -> Aggregator:
  """Top-k sparsification: each client sends its ``k`` largest-magnitude coordinates (over the
  whole update) as (value, index) pairs. With ``error_feedback`` every client keeps the residual
  it did not send, for the whole population, and adds it to its next update (Stich, Cordonnier,
  Jaggi, NeurIPS 2018; Karimireddy et al. 2019). Uploads ``k * (32 + ceil(log2 P))`` bits.

  Args:
    k: coordinates kept per client; or ``fraction`` of the P parameters.
    error_feedback: keep per-client residuals (memory ``num_clients x P`` floats).

  Returns:
    a ``per_client`` :class:`Aggregator` stage (with per-client residuals when
      ``error_feedback``) that reports ``bits_uploaded``.
  """
  if k is not None:
    _v.positive_int("k", k)

  def init(params):
    _resolve_k(k, fraction, _num_params(params))  # refuse k > P before compiling
    return EmptyState()

  def client_init(params):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)

  def aggregate(update, state, key, context):
    del key, context
    delta = update.delta
    acc = jax.tree.map(lambda d, e: d.astype(jnp.float32) + e, delta, update.client_state) \
        if error_feedback else delta
    vec = flatten_tree(acc)
    p = vec.shape[0]
    kk = _resolve_k(k, fraction, p)
    _, idx = jax.lax.top_k(jnp.abs(vec), kk)
    sparse = jnp.zeros_like(vec).at[idx].set(vec[idx])
    out = unflatten_like(sparse, delta)
    new_state = update.client_state
    if error_feedback:
      new_state = unflatten_like(vec - sparse, update.client_state)
    bits = kk * (_FLOAT_BITS + math.ceil(math.log2(max(p, 2))))
    return (update._replace(delta=out, client_state=new_state), state,
            {"bits_uploaded": jnp.float32(bits)})

  return Aggregator(init, aggregate, client_init=client_init if error_feedback else None)


def sign_compression(*, error_feedback: bool = False) -> Aggregator:
  """Scaled sign compression: each leaf is sent as ``sign(x) * mean(|x|)`` (1 bit per coordinate
  plus one float per leaf), optionally with per-client error feedback (EF-SignSGD, Karimireddy,
  Rebjock, Stich, Jaggi, ICML 2019).

  Returns:
    a ``per_client`` :class:`Aggregator` stage (with per-client residuals when
      ``error_feedback``) that reports ``bits_uploaded``.
  """

  def client_init(params):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)

  def aggregate(update, state, key, context):
    del key, context
    acc = jax.tree.map(lambda d, e: d.astype(jnp.float32) + e, update.delta,
                       update.client_state) if error_feedback else update.delta
    sent = jax.tree.map(lambda x: jnp.sign(x) * jnp.mean(jnp.abs(x)), acc)
    out = jax.tree.map(lambda s, d: s.astype(d.dtype), sent, update.delta)
    new_state = update.client_state
    if error_feedback:
      new_state = jax.tree.map(lambda a, s: a - s, acc, sent)
    leaves = jax.tree.leaves(update.delta)
    bits = sum(x.size + _FLOAT_BITS for x in leaves)
    return (update._replace(delta=out, client_state=new_state), state,
            {"bits_uploaded": jnp.float32(bits)})

  return Aggregator(lambda params: EmptyState(), aggregate,
                    client_init=client_init if error_feedback else None)
