"""Secure aggregation and distributed DP, simulated bit-exactly in unsigned integer arithmetic.

The server of secure aggregation (Bonawitz et al., CCS 2017) learns only the SUM of the clients'
vectors in the finite group Z_{2^b}. This module simulates what that does to the numbers:

* :func:`secure_mean`: fixed-point encoding (coordinate clipping to ``[-c, c]``, scaling,
  unbiased randomized rounding), two's-complement wrap into ``Z_{2^b}``, a ``uint32`` sum (JAX's
  unsigned adds wrap modulo 2^32, and 2^b divides 2^32, so the sum is exact modulo 2^b),
  decoding. ``mode="masked"`` additionally adds the pairwise and self masks of the protocol,
  derived from per-pair keys, and removes them on the server, including the masks of clients
  that drop out after masking; its result equals the plain modular sum bit for bit (tested),
  at O(K^2 x params) cost, so it is a verification mode. ``mode="modular"`` (the default) is
  the cheap, provably identical sum.
* :func:`distributed_dp_mean`: the distributed Skellam mechanism (Agarwal, Kairouz, Liu,
  NeurIPS 2021): clip, randomized Hadamard rotation, scale, randomized rounding, local
  Skellam noise, modular wrap, modular sum, then the server's inverse. Accounting:
  :func:`fedjax_sim.privacy.skellam_epsilon`.

Wrap-around is the failure mode of too few bits: every coordinate whose true integer sum left
``[-2^(b-1), 2^(b-1))`` is counted in ``secagg_wrapped`` (the simulation carries a float32
shadow of the integer sum for this diagnostic; it is not part of the protocol).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators._base import (
  CLIPS,
  LOCAL_NOISE,
  SECURE,
  Aggregator,
  Process,
  Reducer,
  chain,
  process,
)
from fedjax_sim.aggregators._compression import (
  _num_params,
  _padded_dim,
  flatten_tree,
  rotate_vector,
  unflatten_like,
  unrotate_vector,
)
from fedjax_sim.aggregators._stages import _scale_to, global_norm, normalize
from fedjax_sim.types import EmptyState, WeightedUpdate

_SELF, _PAIR, _DROP = 0x5E1F, 0x9A12, 0xD209
_ROTATION_TAG = 0xDD9


class SecurePayload(NamedTuple):
  """What flows from the clients to the server: field elements (``uint32``, values mod 2^b)
  and a float32 shadow of the same integers without wrap (a simulation-only diagnostic)."""

  field: Any
  shadow: Any


def _bit_mask(bits: int) -> np.uint32:
  return np.uint32((1 << bits) - 1) if bits < 32 else np.uint32(0xFFFFFFFF)


def to_field(ints: jax.Array, bits: int) -> jax.Array:
  """Two's-complement int32 -> ``Z_{2^bits}`` as uint32."""
  return jax.lax.bitcast_convert_type(ints.astype(jnp.int32), jnp.uint32) & _bit_mask(bits)


def from_field(values: jax.Array, bits: int) -> jax.Array:
  """``Z_{2^bits}`` -> the centred representative in ``[-2^(bits-1), 2^(bits-1))`` (int32)."""
  values = values & _bit_mask(bits)
  if bits == 32:
    return jax.lax.bitcast_convert_type(values, jnp.int32)
  ints = values.astype(jnp.int32)
  return jnp.where(ints >= (1 << (bits - 1)), ints + np.int32(-(1 << bits)), ints)


def randomized_round(x: jax.Array, key) -> jax.Array:
  """Unbiased rounding to an integer: ``floor(x) + Bernoulli(x - floor(x))`` (int32)."""
  base = jnp.floor(x)
  return (base + (jax.random.uniform(key, x.shape) < (x - base))).astype(jnp.int32)


def _prg(key, template):
  leaves, treedef = jax.tree.flatten(template)
  return jax.tree.unflatten(treedef, [
      jax.random.bits(jax.random.fold_in(key, j), x.shape, jnp.uint32)
      for j, x in enumerate(leaves)
  ])


def _self_key(shared, cid):
  return jax.random.fold_in(jax.random.fold_in(shared, _SELF), cid)


def _pair_key(shared, u, v):
  lo, hi = jnp.minimum(u, v), jnp.maximum(u, v)
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(shared, _PAIR), lo), hi)


def _dropped_after_masking(shared, cid, rate):
  if rate == 0:
    return jnp.zeros(jnp.shape(cid), bool)
  key = jax.random.fold_in(jax.random.fold_in(shared, _DROP), cid)
  return jax.random.uniform(key) < rate


