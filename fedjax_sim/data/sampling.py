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
from fedjax_sim.types import WINDOW_SALT


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


@dataclasses.dataclass(frozen=True, repr=False)
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

  **At most k participations** (``max_participations=k`` with ``num_rounds=T``): the run's
  ``E = ceil(T / b)`` cycles (cycle ``c`` = rounds ``c b .. c b + b − 1``) are a ring, and each
  client is also given, once per run (``fold_in(partition_key, WINDOW_SALT)``), a uniformly random
  window of ``k`` consecutive cycles of that ring; it may participate only in the rounds of its
  bin within its window. So it participates at most k times in the T rounds, by construction and
  without a counter: the schedule stays a pure function of (run key, round), like every sampler,
  and each round's eligible share is exactly ``k / E`` of the bin (expected cohort
  ``q N k / (b E)``). A run may not go past T rounds (the ring would wrap).

  Accounted (``fs.privacy``) by jax_privacy's ``amplified_bandmf_event`` (Choquette-Choo et al.
  2023): valid for a correlated-noise mechanism with at most ``cycle_length`` bands
  (``fs.aggregators.band_mf_mean``) and for independent noise (``dp_mean``); with the cap, over
  ``min(T, k b)`` iterations (``min(ceil(T / b), k)`` Poisson-sampled participations).
  With a system model, an unavailable client does not join (availability composes; ε is then
  not reported, as for every sampler).

  Args:
    q: sampling probability within the round's bin, in (0, 1].
    cycle_length: b >= 1, the min-separation.
    max_cohort_size: static cap K_max (choose it above ``q N / b + 4 sd``).
    max_participations: k >= 1, the most rounds a client may join in ``num_rounds`` rounds
      (None: no cap beyond ``ceil(T / b)``).
    num_rounds: T, the rounds the capped schedule covers (required with ``max_participations``).

  References:
    Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu, "(Amplified) Banded Matrix
    Factorization: A unified approach to private training", NeurIPS 2023 (arXiv:2306.08153).

  Examples:
    >>> import jax, fedjax_sim as fs
    >>> s = fs.sampling.cyclic_poisson(q=0.5, cycle_length=4, max_cohort_size=40)
    >>> c = s.sample(jax.random.key(0), 200, round_=0, partition_key=jax.random.key(1))
    >>> c.ids.shape
    (40,)
    >>> capped = fs.sampling.cyclic_poisson(0.5, 4, 40, max_participations=2, num_rounds=40)
    >>> capped.num_cycles, capped.participation_bound(40)
    (10, 2)
  """

  q: float
  cycle_length: int
  max_cohort_size: int
  max_participations: int | None = None
  num_rounds: int | None = None

  needs_round = True

  def __post_init__(self):
    if _v.probability("q", self.q) == 0:
      raise ValueError(f"q must be a probability in (0, 1]; got {self.q!r}.")
    _v.positive_int("cycle_length", self.cycle_length)
    _v.positive_int("max_cohort_size", self.max_cohort_size)
    k = _v.positive_int("max_participations", self.max_participations, allow_none=True)
    t = _v.positive_int("num_rounds", self.num_rounds, allow_none=True)
    if k is not None and t is None:
      raise ValueError(
          f"max_participations={k} needs num_rounds (the run's T rounds, over which each client "
          "gets a window of k of its ceil(T / cycle_length) cycles); pass num_rounds=T.")
    if t is not None and k is None:
      raise ValueError(f"num_rounds={t} is only used with max_participations; pass "
                       "max_participations=k, or drop num_rounds.")

  def __repr__(self) -> str:  # the cap only when set (a run's identity reads this repr)
    cap = ("" if self.max_participations is None else
           f", max_participations={self.max_participations}, num_rounds={self.num_rounds}")
    return (f"CyclicPoissonSampler(q={self.q!r}, cycle_length={self.cycle_length!r}, "
            f"max_cohort_size={self.max_cohort_size!r}{cap})")

  @property
  def num_cycles(self) -> int | None:
    """E = ``ceil(num_rounds / cycle_length)``, the cycles of a capped run (None uncapped)."""
    if self.num_rounds is None:
      return None
    return -(-int(self.num_rounds) // int(self.cycle_length))

  @property
  def capped(self) -> bool:
    """Whether the cap binds: ``max_participations < num_cycles`` (else it changes nothing)."""
    return self.max_participations is not None and self.max_participations < self.num_cycles

  def participation_bound(self, num_rounds: int) -> int:
    """The most rounds one client can join in the first ``num_rounds`` rounds.

    Returns:
      ``min(ceil(num_rounds / b), k)`` (``ceil(num_rounds / b)`` uncapped).
    """
    bound = -(-int(num_rounds) // int(self.cycle_length))
    return bound if self.max_participations is None else min(bound, int(self.max_participations))

  def eligible_share(self) -> float:
    """The share of a bin that may join a round: ``k / E`` with the cap, 1 without."""
    return int(self.max_participations) / self.num_cycles if self.capped else 1.0

  def expected_cohort_size(self, num_clients: int) -> float:
    return float(self.q) * num_clients / int(self.cycle_length) * self.eligible_share()

  def validate(self, num_clients: int) -> None:
    """Refuses a schedule the population cannot satisfy, and a cap below the expected cohort.

    Every client is in exactly one of the b bins, so the expected cohort ``q N / b`` times b never
    exceeds N; what the population cannot satisfy is more bins than clients (empty bins), or a
    participation cap that leaves less than one client per round (``q N k < T``: the N clients'
    at most ``N k`` participations cannot fill T rounds).
    """
    b = int(self.cycle_length)
    if b > num_clients:
      raise ValueError(
          f"cycle_length={b} exceeds the number of clients ({num_clients}): some bins are "
          "empty. Lower cycle_length (the min-separation b).")
    mean = self.expected_cohort_size(num_clients)
    if self.capped and mean < 1:
      k, t = int(self.max_participations), int(self.num_rounds)
      raise ValueError(
          f"max_participations={k} cannot fill num_rounds={t} rounds: {num_clients} clients "
          f"joining at most {k} times each (with q={self.q}) give an expected cohort of "
          f"{mean:.2f} < 1 client per round. Raise max_participations to at least "
          f"{math.ceil(t / (float(self.q) * num_clients))}, or lower num_rounds.")
    if self.max_cohort_size < mean:
      raise ValueError(
          f"max_cohort_size={self.max_cohort_size} is below the expected cohort "
          f"{mean:.1f} (q={self.q}, N={num_clients}, cycle_length={b}"
          + (f", max_participations={self.max_participations} of {self.num_cycles} cycles"
             if self.capped else "")
          + "): most rounds would drop sampled clients. Raise max_cohort_size or lower q.")

  def bins(self, partition_key: jax.Array, num_clients: int) -> jax.Array:
    """Every client's bin, fixed for the run.

    Returns:
      int32 ``[N]`` bins in ``[0, cycle_length)``.
    """
    return jax.random.randint(partition_key, (num_clients,), 0, int(self.cycle_length),
                              dtype=jnp.int32)

  def window_starts(self, partition_key: jax.Array, num_clients: int) -> jax.Array:
    """Every client's first eligible cycle under the cap, fixed for the run.

    Returns:
      int32 ``[N]`` starts in ``[0, num_cycles)`` (a client may join in cycles ``start ..
      start + k − 1`` mod E).
    """
    if self.num_cycles is None:
      raise ValueError("window_starts needs max_participations and num_rounds.")
    return jax.random.randint(jax.random.fold_in(partition_key, WINDOW_SALT), (num_clients,), 0,
                              self.num_cycles, dtype=jnp.int32)

  def _in_window(self, starts, round_) -> jax.Array:
    """Bool: whether round ``round_``'s cycle is in the windows starting at ``starts``."""
    cycle = jnp.asarray(round_, jnp.int32) // int(self.cycle_length)
    return (cycle - starts) % self.num_cycles < int(self.max_participations)

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
    starts = None
    if self.capped:
      starts = self.window_starts(partition_key, num_clients)
      eligible = eligible & self._in_window(starts, round_)
    joined = eligible & (jax.random.uniform(join_key, (num_clients,)) < jnp.float32(self.q))
    if available is not None:
      joined = joined & available
    ids, mask, truncated = _pick_joined(joined, order_key, self.max_cohort_size)
    return Cohort(ids, mask, truncated, self.violations(ids, mask, bins, round_, starts))

  def violations(self, ids: jax.Array, mask: jax.Array, bins: jax.Array, round_,
                 starts: jax.Array | None = None) -> jax.Array:
    """Cohort clients (``ids`` where ``mask``) whose bin is not round ``round_``'s, or (with
    ``starts``, the cap's windows) whose window does not hold this round's cycle: what
    ``metrics["schedule_violations"]`` reports (0 for this sampler's own cohorts).

    Returns:
      an int32 count.
    """
    this_bin = jnp.asarray(round_, jnp.int32) % int(self.cycle_length)
    outside = bins[ids] != this_bin
    if starts is not None:
      outside = outside | ~self._in_window(starts[ids], round_)
    return jnp.sum(mask & outside).astype(jnp.int32)


def cyclic_poisson(q: float, cycle_length: int, max_cohort_size: int, *,
                   max_participations: int | None = None,
                   num_rounds: int | None = None) -> CyclicPoissonSampler:
  """Cyclic Poisson sampling with min-separation ``cycle_length`` (:class:`CyclicPoissonSampler`),
  optionally with at most ``max_participations`` participations in ``num_rounds`` rounds.

  Returns:
    a :class:`CyclicPoissonSampler` (``Simulation(..., sampler=...)``).
  """
  return CyclicPoissonSampler(q, cycle_length, max_cohort_size, max_participations, num_rounds)


def balls_in_bins(cycle_length: int, max_cohort_size: int, *,
                  max_participations: int | None = None,
                  num_rounds: int | None = None) -> CyclicPoissonSampler:
  """Balls-in-bins: every client of bin ``t mod b`` participates in round t (q = 1), optionally
  at most ``max_participations`` times in ``num_rounds`` rounds.

  Returns:
    a :class:`CyclicPoissonSampler` with ``q = 1``.
  """
  return CyclicPoissonSampler(1.0, cycle_length, max_cohort_size, max_participations, num_rounds)
