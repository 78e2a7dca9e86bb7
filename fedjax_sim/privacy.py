"""Privacy accounting for user-level DP-FedAvg, built on Google's ``dp-accounting`` package.

The DP event is derived from the sampler object the simulation actually runs, so the reported ε
matches the sampling:

* :class:`~fedjax_sim.sampling.PoissonSampler` (each client joins with probability q): the
  Poisson-subsampled Gaussian, add-or-remove-one-client adjacency, noise multiplier z (the sum of
  clipped updates has sensitivity S and noise std zS).
* :class:`~fedjax_sim.sampling.UniformSampler` (fixed-size cohorts of K without replacement):
  replace-one-client adjacency, under which the sum's sensitivity is **2S**, so the Gaussian event
  gets ``z / 2``; accounted with ``SampledWithoutReplacementDpEvent`` (RDP only).
* Truncated Poisson (``max_cohort_size < N``): with ``accountant="pld"`` the exact
  ``TruncatedSubsampledGaussianDpEvent``; with RDP the untruncated event plus an explicit bound:
  truncating changes each round's output with probability at most ``p = P[Binomial(N,q) > K_max]``,
  so ``(ε, δ_rdp)`` becomes ``(ε, δ_rdp + (1 + e^ε) T p)``; half of δ is reserved for that term
  and an error names the ``max_cohort_size`` needed if it does not fit.

* :class:`~fedjax_sim.sampling.CyclicPoissonSampler` (min-separation b: clients in b random bins,
  round t samples bin ``t mod b`` with probability q), alone or with a correlated-noise mechanism of
  at most b bands (``fs.aggregators.band_mf_mean``): jax_privacy's ``amplified_bandmf_event``
  (Choquette-Choo et al. 2023; the column-normalised banded strategy makes each of a client's
  ``ceil(T / b)`` participations a Poisson-subsampled Gaussian), add-or-remove-one adjacency. A
  mechanism with b > 1 bands under any other sampler, or under a cycle shorter than b, has no
  valid accountant here and is refused. With a participation cap
  (``cyclic_poisson(..., max_participations=k, num_rounds=T)``) a client is eligible in at most
  k of its cycles, so the event is ``amplified_bandmf_event`` over ``min(T, k b)`` iterations
  (``min(ceil(T / b), k)`` participations), and the tree's sensitivity takes k.

All T rounds are composed at once (``SelfComposedDpEvent``), never one ``compose`` per round.

References:
  McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
  ICLR 2018. Mironov, "Rényi Differential Privacy", CSF 2017. Abadi et al., "Deep Learning with
  Differential Privacy", CCS 2016 (moments accountant).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_sim.data.sampling import CyclicPoissonSampler, PoissonSampler, UniformSampler

ACCOUNTANTS = ("rdp", "pld")


def _dpa():
  try:
    import dp_accounting
  except ImportError as e:  # pragma: no cover - it is a dependency
    raise ImportError("privacy accounting needs the dp-accounting package: pip install "
                      "dp-accounting") from e
  return dp_accounting


def _check(noise_multiplier=None, num_rounds=None, delta=None, accountant=None) -> None:
  if noise_multiplier is not None and not (
      np.isfinite(noise_multiplier) and noise_multiplier > 0
  ):
    raise ValueError(
        f"noise_multiplier must be > 0 for a finite ε; got {noise_multiplier!r} (z = 0 is not "
        "private)."
    )
  if num_rounds is not None and (
      not isinstance(num_rounds, (int, np.integer)) or isinstance(num_rounds, bool)
      or num_rounds < 0
  ):
    raise ValueError(f"num_rounds must be an int >= 0; got {num_rounds!r}.")
  if delta is not None and (isinstance(delta, (str, bytes, bool))
                            or not isinstance(delta, (int, float, np.integer, np.floating))):
    raise TypeError(f"delta must be a number in (0, 1); got {type(delta).__name__} {delta!r} "
                    "(a string from a config? convert it with float()).")
  if delta is not None and not 0 < delta < 1:
    raise ValueError(f"delta must lie in (0, 1); got {delta!r}. A common choice is 1/N^1.1.")
  if accountant is not None and accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}.")


def _check_sampler(sampler: Any, num_clients: int) -> None:
  if isinstance(sampler, UniformSampler):
    if sampler.weights is not None:
      raise ValueError(
          "cannot account a UniformSampler with non-uniform weights: weighted sampling without "
          "replacement has no DP event in dp-accounting. Use uniform weights or Poisson sampling."
      )
    if sampler.cohort_size > num_clients:
      raise ValueError(
          f"cohort_size={sampler.cohort_size} exceeds num_clients={num_clients}."
      )
  elif isinstance(sampler, PoissonSampler):
    if sampler.availability is not None:
      raise ValueError(
          "cannot account a PoissonSampler with per-client availability: clients then join with "
          "different probabilities, and the accountant needs one q. Use availability=None."
      )
  elif not isinstance(sampler, CyclicPoissonSampler):
    raise TypeError(
        f"cannot account sampler {sampler!r}: pass fs.sampling.poisson(...), "
        "fs.sampling.uniform(K) or fs.sampling.cyclic_poisson(q, b, ...)."
    )
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive int; got {num_clients!r}.")


def _check_schedule_rounds(sampler: Any, num_rounds: int) -> None:
  """Refuses to account a capped schedule past the rounds it covers (its windows wrap)."""
  cover = getattr(sampler, "num_rounds", None)
  if cover is not None and num_rounds > cover:
    raise ValueError(
        f"num_rounds={num_rounds} exceeds the sampler's num_rounds={cover}: the cap "
        f"max_participations={sampler.max_participations} holds only over those rounds. Build "
        f"the sampler with num_rounds >= {num_rounds}.")


def _check_mechanism(sampler: Any, num_bands: int) -> None:
  """Refuses a (mechanism, schedule) pair without a valid accountant."""
  if isinstance(num_bands, bool) or not isinstance(num_bands, (int, np.integer)) or num_bands < 1:
    raise ValueError(f"num_bands must be an int >= 1; got {num_bands!r}.")
  if num_bands == 1:
    return
  if not isinstance(sampler, CyclicPoissonSampler):
    raise ValueError(
        f"no valid accountant for a correlated-noise mechanism with num_bands={num_bands} under "
        f"{type(sampler).__name__}: its sensitivity needs each client to participate at most once "
        f"in any {num_bands} consecutive rounds. Use sampler=fs.sampling.cyclic_poisson(q, "
        f"cycle_length={num_bands}, ...) (min-separation b), or bands=1 (dp_mean).")
  if sampler.cycle_length < num_bands:
    raise ValueError(
        f"no valid accountant: the mechanism has num_bands={num_bands} but the sampler's "
        f"cycle_length={sampler.cycle_length} (min-separation) is smaller; a client's "
        "participations would share bands. Use cycle_length >= num_bands.")


def tree_sensitivity(strategy_gram: Any, sampler: Any, num_rounds: int) -> float:
  """L2 sensitivity (in units of the clip) of a whole run of a strategy given by its ``CᵀC``.

  jax_privacy's ``get_min_sep_sensitivity_upper_bound_for_X`` (Choquette-Choo et al. 2023,
  Algorithm 4) under the sampler's participation schema: min-separation ``cycle_length`` and
  ``min(ceil(T / b), k)`` participations for a cyclic sampler (k: its ``max_participations``, if
  set), any rounds (min-separation 1, up to T) otherwise; doubled for fixed-size cohorts
  (replace-one adjacency).

  Returns:
    Δ, the sensitivity of the whole run's release in units of the clip.
  """
  from jax_privacy.matrix_factorization import sensitivity

  if isinstance(sampler, CyclicPoissonSampler):
    _check_schedule_rounds(sampler, num_rounds)
    sep, k = int(sampler.cycle_length), sampler.participation_bound(num_rounds)
  else:
    sep, k = 1, int(num_rounds)
  x = np.asarray(strategy_gram(int(num_rounds)), np.float64)
  d = float(sensitivity.get_min_sep_sensitivity_upper_bound_for_X(
      x, min_sep=sep, max_participations=k))
  return 2 * d if isinstance(sampler, UniformSampler) else d


def _tree_epsilon(sampler, noise_multiplier, num_rounds, delta, accountant, strategy_gram):
  dpa = _dpa()
  d = tree_sensitivity(strategy_gram, sampler, num_rounds)
  rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
  acc = _accountant(accountant, rel)
  acc.compose(dpa.GaussianDpEvent(float(noise_multiplier) / d))
  return float(acc.get_epsilon(delta))


def _compositions(sampler: Any, num_rounds: int) -> int:
  """How many sampled-Gaussian events T rounds compose (``min(ceil(T / b), k)`` for a cyclic
  sampler)."""
  if isinstance(sampler, CyclicPoissonSampler):
    return sampler.participation_bound(num_rounds)
  return int(num_rounds)


def truncation_probability(sampler: PoissonSampler, num_clients: int) -> float:
  """P[Binomial(N, q) > max_cohort_size]: the chance a round's Poisson cohort is truncated.

  For a :class:`CyclicPoissonSampler` a client joins a round with probability ``q / b`` over
  the random bins and the sampling (``q k / (b E)`` with the cap's random windows), so the count
  is Binomial(N, q / b) (Binomial(N, q k / (b E))).
  """
  if isinstance(sampler, CyclicPoissonSampler):
    from scipy import stats

    if sampler.max_cohort_size >= num_clients:
      return 0.0
    return float(stats.binom.sf(sampler.max_cohort_size, num_clients,
                                sampler.q / sampler.cycle_length * sampler.eligible_share()))
  from scipy import stats

  if sampler.max_cohort_size >= num_clients:
    return 0.0
  return float(stats.binom.sf(sampler.max_cohort_size, num_clients, sampler.q))


def dp_event(
    sampler: Any, num_clients: int, noise_multiplier: float, num_rounds: int = 1,
    *, accountant: str = "rdp",
):
  """The ``dp_accounting.DpEvent`` of ``num_rounds`` rounds of DP-FedAvg with this sampler.

  Args:
    sampler: the sampler the simulation runs.
    num_clients: population size N.
    noise_multiplier: z; the noise std on the sum of updates clipped to S is z·S.
    num_rounds: T.
    accountant: ``"rdp"`` or ``"pld"`` (only changes the truncated-Poisson event).

  Returns:
    ``(event, neighboring_relation)``.
  """
  dpa = _dpa()
  _check(noise_multiplier, num_rounds, None, accountant)
  _check_sampler(sampler, num_clients)
  rel = dpa.NeighboringRelation
  if isinstance(sampler, CyclicPoissonSampler):
    from jax_privacy.experimental import accounting as jpa

    _check_schedule_rounds(sampler, num_rounds)
    iterations = int(num_rounds)
    if sampler.max_participations is not None:  # a client's window: at most k of its cycles
      iterations = min(iterations, int(sampler.max_participations) * int(sampler.cycle_length))
    event = jpa.amplified_bandmf_event(
        float(noise_multiplier), iterations, num_bands=int(sampler.cycle_length),
        sampling_prob=float(sampler.q))
    return event, rel.ADD_OR_REMOVE_ONE
  if isinstance(sampler, UniformSampler):
    one = dpa.SampledWithoutReplacementDpEvent(
        source_dataset_size=int(num_clients), sample_size=int(sampler.cohort_size),
        event=dpa.GaussianDpEvent(noise_multiplier / 2.0),  # replace-one: sensitivity 2S
    )
    relation = rel.REPLACE_ONE
  else:
    truncated = sampler.max_cohort_size < num_clients
    if truncated and accountant == "pld":
      one = dpa.TruncatedSubsampledGaussianDpEvent(
          dataset_size=int(num_clients), sampling_probability=float(sampler.q),
          truncated_batch_size=int(sampler.max_cohort_size),
          noise_multiplier=float(noise_multiplier),
      )
    else:
      one = dpa.PoissonSampledDpEvent(float(sampler.q), dpa.GaussianDpEvent(noise_multiplier))
    relation = rel.ADD_OR_REMOVE_ONE
  return dpa.SelfComposedDpEvent(one, int(num_rounds)), relation


def _accountant(kind: str, relation):
  dpa = _dpa()
  if kind == "rdp":
    return dpa.rdp.RdpAccountant(neighboring_relation=relation)
  return dpa.pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-3)


def epsilon(
    sampler: Any,
    num_clients: int,
    noise_multiplier: float,
    num_rounds: int,
    delta: float,
    *,
    accountant: str = "rdp",
    num_bands: int = 1,
    strategy_gram: Any = None,
) -> float:
  """User-level ε after ``num_rounds`` rounds of DP-FedAvg (or BandMF) with ``sampler``.

  ``num_bands``: the mechanism's bands (``Process.num_bands``; 1 for independent noise). A
  mechanism with more than one band is accounted only under a
  :class:`~fedjax_sim.sampling.CyclicPoissonSampler` whose ``cycle_length >= num_bands``.
  ``strategy_gram`` (``Process.strategy_gram``, tree aggregation): the run is accounted as one
  Gaussian mechanism with the sensitivity of :func:`tree_sensitivity`, without amplification.

  Examples:
    >>> import fedjax_sim as fs
    >>> eps = fs.privacy.epsilon(fs.sampling.poisson(0.01, max_cohort_size=10_000), 10_000,
    ...                          noise_multiplier=1.0, num_rounds=1000, delta=1e-5)
    >>> round(eps, 2)
    2.1
  """
  _check(noise_multiplier, num_rounds, delta, accountant)
  _check_sampler(sampler, num_clients)
  _check_schedule_rounds(sampler, num_rounds)
  _check_mechanism(sampler, num_bands)
  if strategy_gram is not None:
    return 0.0 if num_rounds == 0 else _tree_epsilon(
        sampler, noise_multiplier, num_rounds, delta, accountant, strategy_gram)
  if isinstance(sampler, UniformSampler) and accountant == "pld":
    raise ValueError(
        "the PLD accountant (dp-accounting 0.6) has no event for fixed-size sampling without "
        "replacement; use accountant='rdp', or Poisson sampling."
    )
  if num_rounds == 0:
    return 0.0
  event, relation = dp_event(sampler, num_clients, noise_multiplier, num_rounds,
                             accountant=accountant)
  if (isinstance(sampler, CyclicPoissonSampler) and accountant == "pld"
      and truncation_probability(sampler, num_clients) > 0):
    raise ValueError(
        f"cyclic_poisson with max_cohort_size={sampler.max_cohort_size} < num_clients can "
        "truncate a round; the PLD accountant has no truncated cyclic event here. Use "
        "accountant='rdp' (bounds truncation explicitly) or max_cohort_size=num_clients.")
  p_trunc = (
      truncation_probability(sampler, num_clients)
      if isinstance(sampler, (PoissonSampler, CyclicPoissonSampler)) and accountant == "rdp"
      else 0.0
  )
  acc = _accountant(accountant, relation)
  acc.compose(event)
  if p_trunc == 0.0:
    return float(acc.get_epsilon(delta))
  eps = float(acc.get_epsilon(delta / 2))
  slack = (1.0 + math.exp(min(eps, 700.0))) * num_rounds * p_trunc
  if slack > delta / 2 and isinstance(sampler, CyclicPoissonSampler):
    raise ValueError(
        f"truncated cyclic Poisson sampling: max_cohort_size={sampler.max_cohort_size} is "
        f"truncated with probability {p_trunc:.3g} per round, too often to bound within "
        f"delta={delta} under RDP. Raise max_cohort_size to at least "
        f"{_cap_needed(sampler, num_clients, num_rounds, delta, eps)}.")
  if slack > delta / 2:
    raise ValueError(
        f"truncated Poisson sampling: max_cohort_size={sampler.max_cohort_size} is truncated "
        f"with probability {p_trunc:.3g} per round, too often to bound within delta={delta} "
        f"under RDP. Raise max_cohort_size to at least "
        f"{_cap_needed(sampler, num_clients, num_rounds, delta, eps)} or use accountant='pld' "
        "(exact truncated event; Simulation.run(..., accountant='pld'))."
    )
  return eps


def _cap_needed(sampler, n, t, delta, eps) -> int:
  from scipy import stats

  target = delta / 2 / ((1.0 + math.exp(min(eps, 700.0))) * t)
  # A cap of N never truncates (a cohort has at most N clients): always achievable.
  q = (sampler.q / sampler.cycle_length * sampler.eligible_share()
       if isinstance(sampler, CyclicPoissonSampler) else sampler.q)
  return min(int(stats.binom.isf(target, n, q)) + 1, n)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    num_rounds: int,
    sampler: Any,
    num_clients: int,
    *,
    accountant: str = "rdp",
    num_bands: int = 1,
    strategy_gram: Any = None,
) -> float:
  """The smallest noise multiplier z whose ``num_rounds``-round ε is at most ``target_epsilon``.

  The search composes the whole T-round event for every candidate z (never one round).
  ``strategy_gram`` (tree aggregation, ``dp_ftrl_mean(...).strategy_gram``): z of the one
  Gaussian mechanism :func:`epsilon` accounts for it.

  Examples:
    >>> import fedjax_sim as fs
    >>> z = fs.privacy.calibrate_noise_multiplier(
    ...     2.0, 1e-5, 1000, fs.sampling.poisson(0.01, max_cohort_size=10_000), 10_000)
    >>> round(z, 2)
    1.02
  """
  if not (np.isfinite(target_epsilon) and target_epsilon > 0):
    raise ValueError(f"target_epsilon must be > 0; got {target_epsilon!r}.")
  _check(None, num_rounds, delta, accountant)
  _check_sampler(sampler, num_clients)
  _check_schedule_rounds(sampler, num_rounds)
  _check_mechanism(sampler, num_bands)
  if num_rounds < 1:
    raise ValueError("num_rounds must be >= 1 to calibrate.")
  from scipy import optimize

  if accountant == "pld" and strategy_gram is None:
    return _calibrate_pld(target_epsilon, delta, num_rounds, sampler, num_clients)

  def excess(log_z: float) -> float:
    return epsilon(sampler, num_clients, float(np.exp(log_z)), num_rounds, delta,
                   accountant=accountant, num_bands=num_bands,
                   strategy_gram=strategy_gram) - target_epsilon

  lo, hi = np.log(1e-2), np.log(1.0)
  while excess(hi) > 0:
    lo, hi = hi, hi + np.log(4.0)
    if hi > np.log(1e4):
      raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon={target_epsilon}.")
  if excess(lo) <= 0:
    return float(np.exp(lo))
  log_z = optimize.brentq(excess, lo, hi, xtol=1e-6)
  return float(np.exp(log_z)) * (1 + 1e-6)  # on the safe side of the root


#: PLD calibration: relative tolerance on z, and the step of the downward bracket search.
PLD_Z_RTOL = 1e-3
_PLD_STEP = 0.85


def _calibrate_pld(target_epsilon, delta, num_rounds, sampler, num_clients) -> float:
  """PLD calibration, bracketed from above by RDP so that PLD is never evaluated at a tiny z.

  One PLD evaluation costs more the smaller z is (z = 0.01 takes minutes and gigabytes), so
  the search starts at the RDP-calibrated z of the untruncated Poisson event, an upper bound
  (RDP over-estimates ε, and PLD is checked there), and steps down by a factor 0.85 until the
  target is missed; Brent's method then runs on that bracket to a relative tolerance of
  ``PLD_Z_RTOL``. About 5-10 PLD evaluations in all, each at z near the answer.
  """
  from scipy import optimize

  n = int(num_clients)
  if isinstance(sampler, UniformSampler):
    untruncated = sampler
  elif isinstance(sampler, CyclicPoissonSampler):
    untruncated = dataclasses.replace(sampler, max_cohort_size=n)
  else:
    untruncated = PoissonSampler(sampler.q, n)
  hi = calibrate_noise_multiplier(target_epsilon, delta, num_rounds, untruncated, n,
                                  accountant="rdp")

  def excess(log_z: float) -> float:
    return epsilon(sampler, n, float(np.exp(log_z)), num_rounds, delta,
                   accountant="pld") - target_epsilon

  log_hi = float(np.log(hi))
  while excess(log_hi) > 0:  # not expected (RDP bounds PLD), but never return a z that misses
    log_hi += np.log(1.25)
  log_lo = log_hi + np.log(_PLD_STEP)
  while excess(log_lo) <= 0:
    log_hi, log_lo = log_lo, log_lo + np.log(_PLD_STEP)
    if log_lo < np.log(1e-2):
      return float(np.exp(log_hi))
  tol = np.log1p(PLD_Z_RTOL)
  log_z = optimize.brentq(excess, log_lo, log_hi, xtol=tol)
  return float(np.exp(min(log_z + tol, log_hi)))  # on the safe side of the root


def epsilon_per_round(
    sampler: Any, num_clients: int, noise_multiplier: float, num_rounds: int, delta: float
) -> np.ndarray:
  """ε after each of rounds ``1..num_rounds`` (RDP), from one RDP vector: cheap for every round.

  The per-round RDP vector is computed once and scaled by t (RDP composes additively).
  """
  dpa = _dpa()
  _check(noise_multiplier, num_rounds, delta, None)
  _check_schedule_rounds(sampler, num_rounds)
  event, relation = dp_event(sampler, num_clients, noise_multiplier, 1)
  acc = _accountant("rdp", relation)
  acc.compose(event)
  rdp, orders = np.asarray(acc.rdp), np.asarray(acc.orders)
  compute = dpa.rdp.rdp_privacy_accountant.compute_epsilon
  out = np.empty(num_rounds)
  for t in range(1, num_rounds + 1):
    out[t - 1] = compute(orders, rdp * _compositions(sampler, t), delta)[0]
  return out


def epsilon_column(sampler: Any, num_clients: int, noise_multiplier: float | None,
                   system: Any, start: int, num_rounds: int, delta: float,
                   accountant: str = "rdp", *, num_bands: int = 1, strategy_gram=None):
  """The ε column of a run: ``column(lo, hi)`` gives ε after rounds ``start+lo+1 .. start+hi``.

  This is what :meth:`fedjax_sim.Simulation.run` reports as ``metrics["epsilon"]`` with
  ``delta=``: every round's ε under RDP for plain sampling (one RDP vector, scaled), ε at block
  ends only (NaN between) for truncated Poisson sampling or ``accountant="pld"``, and ``inf``
  without noise. Every argument is checked here, before the run's first round.

  Args:
    sampler: the simulation's sampler.
    num_clients: the population size N.
    noise_multiplier: the aggregator's z (``Process.noise_multiplier``); None is refused.
    system: the simulation's ``SystemModel`` or None. Availability models are refused: they
      raise an available client's chance of selection above what the sampler alone gives.
    start: rounds done before the run.
    num_rounds: the run's rounds.
    delta: the δ of the reported ε.
    accountant: ``"rdp"`` or ``"pld"``.

  Returns:
    ``column(lo, hi) -> np.ndarray[hi - lo]``.

  Examples:
    >>> import fedjax_sim as fs
    >>> col = fs.privacy.epsilon_column(fs.sampling.poisson(0.01, 10_000), 10_000, 1.0, None, 0,
    ...                                 100, 1e-5)
    >>> eps = col(0, 100); bool(eps[0] < eps[-1]) and eps.shape == (100,)
    True
  """
  _check(delta=delta)
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be 'rdp' or 'pld'; got {accountant!r}.")
  z = noise_multiplier
  if z is None:
    raise ValueError(
        "delta is set but the aggregator is not central DP (no noise_multiplier); use "
        "fs.aggregators.dp_mean / adaptive_dp_mean, or drop delta."
    )
  if system is not None and (system.availability is not None or system.trace is not None
                             or system.diurnal_period is not None):
    raise ValueError(
        "cannot report epsilon: the SystemModel restricts availability, so each available "
        "client's chance of selection exceeds what the sampler alone gives and the accountant "
        "would under-report epsilon. Drop delta (or the availability model); dropout, "
        "stragglers and deadlines alone keep the accounting valid (conservative)."
    )
  _check_mechanism(sampler, num_bands)
  if num_bands > start + num_rounds:
    raise ValueError(f"num_bands={num_bands} (the mechanism's bands b) is larger than the number "
                     f"of rounds ({start + num_rounds}); use bands <= num_rounds.")
  if z == 0:
    return lambda lo, hi: np.full(hi - lo, np.inf)
  truncated = (isinstance(sampler, (PoissonSampler, CyclicPoissonSampler))
               and sampler.max_cohort_size < num_clients)
  if strategy_gram is not None:  # one Gaussian release over the run: ε at block ends
    def tree_ends(lo, hi):
      col = np.full(hi - lo, np.nan)
      col[-1] = epsilon(sampler, num_clients, z, start + hi, delta, accountant=accountant,
                        strategy_gram=strategy_gram)
      return col
    return tree_ends
  if truncated or accountant != "rdp":  # the full epsilon() (block ends only)
    def at_ends(lo, hi):
      col = np.full(hi - lo, np.nan)
      col[-1] = epsilon(sampler, num_clients, z, start + hi, delta, accountant=accountant,
                        num_bands=num_bands)
      return col
    # Fail early if unbounded (the message names the cap, or accountant="pld").
    epsilon(sampler, num_clients, z, start + num_rounds, delta, accountant=accountant,
            num_bands=num_bands)
    return at_ends
  table = epsilon_per_round(sampler, num_clients, z, start + num_rounds, delta)
  return lambda lo, hi: table[start + lo : start + hi]


def epsilon_moments_accountant(
    q: float, noise_multiplier: float, num_steps: int, delta: float,
    orders: Sequence[float] = tuple(range(2, 33)),
) -> float:
  """ε with the classic moments-accountant conversion (Abadi et al. 2016), for old papers.

  ``min_α T·RDP_α(q, z) + log(1/δ)/(α − 1)`` over ``orders`` (integer 2..32 by default). This is
  looser than :func:`epsilon`, which uses dp-accounting's improved conversion.

  Examples:
    >>> round(epsilon_moments_accountant(0.01, 4.0, 10_000, 1e-5), 2)   # Abadi et al.: 1.26
    1.26
  """
  dpa = _dpa()
  _check(noise_multiplier, num_steps, delta, None)
  acc = dpa.rdp.RdpAccountant(orders=list(orders))
  acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(noise_multiplier)), num_steps)
  o, r = np.asarray(acc.orders, float), np.asarray(acc.rdp, float)
  return float(np.min(r + np.log(1.0 / delta) / (o - 1.0)))


def local_epsilon(noise_multiplier: float, num_participations: int, delta: float) -> float:
  """ε of local DP for one client that released ``num_participations`` noised updates.

  Each release is its update clipped to S plus N(0, (zS)^2): a Gaussian mechanism whose
  sensitivity over any two inputs of the client is 2S, i.e. noise multiplier z/2, composed over
  the client's participations (no amplification by sampling is claimed).
  """
  dpa = _dpa()
  _check(noise_multiplier, num_participations, delta, None)
  if num_participations == 0:
    return 0.0
  acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
  acc.compose(dpa.GaussianDpEvent(noise_multiplier / 2.0), int(num_participations))
  return float(acc.get_epsilon(delta))


SKELLAM_ORDERS = tuple(range(2, 129)) + (256,)


def skellam_rdp(order: float, l2_sensitivity: float, l1_sensitivity: float,
                central_variance: float) -> float:
  """RDP of the Skellam mechanism at integer ``order`` (Agarwal, Kairouz, Liu, NeurIPS 2021,
  Thm. 3.5), all quantities in the integer domain: ``a D2^2 / (2 mu) + min(((2a - 1) D2^2 +
  6 D1) / (4 mu^2), 3 D1 / (2 mu))``; mu is the variance of the summed noise per coordinate."""
  a, d2, d1, mu = float(order), l2_sensitivity, l1_sensitivity, central_variance
  return a * d2**2 / (2 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2),
                                    3 * d1 / (2 * mu))


def skellam_epsilon(
    clip: float, noise_multiplier: float, bits: int, num_params: int, expected_clients: float,
    num_rounds: int, delta: float, *, k_stddevs: float | None = None,
    modclip_prob: float = 1e-4,
) -> float:
  """ε after ``num_rounds`` of :func:`fedjax_sim.aggregators.distributed_dp_mean`.

  The mechanism is calibrated exactly as the aggregator does (:func:`skellam_params`, including
  the sensitivity inflation of randomized rounding ``D2 = c scale + sqrt(d')`` and
  ``D1 = ceil(D2 min(sqrt(d'), D2))``), composed over rounds in RDP (orders 2..128 and 256) and
  converted with dp-accounting's conversion. Add-or-remove-one-client adjacency when all
  ``expected_clients`` take part. Amplification by sampling is NOT claimed (the bound holds for
  any cohort selection, and is conservative for sampled cohorts); clients that drop out shrink
  the noise, which this bound does not cover.

  Examples:
    >>> import fedjax_sim as fs
    >>> eps = fs.privacy.skellam_epsilon(1.0, 1.0, 16, 10_000, 100, 10, 1e-5)
    >>> gauss = fs.privacy.gaussian_epsilon(1.0, 10, 1e-5)
    >>> 1.0 <= eps / gauss < 1.05
    True
  """
  from fedjax_sim.aggregators import skellam_params

  _check(noise_multiplier, num_rounds, delta, None)
  p = skellam_params(clip, noise_multiplier, bits, num_params, expected_clients, k_stddevs,
                     modclip_prob)
  rdp = np.array([skellam_rdp(a, p.l2_sensitivity, p.l1_sensitivity, p.central_variance)
                  for a in SKELLAM_ORDERS]) * num_rounds
  compute = _dpa().rdp.rdp_privacy_accountant.compute_epsilon
  return float(compute(np.array(SKELLAM_ORDERS, float), rdp, delta)[0])


def gaussian_epsilon(noise_multiplier: float, num_rounds: int, delta: float) -> float:
  """ε of ``num_rounds`` unsampled Gaussian mechanisms of noise multiplier z (add/remove one;
  the central-DP counterpart of :func:`skellam_epsilon`, without amplification by sampling)."""
  dpa = _dpa()
  _check(noise_multiplier, num_rounds, delta, None)
  acc = dpa.rdp.RdpAccountant(orders=list(SKELLAM_ORDERS))
  acc.compose(dpa.GaussianDpEvent(noise_multiplier), int(num_rounds))
  return float(acc.get_epsilon(delta))