def _pairwise_masks(field, cid, context):
  """``sum_v sign(u, v) PRG(s_uv)`` over the other selected clients v (``+`` if u < v)."""
  ids, selected = context.cohort_ids, context.cohort_mask

  def body(j, acc):
    v = ids[j]
    active = selected[j] & (v != cid)
    m = _prg(_pair_key(context.shared_key, cid, v), field)
    return jax.tree.map(
        lambda a, x: a + jnp.where(active, jnp.where(cid < v, x, jnp.uint32(0) - x),
                                   jnp.uint32(0)), acc, m)

  zeros = jax.tree.map(jnp.zeros_like, field)
  return jax.lax.fori_loop(0, ids.shape[0], body, zeros)


def _unmask(field_sum, context, rate):
  """The server's mask removal: survivors' self masks and dropped clients' pairwise masks."""
  ids, selected, kept = context.cohort_ids, context.cohort_mask, context.cohort_kept
  shared = context.shared_key
  survived = kept & ~jax.vmap(lambda c: _dropped_after_masking(shared, c, rate))(ids)
  dangling = selected & ~survived
  k = ids.shape[0]

  def per_survivor(i, acc):
    u = ids[i]
    own = _prg(_self_key(shared, u), acc)

    def per_dropped(j, a):
      v = ids[j]
      m = _prg(_pair_key(shared, u, v), a)
      return jax.tree.map(
          lambda t, x: t + jnp.where(dangling[j], jnp.where(u < v, x, jnp.uint32(0) - x),
                                     jnp.uint32(0)), a, m)

    masks = jax.lax.fori_loop(0, k, per_dropped, own)
    return jax.tree.map(lambda a, m: a + jnp.where(survived[i], m, jnp.uint32(0)), acc, masks)

  total = jax.lax.fori_loop(0, k, per_survivor, jax.tree.map(jnp.zeros_like, field_sum))
  return jax.tree.map(lambda s, m: s - m, field_sum, total)


def secure_sum_reducer() -> Reducer:
  """Sums :class:`SecurePayload` s: field elements in ``uint32`` (wrapping) and the weights.

  Returns:
    a :class:`Reducer` that sums in ``uint32`` with wrap-around.
  """

  def contribute(update, is_real):
    real = is_real > 0
    delta = jax.tree.map(lambda d: jnp.where(real, d, jnp.zeros_like(d)), update.delta)
    return WeightedUpdate(delta, update.weight * is_real)

  return Reducer(contribute, weighted=False)


def _check_mode(mode, dropout):
  if mode not in ("modular", "masked"):
    raise ValueError(f"mode must be 'modular' (the exact modular sum) or 'masked' (pairwise "
                     f"masks, a verification mode); got {mode!r}.")
  rate = _v.probability("dropout", dropout)
  if rate >= 1:
    raise ValueError("dropout must be < 1 (every client would drop after masking).")
  return rate


def _check_field_bits(bits, high=32, why="the group Z_2^bits in uint32"):
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= high:
    raise ValueError(f"bits must be an int in [2, {high}] ({why}); got {bits!r}.")
  return int(bits)


# Largest magnitude one client's fixed-point value may take: it is rounded in float32 and cast to
# int32, and float32(2^31 - 1) already rounds up to 2^31, which overflows the cast.
_INT32_SAFE = float(2**30)


def min_secure_bits(cohort_size: int) -> int:
  """The fewest bits whose group can hold the sum of ``cohort_size`` one-level clients."""
  return int(math.floor(math.log2(cohort_size + 1))) + 2


def _auto_scale(bits, clip_range, cohort):
  # K clients each contribute at most ceil(c * scale) <= c * scale + 1 in magnitude; each value
  # must also stay within int32 after float32 rounding.
  budget = min((1 << (bits - 1)) - 1, _INT32_SAFE * cohort)
  return (budget - cohort) / (cohort * clip_range)


def _decode(field_sum, shadow_sum, bits):
  ints = jax.tree.map(lambda f: from_field(f, bits), field_sum)
  wrapped = sum(
      jnp.sum(jnp.abs(i.astype(jnp.float32) - s) > 2.0 ** (bits - 2))
      for i, s in zip(jax.tree.leaves(ints), jax.tree.leaves(shadow_sum), strict=True)
  )
  return ints, wrapped.astype(jnp.float32)


