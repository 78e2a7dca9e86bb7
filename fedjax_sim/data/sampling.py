"""In-jit cohort samplers with static shapes.

Every sampler returns a :class:`Cohort` of static size ``max_cohort_size``: client ids, a mask of
real slots, and a count of clients dropped by truncation. Samplers are small frozen dataclasses so
that the privacy accountant can read exactly which sampling ran.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v


class Cohort(NamedTuple):
  """A sampled cohort.

  Attributes:
    ids: int32 ``[K]`` client indices; padded slots hold 0 and are masked out.
    mask: bool ``[K]``, True for a real (sampled) client.
    truncated: int32 scalar: clients that were drawn but did not fit in ``K`` (Poisson only).
    schedule_violations: for participation schedules (:class:`CyclicPoissonSampler`), int32
      count of cohort clients that the schedule did not allow this round, re-checked from the
      bins (0 by construction; reported as ``metrics["schedule_violations"]``); None otherwise.
  """

  ids: jax.Array
  mask: jax.Array
  truncated: jax.Array
  schedule_violations: jax.Array | None = None


def _top_k_ids(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the k largest scores (ties broken by index) and the scores themselves."""
  values, ids = jax.lax.top_k(scores, k)
  return ids.astype(jnp.int32), values


def _pick_joined(joined, order_key, max_cohort_size: int):
  """``(ids, mask, truncated)``: up to ``max_cohort_size`` of the ``joined`` clients in uniformly
  random order (scores in (0, 1) for joined clients, -1 for the rest), padded to the static size
  when there are fewer clients than that; ``truncated`` counts joined clients left out."""
  num_clients = joined.shape[0]
  k = min(max_cohort_size, num_clients)
  scores = jnp.where(joined, jax.random.uniform(order_key, (num_clients,)), -1.0)
  ids, values = _top_k_ids(scores, k)
  mask = values >= 0
  ids = jnp.where(mask, ids, 0)
  if k < max_cohort_size:  # N < K_max: pad to the static size.
    pad = max_cohort_size - k
    ids = jnp.concatenate([ids, jnp.zeros((pad,), jnp.int32)])
    mask = jnp.concatenate([mask, jnp.zeros((pad,), bool)])
  return ids, mask, jnp.maximum(joined.sum() - k, 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class UniformSampler:
  """Fixed-size cohorts: ``cohort_size`` distinct clients drawn uniformly without replacement.

  With ``weights``, clients are drawn without replacement with probability proportional to their
  weight (successive sampling, via the Gumbel-top-k trick); a weight of 0 marks an unavailable
  client. If fewer than ``cohort_size`` clients are available, the rest of the slots are masked.

  Args:
    cohort_size: K, the static number of clients per round.
    weights: optional non-negative ``[num_clients]`` sampling weights / availability.

  Examples:
    >>> import jax, fedjax_sim as fs
    >>> cohort = fs.sampling.UniformSampler(3).sample(jax.random.key(0), num_clients=10)
    >>> cohort.ids.shape, bool(cohort.mask.all())
    ((3,), True)
  """

  cohort_size: int
  weights: tuple[float, ...] | None = None

  def __post_init__(self):
    _v.positive_int("cohort_size", self.cohort_size)
    if self.weights is not None:
      w = _v.per_client("weights", self.weights)
      object.__setattr__(self, "weights", tuple(float(v) for v in w))
      if not any(v > 0 for v in self.weights):
        raise ValueError("weights are all zero: no client can be sampled.")

  @property
  def max_cohort_size(self) -> int:
    return int(self.cohort_size)

  def expected_cohort_size(self, num_clients: int) -> float:
    del num_clients
    return float(self.cohort_size)

  def validate(self, num_clients: int) -> None:
    if self.cohort_size > num_clients:
      raise ValueError(
          f"cohort_size={self.cohort_size} exceeds the number of clients ({num_clients}); a "
          "fixed-size sampler draws without replacement. Lower cohort_size or use Poisson sampling."
      )
    if self.weights is not None and len(self.weights) != num_clients:
      raise ValueError(
          f"weights has {len(self.weights)} entries but the population has {num_clients} clients."
      )

  def sample(self, key: jax.Array, num_clients: int, available: jax.Array | None = None
             ) -> Cohort:
    """Draws the cohort; ``available`` (bool ``[N]``) restricts it to available clients."""
    k = self.cohort_size
    scores = jax.random.gumbel(key, (num_clients,))
    if self.weights is not None:
      scores = scores + jnp.log(jnp.asarray(self.weights, jnp.float32))
    if available is not None:
      scores = jnp.where(available, scores, -jnp.inf)
    ids, values = _top_k_ids(scores, k)
    if self.weights is None and available is None:
      mask = jnp.ones((k,), bool)
    else:
      mask = jnp.isfinite(values)
      ids = jnp.where(mask, ids, 0)
    return Cohort(ids, mask, jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling: each client joins the round independently with probability ``q``.

  The cohort size is then ``Binomial(N, q)``. To keep shapes static the cohort is padded to
  ``max_cohort_size`` with a client mask; if a draw exceeds it, a uniformly random subset of
  ``max_cohort_size`` is kept and the excess is reported as ``truncated`` (accounting must then
  treat the sampling as truncated). With ``availability`` (per-client probabilities in [0, 1]),
  client i joins with probability ``q * availability[i]``.

  Args:
    q: sampling probability in (0, 1].
    max_cohort_size: static cap K_max. Choose it well above ``q * N`` (e.g. ``qN + 4 sqrt(qN)``)
      so truncation is rare.
    availability: optional per-client availability probabilities.

  Examples:
    >>> import jax, fedjax_sim as fs
    >>> cohort = fs.sampling.PoissonSampler(q=0.1, max_cohort_size=40).sample(
    ...     jax.random.key(0), num_clients=200)
    >>> cohort.ids.shape
    (40,)
  """

  q: float
  max_cohort_size: int
  availability: tuple[float, ...] | None = None

  def __post_init__(self):
    if _v.probability("q", self.q) == 0:
      raise ValueError(f"q must be a probability in (0, 1]; got {self.q!r}.")
    _v.positive_int("max_cohort_size", self.max_cohort_size)
    if self.availability is not None:
      a = _v.per_client("availability", self.availability, max_value=1.0)
      object.__setattr__(self, "availability", tuple(float(v) for v in a))

  def expected_cohort_size(self, num_clients: int) -> float:
    if self.availability is None:
      return float(self.q) * num_clients
    return float(self.q) * float(sum(self.availability))

  def validate(self, num_clients: int) -> None:
    """Checks the sampler against the population; refuses (or warns about) a cap that truncates.

    A cap below the expected cohort ``q * N`` truncates most rounds and is refused; a cap that
    truncates more than 1% of rounds gets a warning. Both messages give the numbers.
    """
    if self.availability is not None and len(self.availability) != num_clients:
      raise ValueError(
          f"availability has {len(self.availability)} entries but the population has "
          f"{num_clients} clients."
      )
    k = int(self.max_cohort_size)
    if k >= num_clients:
      return
    mean = self.expected_cohort_size(num_clients)
    p = (np.full(num_clients, float(self.q)) if self.availability is None
         else float(self.q) * np.asarray(self.availability))
    sd = float(np.sqrt(np.sum(p * (1 - p))))
    if self.availability is None:
      from scipy import stats

      p_trunc = float(stats.binom.sf(k, num_clients, float(self.q)))
    else:  # a sum of Bernoullis with unequal rates: the normal approximation
      p_trunc = 0.5 * math.erfc((k + 0.5 - mean) / (max(sd, 1e-12) * math.sqrt(2)))
    roomy = min(num_clients, math.ceil(mean + 4 * sd))
    numbers = (f"max_cohort_size={k} with q={self.q} on {num_clients} clients (expected "
               f"cohort {mean:.1f} +- {sd:.1f}) truncates about {100 * p_trunc:.0f}% of rounds")
    if k < mean:
      raise ValueError(
          f"{numbers}, dropping sampled clients silently. Use max_cohort_size >= {roomy} "
          "(q*N + 4 sd), or a smaller q."
      )
    if p_trunc > 0.01:
      warnings.warn(
          f"{numbers} (those rounds drop sampled clients; metrics['truncated'] counts them). "
          f"max_cohort_size >= {roomy} (q*N + 4 sd) makes truncation rare.",
          UserWarning, stacklevel=3,
      )

  def sample(self, key: jax.Array, num_clients: int, available: jax.Array | None = None
             ) -> Cohort:
    """Draws the cohort; ``available`` (bool ``[N]``) restricts it to available clients."""
    join_key, order_key = jax.random.split(key)
    p = jnp.float32(self.q)
    if self.availability is not None:
      p = p * jnp.asarray(self.availability, jnp.float32)
    joined = jax.random.uniform(join_key, (num_clients,)) < p
    if available is not None:
      joined = joined & available
    return Cohort(*_pick_joined(joined, order_key, self.max_cohort_size))


def uniform(cohort_size: int, weights=None) -> UniformSampler:
  """Fixed-size uniform sampling without replacement (see :class:`UniformSampler`).

  Returns:
    a :class:`UniformSampler` (``Simulation(..., sampler=...)``).
  """
  return UniformSampler(cohort_size, weights)


def poisson(q: float, max_cohort_size: int, availability=None) -> PoissonSampler:
  """Poisson sampling with rate ``q``, padded to ``max_cohort_size`` (:class:`PoissonSampler`).

  Returns:
    a :class:`PoissonSampler` (``Simulation(..., sampler=...)``).
  """
  return PoissonSampler(q, max_cohort_size, availability)


@dataclasses.dataclass(frozen=True)
class CyclicPoissonSampler:
  """A participation schedule with min-separation ``cycle_length``: cyclic Poisson sampling.

  Each client is assigned once per run to one of ``cycle_length`` bins, uniformly and
  independently (balls in bins, drawn from ``fold_in(run_key, PARTITION_SALT)``). In round ``t``
  only the clients of bin ``t mod cycle_length`` may participate, each independently with
  probability ``q``. So by construction a client participates at most once in any
  ``cycle_length`` consecutive rounds (min-separation b) and at most ``ceil(T / b)`` times in T
  rounds. ``q = 1`` is jax_privacy's ``BallsInBinsSampling`` (every client of the bin); ``q < 1``
  is its ``CyclicPoissonSampling`` with ``PartitionType.INDEPENDENT`` (the partition that is
  valid under add/remove-one adjacency). ``cycle_length = 1`` is plain Poisson sampling.

  Accounted (``fs.privacy``) by jax_privacy's ``amplified_bandmf_event`` (Choquette-Choo et al.
  2023): valid for a correlated-noise mechanism with at most ``cycle_length`` bands
  (``fs.aggregators.band_mf_mean``) and for independent noise (``dp_mean``).
  With a system model, an unavailable client does not join (availability composes; ε is then
  not reported, as for every sampler).

  Args:
    q: sampling probability within the round's bin, in (0, 1].
    cycle_length: b >= 1, the min-separation.
    max_cohort_size: static cap K_max (choose it above ``q N / b + 4 sd``).

  References:
    Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu, "(Amplified) Banded Matrix
    Factorization: A unified approach to private training", NeurIPS 2023 (arXiv:2306.08153).

  Examples:
    >>> import jax, fedjax_sim as fs
    >>> s = fs.sampling.cyclic_poisson(q=0.5, cycle_length=4, max_cohort_size=40)
    >>> c = s.sample(jax.random.key(0), 200, round_=0, partition_key=jax.random.key(1))
    >>> c.ids.shape
    (40,)
  """

  q: float
  cycle_length: int
  max_cohort_size: int

  needs_round = True

  def __post_init__(self):
    if _v.probability("q", self.q) == 0:
      raise ValueError(f"q must be a probability in (0, 1]; got {self.q!r}.")
    _v.positive_int("cycle_length", self.cycle_length)
    _v.positive_int("max_cohort_size", self.max_cohort_size)

  def expected_cohort_size(self, num_clients: int) -> float:
    return float(self.q) * num_clients / int(self.cycle_length)

  def validate(self, num_clients: int) -> None:
    """Refuses a schedule the population cannot satisfy, and a cap below the expected cohort.

    Every client is in exactly one of the b bins, so the expected cohort ``q N / b`` times b never
    exceeds N; what the population cannot satisfy is more bins than clients (empty bins).
    """
    b = int(self.cycle_length)
    if b > num_clients:
      raise ValueError(
          f"cycle_length={b} exceeds the number of clients ({num_clients}): some bins are "
          "empty. Lower cycle_length (the min-separation b).")
    mean = self.expected_cohort_size(num_clients)
    if self.max_cohort_size < mean:
      raise ValueError(
          f"max_cohort_size={self.max_cohort_size} is below the expected cohort "
          f"q*N/b = {mean:.1f} (q={self.q}, N={num_clients}, cycle_length={b}): most rounds would "
          "drop sampled clients. Raise max_cohort_size or lower q.")

  def bins(self, partition_key: jax.Array, num_clients: int) -> jax.Array:
    """Every client's bin, fixed for the run.

    Returns:
      int32 ``[N]`` bins in ``[0, cycle_length)``.
    """
    return jax.random.randint(partition_key, (num_clients,), 0, int(self.cycle_length),
                              dtype=jnp.int32)

  def sample(self, key: jax.Array, num_clients: int, available: jax.Array | None = None, *,
             round_=0, partition_key: jax.Array | None = None) -> Cohort:
    """Round ``round_``'s cohort; ``available`` (bool ``[N]``) restricts it.

    Returns:
      a :class:`Cohort` (with ``schedule_violations``).
    """
    if partition_key is None:
      raise ValueError("CyclicPoissonSampler.sample needs partition_key (the run's bin key).")
    join_key, order_key = jax.random.split(key)
    bins = self.bins(partition_key, num_clients)
    this_bin = jnp.asarray(round_, jnp.int32) % int(self.cycle_length)
    eligible = bins == this_bin
    joined = eligible & (jax.random.uniform(join_key, (num_clients,)) < jnp.float32(self.q))
    if available is not None:
      joined = joined & available
    ids, mask, truncated = _pick_joined(joined, order_key, self.max_cohort_size)
    return Cohort(ids, mask, truncated, self.violations(ids, mask, bins, round_))

  def violations(self, ids: jax.Array, mask: jax.Array, bins: jax.Array, round_) -> jax.Array:
    """Cohort clients (``ids`` where ``mask``) whose bin is not round ``round_``'s: what
    ``metrics["schedule_violations"]`` reports (0 for this sampler's own cohorts).

    Returns:
      an int32 count.
    """
    this_bin = jnp.asarray(round_, jnp.int32) % int(self.cycle_length)
    return jnp.sum(mask & (bins[ids] != this_bin)).astype(jnp.int32)


def cyclic_poisson(q: float, cycle_length: int, max_cohort_size: int) -> CyclicPoissonSampler:
  """Cyclic Poisson sampling with min-separation ``cycle_length`` (:class:`CyclicPoissonSampler`).

  Returns:
    a :class:`CyclicPoissonSampler` (``Simulation(..., sampler=...)``).
  """
  return CyclicPoissonSampler(q, cycle_length, max_cohort_size)


def balls_in_bins(cycle_length: int, max_cohort_size: int) -> CyclicPoissonSampler:
  """Balls-in-bins: every client of bin ``t mod b`` participates in round t (q = 1).

  Returns:
    a :class:`CyclicPoissonSampler` with ``q = 1``.
  """
  return CyclicPoissonSampler(1.0, cycle_length, max_cohort_size)
