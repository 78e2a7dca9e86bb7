"""Differentially private aggregation: DP-FedAvg (central, optionally with capped example weights),
adaptive clipping, and local DP."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators._base import (
    ADDS_NOISE,
    CAPS_WEIGHTS,
    CLIPS,
    LOCAL_NOISE,
    Aggregator,
    Process,
    chain,
    process,
    sum_reducer,
    weighted_sum_reducer,
)
from fedjax_sim.aggregators._stages import (
    _non_negative,
    _positive,
    _scale_to,
    add_gaussian,
    clip_l2,
    divide_by,
    gaussian_noise,
    global_norm,
)
from fedjax_sim.types import EmptyState, RoundContext


def capped_weights(client_sizes: np.ndarray, weight_cap: float) -> np.ndarray:
  """``min(n_k / weight_cap, 1)`` for every client."""
  return np.minimum(np.asarray(client_sizes, np.float64) / weight_cap, 1.0)


def cap_weights(weight_cap) -> Aggregator:
  """Per-client stage: weight ``w_k = min(n_k / weight_cap, 1)`` (McMahan et al. 2018).

  With weights at most 1 and updates clipped to S, each client's contribution ``w_k Δ_k`` to the
  weighted sum has norm at most S, so the weighted sum keeps sensitivity S.

  Returns:
    a ``per_client`` :class:`Aggregator` stage (tagged ``CAPS_WEIGHTS``).
  """
  cap = _positive("weight_cap", weight_cap)

  def aggregate(update, state, key, context):
    del key, context
    return update._replace(weight=jnp.minimum(update.weight / cap, 1.0)), state, {}

  return Aggregator(lambda params: EmptyState(), aggregate, frozenset({CAPS_WEIGHTS}))


def divide_by_expected_weight(weight_cap) -> Aggregator:
  """Post stage: divide by the expected total capped weight of a cohort, ``q · W``.

  ``W = Σ_k min(n_k / weight_cap, 1)`` over the population and ``q = expected cohort / N``; the
  estimator ``Σ_cohort w_k Δ_k / (q W)`` is unbiased for the population's weighted mean.

  Returns:
    a ``post`` :class:`Aggregator` stage.
  """
  cap = float(_positive("weight_cap", weight_cap))

  def aggregate(update, state, key, context):
    del key
    if context.client_sizes is None:
      raise ValueError("divide_by_expected_weight needs context.client_sizes (set by Simulation).")
    total = float(capped_weights(context.client_sizes, cap).sum())
    denom = context.expected_cohort_size / context.num_clients * total
    return update._replace(delta=jax.tree.map(lambda x: x / denom, update.delta)), state, {}

  return Aggregator(lambda params: EmptyState(), aggregate)


def dp_mean(
    clip, noise_multiplier, *, per_layer: bool = False, denominator=None, weight_cap=None
) -> Process:
  """DP-FedAvg aggregation: clip each client to L2 norm ``clip``, sum, add Gaussian noise, divide
  by a fixed denominator.

  Estimator: ``(Σ_k w_k clip(Δ_k) + N(0, (z S)² I)) / D``.

  * Default: ``w_k = 1`` and ``D`` the expected cohort size (K for fixed-size sampling, qN for
    Poisson) unless ``denominator`` is given. ``D`` counts every client of the population,
    including clients without examples (which never participate: they add nothing to the sum),
    because it must not depend on the data.
  * ``weight_cap=ŵ``: ``w_k = min(n_k / ŵ, 1)`` and ``D = q · Σ_population w_k`` (the
    fixed-denominator estimator f̃_f of McMahan et al. 2018, unbiased for the weighted mean).

  Sensitivity: adding or removing one client changes the sum by at most ``S`` in L2 (replacing
  one, as fixed-size sampling does, by ``2S``; ``fs.privacy`` accounts for that). The noise std
  on the returned mean is ``z S / D``. A plain weighted mean has unbounded sensitivity and is
  refused under DP.

  Args:
    clip: the L2 bound S > 0.
    noise_multiplier: z >= 0.
    per_layer: per-layer clipping with an equal budget split (same total bound).
    denominator: fixed denominator D (default: expected cohort size).
    weight_cap: optional ŵ > 0 for example-weighted DP with capped weights.

  Returns:
    a :class:`Process` (clip, sum, Gaussian noise, divide) with ``noise_multiplier`` set
      for the accountant.

  References:
    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
    ICLR 2018 (arXiv:1710.06963).

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.dp_mean(clip=1.0, noise_multiplier=0.5)
    >>> agg.noise_multiplier
    0.5
  """
  z = _non_negative("noise_multiplier", noise_multiplier)
  z = None if _v.traced(z) else float(z)  # traced in fs.sweep lanes (no host accounting there)
  if weight_cap is None:
    return process(
        clip_l2(clip, per_layer=per_layer),
        sum_reducer(),
        chain(gaussian_noise(noise_multiplier, clip), divide_by(denominator)),
        noise_multiplier=z,
    )
  if denominator is not None:
    raise ValueError("pass either denominator or weight_cap (which fixes the denominator).")
  return process(
      chain(cap_weights(weight_cap), clip_l2(clip, per_layer=per_layer)),
      weighted_sum_reducer(),
      chain(gaussian_noise(noise_multiplier, clip), divide_by_expected_weight(weight_cap)),
      noise_multiplier=z,
  )


# -- adaptive clipping ------------------------------------------------------------------------


class AdaptiveClipState(NamedTuple):
  """The current clipping norm C (float32 scalar)."""

  clip: jax.Array


def adaptive_clip_l2(
    initial_clip=0.1, target_quantile=0.5, learning_rate=0.2, count_noise_stddev=None
) -> Aggregator:
  """Per-client clipping at a norm C that tracks the ``target_quantile`` of update norms.

  Each client clips to the current C and reports ``b_k = 1[‖Δ_k‖ ≤ C]``. After the round
  (``finalize``) the server forms ``b̄ = (Σ b_k + N(0, σ_b²)) / D`` (D the expected cohort
  size) and updates ``C ← C · exp(−η (b̄ − γ))`` (geometric update).

  Args:
    initial_clip: C_0 > 0.
    target_quantile: γ in (0, 1).
    learning_rate: η > 0.
    count_noise_stddev: σ_b >= 0; None: ``expected_cohort_size / 20`` (the paper's default).

  Returns:
    a ``per_client`` :class:`Aggregator` stage whose state is the current clip
      (:class:`AdaptiveClipState`), moved by its ``finalize`` after each round.

  References:
    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021 (arXiv:1905.03871).
  """
  c0 = _positive("initial_clip", initial_clip)
  gamma = _v.hyperparameter("target_quantile", target_quantile, low=0, high=1, low_open=True,
                            high_open=True)
  eta = _positive("learning_rate", learning_rate)
  sigma_b = None if count_noise_stddev is None else _non_negative(
      "count_noise_stddev", count_noise_stddev)

  def init(params):
    del params
    return AdaptiveClipState(clip=c0)

  def aggregate(update, state, key, context):
    del key, context
    norm = global_norm(update.delta)
    delta = jax.tree.map(lambda d: _scale_to(d, norm, state.clip), update.delta)
    unclipped = (norm <= state.clip).astype(jnp.float32)
    metrics = {"fraction_clipped": 1.0 - unclipped, "unclipped": unclipped}
    return update._replace(delta=delta), state, metrics

  def finalize(state, metric_sums, key, context):
    sb = context.expected_cohort_size / 20.0 if sigma_b is None else sigma_b
    noisy = metric_sums["unclipped"] + sb * jax.random.normal(key, (), jnp.float32)
    fraction = noisy / context.expected_cohort_size
    new_clip = state.clip * jnp.exp(-eta * (fraction - gamma))
    return AdaptiveClipState(clip=new_clip), {"clip": state.clip}

  return Aggregator(init, aggregate, frozenset({CLIPS}), finalize)


def split_noise_multiplier(noise_multiplier: float, count_noise_stddev: float) -> float:
  """``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``: the update's share of the noise under adaptive clipping.

  The clipped-count query (sensitivity 1/2 after centring) with noise σ_b and the update with
  ``z_Δ`` compose to the privacy of one Gaussian mechanism with multiplier z (Andrew et al. 2021).
  """
  z, sb = float(noise_multiplier), float(count_noise_stddev)
  if z <= 0:
    raise ValueError("adaptive clipping with DP needs noise_multiplier > 0.")
  if sb <= 0 or z >= 2 * sb:
    raise ValueError(
        f"adaptive clipping cannot split the noise: noise_multiplier z={z} must be < 2·σ_b = "
        f"{2 * sb} (σ_b = count_noise_stddev). Raise count_noise_stddev (default: expected "
        "cohort size / 20, so a larger cohort) or lower z."
    )
  return (z ** -2 - (2 * sb) ** -2) ** -0.5


def adaptive_dp_mean(
    noise_multiplier, *, target_quantile=0.5, initial_clip=0.1, learning_rate=0.2,
    count_noise_stddev=None, denominator=None,
) -> Process:
  """DP-FedAvg with adaptive clipping (Andrew et al. 2021).

  Clients clip to the current C; the sum gets ``N(0, (z_Δ C)²)`` with
  ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``, so that together with the noised clipped-count (std σ_b)
  the round is as private as one Gaussian mechanism with multiplier ``noise_multiplier`` (which
  is what the accountant uses). Defaults: C0 = 0.1, γ = 0.5, η = 0.2, σ_b = K/20.

  Returns:
    a :class:`Process` whose ``noise_multiplier`` is the ``z`` the accountant uses.

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.adaptive_dp_mean(noise_multiplier=1.0)
    >>> agg.noise_multiplier
    1.0
  """
  z = float(_non_negative("noise_multiplier", noise_multiplier))
  stage = adaptive_clip_l2(initial_clip, target_quantile, learning_rate, count_noise_stddev)

  def sigma_b(context: RoundContext) -> float:
    if count_noise_stddev is not None:
      return float(count_noise_stddev)
    return context.expected_cohort_size / 20.0

  def check(context: RoundContext) -> None:
    if z > 0:
      split_noise_multiplier(z, sigma_b(context))

  def noise_aggregate(update, state, key, context):
    if z == 0:
      return update, state, {}
    z_delta = split_noise_multiplier(z, sigma_b(context))
    clip = context.per_client_state.clip
    return update._replace(delta=add_gaussian(update.delta, z_delta * clip, key)), state, {}

  noise = Aggregator(lambda params: EmptyState(), noise_aggregate, frozenset({ADDS_NOISE}))
  return process(stage, sum_reducer(), chain(noise, divide_by(denominator)),
                 noise_multiplier=z, check=check)


# -- local DP -----------------------------------------------------------------------------------


def local_gaussian_noise(noise_multiplier, clip) -> Aggregator:
  """Per-client stage: the client adds ``N(0, (z S)²)`` to its own (clipped) update.

  Use after :func:`clip_l2` in ``per_client``; the noise is drawn from the client's own
  per-client aggregator key, so the server never sees an un-noised update.

  Returns:
    a ``per_client`` :class:`Aggregator` stage (tagged ``LOCAL_NOISE``).
  """
  stddev = _non_negative("noise_multiplier", noise_multiplier) * _positive("clip", clip)

  def aggregate(update, state, key, context):
    del context
    return update._replace(delta=add_gaussian(update.delta, stddev, key)), state, {}

  return Aggregator(lambda params: EmptyState(), aggregate, frozenset({LOCAL_NOISE}))


def local_dp_mean(clip, noise_multiplier, *, denominator=None) -> Process:
  """Local DP: every client clips to ``clip`` and adds its own Gaussian noise before upload; the
  server averages with a fixed denominator. Account with ``fs.privacy.local_epsilon``.

  Returns:
    a :class:`Process` (clip and noise per client, sum, divide).

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.local_dp_mean(clip=1.0, noise_multiplier=2.0)
    >>> sorted(agg.per_client.tags)
    ['clips', 'local_noise']
  """
  return process(
      chain(clip_l2(clip), local_gaussian_noise(noise_multiplier, clip)),
      sum_reducer(),
      divide_by(denominator),
  )