def secure_mean(
    bits: int = 32,
    clip_range: float = 1.0,
    *,
    scale: float | None = None,
    weighted: bool = True,
    max_weight: float | None = None,
    mode: str = "modular",
    dropout: float = 0.0,
) -> Process:
  """The (weighted) mean of the clients' updates through simulated secure aggregation.

  Each client multiplies its update by ``r = min(n / max_weight, 1)`` (``n`` its examples; 1 if
  unweighted), clips every coordinate to ``[-clip_range, clip_range]``, encodes it as
  ``randomized_round(x * scale)`` in ``Z_{2^bits}``; the server decodes the modular sum, divides
  by ``scale`` and by the summed ``r`` (as Flower's SecAgg+ workflow does). With the default
  ``scale`` (the largest that cannot wrap for this cohort capacity K) no coordinate wraps; an
  explicit ``scale`` can wrap, and wrapped coordinates are counted in ``secagg_wrapped``.

  Error (per coordinate, against the exact ``Σ r_i clip(x_i) / Σ r_i`` of the K' clients that
  reached the sum): each client's randomized rounding errs by less than one integer, and the
  decoder divides the summed integers by ``scale · Σ r``, so the error is below
  ``K' / (scale · Σ r)``. Unweighted (every ``r = 1``) that is ``1 / scale``; weighted with
  unequal sizes ``Σ r`` can be far below K' (sizes [100, 1, 1, 1]: ``Σ r = 1.03``, bound
  ``3.9 / scale``). The values are encoded and decoded in float32, which adds at most
  ``u · c · (3 K' / Σ r + 2)`` (``u = 2^-24``); at ``bits=32`` that float32 term dominates
  (``1 / scale`` is then below float32's spacing), so the result is as exact as float32
  encoding allows, not ``1 / scale``. Each round reports the bound as
  ``secagg_error_bound``.

  Args:
    bits: the group size ``2^bits``, 2..32.
    clip_range: per-coordinate bound c of ``r * update``.
    scale: fixed-point scale (integers per unit); None for the safe maximum.
    weighted: weight by example counts (capped at ``max_weight``, default the largest client).
    mode: ``"modular"`` or ``"masked"`` (module docstring).
    dropout: probability that a client drops AFTER masking (its masks are then recovered).

  Metrics: ``secagg_clipped`` (fraction of coordinates clipped), ``secagg_dropped``,
  ``secagg_wrapped``, ``secagg_scale``, ``secagg_error_bound`` (the bound above, when nothing
  wrapped), ``bits_uploaded``.

  Returns:
    a :class:`Process` (tagged ``SECURE``) that reports ``secagg_wrapped``.

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.secure_mean(bits=20, clip_range=0.5)
    >>> fs.aggregators.SECURE in agg.tags
    True
  """
  b = _check_field_bits(bits)
  c = _v.positive("clip_range", clip_range)
  fixed_scale = None if scale is None else _v.positive("scale", scale)
  if fixed_scale is not None and fixed_scale * c > _INT32_SAFE:
    raise ValueError(
        f"scale={scale} x clip_range={clip_range} = {fixed_scale * c:.3g} exceeds 2^30: one "
        "client's fixed-point value would overflow int32. Use scale <= "
        f"{_INT32_SAFE / c:.6g} (or scale=None for the largest safe scale)."
    )
  cap = None if max_weight is None else _v.positive("max_weight", max_weight)
  rate = _check_mode(mode, dropout)
  masked = mode == "masked"

  def scale_for(context):
    if fixed_scale is not None:
      return fixed_scale
    return _auto_scale(b, c, context.max_cohort_size)

  def weight_cap(context):
    if cap is not None:
      return cap
    return float(np.max(context.client_sizes)) if context.client_sizes is not None else 1.0

  def check(context):
    if fixed_scale is None and context.max_cohort_size is not None:
      need = min_secure_bits(context.max_cohort_size)
      if b < need:
        raise ValueError(
            f"secure_mean(bits={b}): the group Z_2^{b} is too small to sum a cohort of "
            f"{context.max_cohort_size} clients without wrap-around; it needs bits >= {need} "
            "(more for a finer fixed-point scale)."
        )

  def encode(update, state, key, context):
    cid, shared = context.client_id, context.shared_key
    s = scale_for(context)
    r = jnp.minimum(update.weight / weight_cap(context), 1.0) if weighted else jnp.float32(1.0)
    leaves, treedef = jax.tree.flatten(update.delta)
    keys = jax.random.split(key, len(leaves))
    fields, shadows, clipped = [], [], 0.0
    for x, k in zip(leaves, keys, strict=True):
      v = r * x.astype(jnp.float32)
      clipped = clipped + jnp.sum(jnp.abs(v) > c)
      ints = randomized_round(jnp.clip(v, -c, c) * s, k)
      fields.append(to_field(ints, b))
      shadows.append(ints.astype(jnp.float32))
    field = jax.tree.unflatten(treedef, fields)
    if masked:
      noise = jax.tree.map(lambda a, m: a + m, _prg(_self_key(shared, cid), field),
                           _pairwise_masks(field, cid, context))
      field = jax.tree.map(lambda f, m: (f + m) & _bit_mask(b), field, noise)
    dropped = _dropped_after_masking(shared, cid, rate)
    field = jax.tree.map(lambda f: jnp.where(dropped, jnp.uint32(0), f), field)
    shadow = jax.tree.map(lambda f: jnp.where(dropped, 0.0, f),
                          jax.tree.unflatten(treedef, shadows))
    num = sum(x.size for x in leaves)
    metrics = {
        "secagg_clipped": clipped.astype(jnp.float32) / num,
        "secagg_dropped": dropped.astype(jnp.float32),
        "bits_uploaded": jnp.float32(num * b),
    }
    return (WeightedUpdate(SecurePayload(field, shadow), jnp.where(dropped, 0.0, r)), state,
            metrics)

  def decode(update, state, key, context):
    del key
    field_sum, shadow_sum = update.delta
    if masked:
      field_sum = _unmask(field_sum, context, rate)
    ints, wrapped = _decode(field_sum, shadow_sum, b)
    s = scale_for(context)
    delta = jax.tree.map(lambda i, t: (i.astype(jnp.float32) / s).astype(t.dtype), ints,
                         context.params_template)
    num_real = (jnp.float32(1.0) if context.cohort_kept is None
                else jnp.sum(context.cohort_kept.astype(jnp.float32)))
    total_r = update.weight
    bound = (num_real / (s * total_r)
             + 2.0**-24 * c * (3.0 * num_real / total_r + 2.0))
    metrics = {"secagg_wrapped": wrapped, "secagg_scale": jnp.float32(s),
               "secagg_error_bound": jnp.where(total_r > 0, bound, jnp.nan).astype(jnp.float32)}
    return WeightedUpdate(delta, update.weight), state, metrics

  per_client = Aggregator(lambda params: EmptyState(), encode, frozenset({SECURE}))
  post_decode = Aggregator(lambda params: EmptyState(), decode)
  return process(per_client, secure_sum_reducer(), chain(post_decode, normalize()), check=check)


# -- distributed DP: the Skellam mechanism ------------------------------------------------------


class SkellamParams(NamedTuple):
  """The calibrated parameters of the distributed Skellam mechanism (unscaled units)."""

  scale: float  # integers per unit after rotation
  padded_dim: int  # d', the rotated dimension
  local_stddev: float  # sigma_l = z * c / sqrt(n), per client, per coordinate
  lam: float  # Poisson rate per coordinate: (sigma_l * scale)^2 / 2
  l2_sensitivity: float  # inflated by rounding, integer domain
  l1_sensitivity: float  # integer domain
  central_variance: float  # n * 2 * lam, integer domain


def skellam_params(clip: float, noise_multiplier: float, bits: int, num_params: int,
                   expected_clients: float, k_stddevs: float | None = None,
                   modclip_prob: float = 1e-4) -> SkellamParams:
  """Calibrates the Skellam pipeline as TFF's ``DistributedDpSumFactory`` does (beta = 0,
  unconditional rounding): ``scale = sqrt(2^(2b) - n k^2) / (2 k sqrt(c^2 n^2 / d' + n
  sigma_l^2))`` with ``k = sqrt(2) erfcinv(modclip_prob)``, capped at 1e6."""
  bits = _check_field_bits(bits, 22, "float32 holds integers exactly only below 2^24")
  n = float(expected_clients)
  k = math.sqrt(2) * float(special.erfcinv(modclip_prob)) if k_stddevs is None else k_stddevs
  d = _padded_dim(num_params)
  sigma_l = noise_multiplier * clip / math.sqrt(n)
  room = 2.0 ** (2 * bits) - n * k * k
  if room <= 0 or bits < math.log2(n):
    raise ValueError(
        f"distributed_dp_mean(bits={bits}): Z_2^{bits} is too small for {n:g} clients per "
        f"round; it needs 2^(2 bits) > n k^2 and bits >= log2(n), i.e. bits >= "
        f"{max(math.ceil(math.log2(max(n, 2))), math.ceil(0.5 * math.log2(n * k * k)) + 1)}."
    )
  scale = min(math.sqrt(room) / (2 * k * math.sqrt(clip**2 * n**2 / d + n * sigma_l**2)), 1e6)
  lam = (sigma_l * scale) ** 2 / 2
  l2 = clip * scale + math.sqrt(d)
  l1 = math.ceil(l2 * min(math.sqrt(d), l2))
  return SkellamParams(scale, d, sigma_l, lam, l2, l1, n * 2 * lam)


def distributed_dp_mean(
    clip: float,
    noise_multiplier: float,
    bits: int = 16,
    *,
    k_stddevs: float | None = None,
    modclip_prob: float = 1e-4,
) -> Process:
  """DP-FedAvg with distributed DP: the Skellam mechanism under secure aggregation.

  Per client: flatten, L2-clip to ``clip``, zero-pad to a power of two d', randomized Hadamard
  rotation (public per-round signs), multiply by ``scale``, unbiased randomized rounding, add
  Skellam noise ``Poisson(lam) - Poisson(lam)`` (local std ``z c / sqrt(n)`` per coordinate,
  n the expected cohort size), wrap into ``Z_{2^bits}``. The server decodes the modular sum,
  divides by ``scale``, rotates back and divides by n (fixed denominator). The n clients' noise
  sums to a Skellam of central std ``z c`` (scaled), so the aggregate matches central DP-FedAvg
  when n clients take part; with fewer the noise, and privacy, is smaller. ``scale`` keeps the
  wrap probability per coordinate near ``modclip_prob``; ``secagg_wrapped`` counts wraps.

  Account with :func:`fedjax_sim.privacy.skellam_epsilon` (the same calibration).

  Returns:
    a :class:`Process` (tagged ``SECURE``) whose ``noise_multiplier`` is ``None``:
      its ε comes from :func:`fedjax_sim.privacy.skellam_epsilon`, not the Gaussian accountant.

  References:
    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021; Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian
    Mechanism for Federated Learning with Secure Aggregation", ICML 2021.

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.distributed_dp_mean(clip=1.0, noise_multiplier=1.0, bits=16)
    >>> sorted(agg.tags)
    ['clips', 'local_noise', 'secure']
  """
  c = _v.positive("clip", clip)
  z = _v.non_negative("noise_multiplier", noise_multiplier)
  # As TFF's DistributedDpSumFactory: the rotated, scaled values are rounded in float32, whose
  # integers are exact only below 2^24, and the Skellam draws are int32.
  b = _check_field_bits(bits, 22, "float32 holds integers exactly only below 2^24")
  if k_stddevs is not None:
    _v.positive("k_stddevs", k_stddevs)
  _v.probability("modclip_prob", modclip_prob)

  def params_for(context):
    return skellam_params(c, z, b, _num_params(context.params_template),
                          context.expected_cohort_size, k_stddevs, modclip_prob)

  def check(context, num_params):
    skellam_params(c, z, b, num_params, context.expected_cohort_size, k_stddevs, modclip_prob)

  def encode(update, state, key, context):
    p = params_for(context)
    vec = flatten_tree(update.delta)
    norm = global_norm(vec)
    vec = _scale_to(vec, norm, c)
    rotated = rotate_vector(vec, context, _ROTATION_TAG)
    round_key, k1, k2 = jax.random.split(key, 3)
    ints = randomized_round(rotated * p.scale, round_key)
    if p.lam > 0:
      noise = (jax.random.poisson(k1, p.lam, rotated.shape, jnp.int32)
               - jax.random.poisson(k2, p.lam, rotated.shape, jnp.int32))
      ints = ints + noise
    payload = SecurePayload(to_field(ints, b), ints.astype(jnp.float32))
    metrics = {"fraction_clipped": (norm > c).astype(jnp.float32),
               "bits_uploaded": jnp.float32(p.padded_dim * b)}
    return WeightedUpdate(payload, update.weight), state, metrics

  def decode(update, state, key, context):
    del key
    p = params_for(context)
    field_sum, shadow_sum = update.delta
    ints, wrapped = _decode(field_sum, shadow_sum, b)
    vec = unrotate_vector(ints.astype(jnp.float32) / p.scale, context, _ROTATION_TAG)
    delta = unflatten_like(vec / jnp.float32(context.expected_cohort_size),
                            context.params_template)
    return (WeightedUpdate(delta, update.weight), state,
            {"secagg_wrapped": wrapped, "secagg_scale": jnp.float32(p.scale)})

  reducer = secure_sum_reducer()._replace(check=check)
  per_client = Aggregator(lambda params: EmptyState(), encode,
                          frozenset({SECURE, CLIPS, LOCAL_NOISE}))
  return process(per_client, reducer, Aggregator(lambda params: EmptyState(), decode))
