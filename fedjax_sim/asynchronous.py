"""Asynchronous federated learning on a virtual clock: FedBuff (buffered asynchronous aggregation).

``concurrency`` C clients train at once; each takes a duration from :class:`Timing` (its compute
speed x its local steps, plus a communication term, times optional lognormal jitter). When a
client finishes, its update joins the server's buffer and a new client starts at once, drawn
from the clients that are available (:class:`Availability`), not in flight and not yet started on
the current model version. Every ``buffer_size`` K updates the server applies one step: the
algorithm's aggregator pipeline (clip, noise, compression, secure aggregation, robust rules)
runs over the buffer exactly as over a synchronous cohort, then the server optimizer. An update
computed from model version ``v`` and applied at server step ``j`` has staleness ``s = j - v``;
it is weighted by ``staleness(s)`` (:func:`constant`, :func:`polynomial`, :func:`hinge`, or a
function) and dropped when ``s > max_staleness``.

**How it runs.** The arrival order depends only on the durations and the run key, so the host
computes it (a heap of finish times over the virtual clock, :class:`Scheduler`); training runs
compiled: one server step trains its K arrivals vmapped (in chunks, ``core.client_result``, the
same one-client function as the synchronous round), each from the model version it started on,
read from a ring buffer of the last ``S = max_staleness + 1`` versions, and many server steps run
in one ``lax.scan``. Memory: ``S x |params|`` for the ring (no ring at all when
``max_staleness=0``) plus one chunk's training (with ``chunk x |params|`` for its clients' start
versions), independent of C. Clients dropped as too stale
are never trained (they cost the host a heap entry, nothing else).

**Tie convention.** Events at the same virtual time are processed together: every arrival at
time t is applied (possibly completing several buffers) before the clients replacing them start,
on the newest version. So with equal durations and C = K the run *is* synchronous FedAvg, bit for
bit (same keys: the clients starting on version v are the synchronous round v's cohort, and
train with round v's client keys).

**Keys.** Version ``v``'s starters are drawn by the same Gumbel scores as the synchronous
sampler's round ``v`` cohort (``round_keys(key, v).cohort``), the highest eligible score first; a
client trains with ``fold_in(round_keys(key, v).client, id)`` (a client starts at most once per
version, so this key is unique); the aggregator's keys are those of server step ``j``.

**Privacy.** Participation here is neither Poisson nor fixed-size sampling, and no accountant in
fedjax_sim fits it: a DP aggregator runs (clip and noise per buffer) but the run reports no ε,
and ``delta=`` is refused.

References:
  Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022
  (FedBuff). Huba et al., "Papaya: Practical, Private, and Scalable Federated Learning",
  MLSys 2022. Xie et al., "Asynchronous Federated Optimization", 2019 (polynomial and hinge
  staleness functions). Lai et al., "FedScale", ICML 2022 (device and behaviour traces).

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(200, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
  >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 20, 200))
  >>> algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
  ...                             client_optimizer=optax.sgd(0.1), batch_size=8, local_steps=2)
  >>> timing = fs.asynchronous.Timing(steps_per_second=rng.lognormal(0, 1, 20), local_steps=2)
  >>> sim = fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=4, timing=timing,
  ...                          staleness=fs.asynchronous.polynomial(0.5), max_staleness=6)
  >>> state = sim.init(jnp.zeros((3, 2)), jax.random.key(0))
  >>> state, metrics = sim.run(state, 5)
  >>> int(state.server.round), metrics["virtual_time"].shape
  (5, (5,))
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim import autotune as _autotune
from fedjax_sim import core
from fedjax_sim import memory as _memory
from fedjax_sim import nonfinite as _nf
from fedjax_sim import systems as _systems
from fedjax_sim.aggregators import ADDS_NOISE, SECURE
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import Cohort, UniformSampler
from fedjax_sim.runs import planning, tuning
from fedjax_sim.types import DURATION_SALT

__all__ = [
    "AsyncSimulation",
    "AsyncState",
    "Availability",
    "Schedule",
    "Scheduler",
    "Staleness",
    "Timing",
    "async_step",
    "chunk_performance",
    "constant",
    "fedscale_timing",
    "hinge",
    "initial_state",
    "load_fedscale_behavior",
    "polynomial",
    "step_runner",
    "version_scores",
]


# -- staleness weighting ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Staleness:
  """A staleness weight ``w(s)`` (evaluated on the host, in float64, for s = 0, 1, ...).

  Attributes:
    name: how it reads in logs and checkpoints.
    fn: ``fn(s) -> w`` on a float64 NumPy array of staleness values.
    is_constant: ``w == 1`` everywhere (the engine then multiplies nothing).
  """

  name: str
  fn: Callable[[np.ndarray], np.ndarray]
  is_constant: bool = False

  def __call__(self, s) -> np.ndarray:
    s = np.asarray(s, np.float64)
    return np.broadcast_to(np.asarray(self.fn(s), np.float64), s.shape)


def constant() -> Staleness:
  """``w(s) = 1``: every update counts fully (FedBuff's default).

  Returns:
    a :class:`Staleness`.
  """
  return Staleness("constant", np.ones_like, True)


def polynomial(a: float = 0.5) -> Staleness:
  """``w(s) = (1 + s) ** -a`` (Xie et al. 2019; FedBuff uses ``a = 0.5``).

  Args:
    a: the exponent, >= 0.

  Returns:
    a :class:`Staleness`.
  """
  a = _v.non_negative("polynomial staleness exponent a", a)
  return Staleness(f"polynomial(a={a!r})", lambda s: (1.0 + s) ** -a, a == 0)


def hinge(a: float = 10.0, b: float = 4.0) -> Staleness:
  """``w(s) = 1`` for ``s <= b``, else ``1 / (a (s - b) + 1)`` (Xie et al. 2019).

  Args:
    a: the slope after the hinge, >= 0.
    b: the staleness up to which updates count fully, >= 0.

  Returns:
    a :class:`Staleness`.
  """
  a = _v.non_negative("hinge staleness slope a", a)
  b = _v.non_negative("hinge staleness knee b", b)
  return Staleness(f"hinge(a={a!r}, b={b!r})",
                   lambda s: np.where(s <= b, 1.0, 1.0 / (a * np.maximum(s - b, 0.0) + 1.0)),
                   a == 0)


def _staleness(value) -> Staleness:
  if value is None:
    return constant()
  if isinstance(value, Staleness):
    return value
  if callable(value):
    return Staleness(getattr(value, "__name__", repr(value)), value)
  raise TypeError(f"staleness must be fs.asynchronous.constant()/polynomial(a)/hinge(a, b) or a "
                  f"function s -> weight; got {value!r}.")


# -- the virtual clock's inputs ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Availability:
  """When each client can start: active intervals ``[start, end]`` in seconds, per client.

  A client is available at time ``t`` when ``t mod period`` (``t`` itself without a period)
  lies in one of its intervals. A client that started finishes (availability governs starts).

  Attributes:
    client: int ``[M]``, the client of each interval (ids of the population).
    start, end: float ``[M]`` seconds.
    num_clients: the population size the ids refer to.
    period: optional period in seconds, one for all or one per interval (FedScale's behaviour
      traces repeat with each client's ``finish_time``:
      :func:`fedjax_sim.asynchronous.load_fedscale_behavior`).
  """

  client: np.ndarray
  start: np.ndarray
  end: np.ndarray
  num_clients: int
  period: Any = None

  def __post_init__(self):
    c = np.asarray(self.client, np.int64).reshape(-1)
    s = np.asarray(self.start, np.float64).reshape(-1)
    e = np.asarray(self.end, np.float64).reshape(-1)
    if not (len(c) == len(s) == len(e)):
      raise ValueError("Availability: client, start and end must have the same length.")
    n = _v.positive_int("Availability num_clients", self.num_clients)
    if len(c) and (c.min() < 0 or c.max() >= n):
      raise ValueError(f"Availability: client ids span [{c.min()}, {c.max()}] but num_clients="
                       f"{n}; the trace's client ids must match the population (0..{n - 1}).")
    if not (np.isfinite(s).all() and np.isfinite(e).all()) or (e < s).any():
      raise ValueError("Availability: every interval needs finite start <= end.")
    period = self.period
    if period is not None:
      period = np.broadcast_to(np.asarray(period, np.float64), s.shape).copy()
      if not (np.isfinite(period).all() and (period > 0).all()):
        raise ValueError("Availability period must be finite and > 0 (seconds).")
    object.__setattr__(self, "client", c)
    object.__setattr__(self, "start", s)
    object.__setattr__(self, "end", e)
    object.__setattr__(self, "period", period)

  def active(self, t: float) -> np.ndarray:
    """bool ``[num_clients]``: who may start at virtual time ``t``."""
    tt = t if self.period is None else np.mod(t, self.period)
    hit = (self.start <= tt) & (tt <= self.end)  # FedScale's is_active: both ends inclusive
    out = np.zeros(self.num_clients, bool)
    out[self.client[hit]] = True
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Timing:
  """How long each client takes: ``(local_steps / steps_per_second + comm_seconds) * J``.

  ``J`` is 1, or with ``jitter = σ > 0`` a lognormal ``exp(N(0, σ²))`` drawn per client and model
  version from the run key (:data:`fedjax_sim.types.DURATION_SALT`).

  Attributes:
    steps_per_second: per-client compute speed (e.g. ``rng.lognormal(0, 1, N)``, or FedScale's
      device capacities: :func:`fedjax_sim.systems.load_fedscale_capacity`).
    local_steps: local steps per client (an int, or per client, e.g. ``E * ceil(n_k / B)``).
    comm_seconds: the download + upload time (a float or per client).
    jitter: lognormal σ of a multiplicative per-launch factor (0: deterministic).
    availability: optional :class:`Availability` (default: always available).
    retry_seconds: when no eligible client can start, the slot retries this much later.
  """

  steps_per_second: Any
  local_steps: Any = 1
  comm_seconds: Any = 0.0
  jitter: float = 0.0
  availability: Availability | None = None
  retry_seconds: float = 60.0

  def __post_init__(self):
    _v.non_negative("Timing jitter", self.jitter)
    _v.positive("Timing retry_seconds", self.retry_seconds)
    if self.availability is not None and not isinstance(self.availability, Availability):
      raise TypeError("Timing availability must be an fs.asynchronous.Availability.")

  def seconds(self, num_clients: int) -> np.ndarray:
    """float64 ``[num_clients]``: each client's duration before jitter (checked: finite, > 0)."""
    def per(name, value):
      a = np.asarray(value, np.float64)
      if a.ndim == 0:
        a = np.full(num_clients, float(a))
      if a.shape != (num_clients,):
        raise ValueError(f"Timing {name} has shape {a.shape} but the population has "
                         f"{num_clients} clients; pass a scalar or one value per client.")
      if not np.isfinite(a).all() or (a < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(a) | (a < 0))[0])
        raise ValueError(f"Timing {name} must be finite and >= 0 for every client; client {bad} "
                         f"has {a[bad]!r}.")
      return a
    speed = per("steps_per_second", self.steps_per_second)
    if (speed <= 0).any():
      raise ValueError(f"Timing steps_per_second must be > 0; client "
                       f"{int(np.flatnonzero(speed <= 0)[0])} has 0.")
    out = per("local_steps", self.local_steps) / speed + per("comm_seconds", self.comm_seconds)
    if not (np.isfinite(out).all() and (out > 0).all()):
      bad = int(np.flatnonzero(~(np.isfinite(out) & (out > 0)))[0])
      raise ValueError(f"client {bad}'s duration is {out[bad]!r} seconds; every duration must be "
                       "finite and > 0 (check Timing local_steps / comm_seconds).")
    if self.availability is not None and self.availability.num_clients != num_clients:
      raise ValueError(
          f"the availability trace covers {self.availability.num_clients} clients but the "
          f"population has {num_clients}; the trace's client ids must match the population.")
    return out


# -- the host's schedule ----------------------------------------------------------------------

def version_scores(key: jax.Array, version: int, num_clients: int) -> np.ndarray:
  """The Gumbel scores that rank version ``version``'s starters (those of the synchronous
  sampler's round-``version`` cohort; higher starts first).

  Returns:
    float32 ``[num_clients]``.
  """
  return np.asarray(_scores(key, jnp.int32(version), num_clients))


@jax.jit
def _version_keys(key, version):
  return core.round_keys(key, version).cohort


def _scores(key, version, num_clients):
  return jax.random.gumbel(_version_keys(key, version), (num_clients,))


class Schedule(NamedTuple):
  """``T`` server steps as the host computed them (NumPy).

  Attributes:
    ids: int32 ``[T, K]`` the buffer's clients, in arrival order.
    versions: int32 ``[T, K]`` the model version each started on.
    weights: float32 ``[T, K]`` their staleness weights.
    time: float64 ``[T]`` the virtual time of each server step.
    in_flight: int ``[T]`` clients training when the step was applied.
    dropped_stale: int ``[T]`` updates dropped as too stale since the previous step.
  """

  ids: np.ndarray
  versions: np.ndarray
  weights: np.ndarray
  time: np.ndarray
  in_flight: np.ndarray
  dropped_stale: np.ndarray

  @property
  def staleness(self) -> np.ndarray:
    return np.arange(len(self.time))[:, None] + self.first_step - self.versions

  first_step: int = 0


class Scheduler:
  """The virtual clock (host, deterministic in the run key): a heap of finish times.

  Args:
    key: the run key (its version scores and duration jitter).
    seconds: float64 ``[N]`` base durations (:meth:`Timing.seconds`).
    concurrency, buffer_size, max_staleness, staleness: the run's settings.
    jitter, availability, retry_seconds: from :class:`Timing`.
  """

  def __init__(self, key, seconds, *, concurrency, buffer_size, max_staleness, staleness,
               jitter=0.0, availability=None, retry_seconds=60.0):
    data = np.array(jax.random.key_data(key))  # a host copy: run states are donated
    self._key = jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))
    self._key_words = [int(w) for w in data.ravel()]
    self._seconds = np.asarray(seconds, np.float64)
    self.num_clients = len(self._seconds)
    self.concurrency, self.buffer_size = concurrency, buffer_size
    self.max_staleness, self._staleness = max_staleness, staleness
    self._jitter, self._availability, self._retry = jitter, availability, retry_seconds
    self.version = 0  # server steps decided so far
    self.consumed = 0  # server steps handed out by next_steps
    self.time = 0.0
    self._heap: list = []
    self._seq = 0
    self._in_flight = np.zeros(self.num_clients, bool)
    self._launched = np.zeros(self.num_clients, bool)  # started on the current version
    self._cache_version = -1
    self._free_version, self._free, self._freed = -1, [], []
    self._pending = 0
    self._retry_set = False
    self._buffer: list = []
    self._dropped = 0
    self._steps: list = []
    self._launch(concurrency, 0.0, first=True)

  def _version_draws(self):
    if self._cache_version != self.version:
      self._cache_version = self.version
      self._scores = version_scores(self._key, self.version, self.num_clients)
      self._launched[:] = False
      if self._jitter > 0:
        rng = np.random.default_rng([*self._key_words, DURATION_SALT, self.version])
        self._durations = self._seconds * rng.lognormal(0.0, self._jitter, self.num_clients)
      else:
        self._durations = self._seconds
    return self._scores, self._durations

  def _free_clients(self, scores) -> list:
    """Without availability: a heap of ``(-score, id)`` over the clients free to start (not in
    flight, not started on this version), rebuilt per version and fed with arrivals: a start
    costs O(log N) instead of a pass over the population."""
    if self._free_version != self.version:
      self._free_version = self.version
      ids = np.flatnonzero(~self._in_flight & ~self._launched)
      self._free = list(zip((-scores[ids]).tolist(), ids.tolist(), strict=True))
      heapq.heapify(self._free)
      self._freed = []
    for cid in self._freed:
      if not self._launched[cid]:
        heapq.heappush(self._free, (-float(scores[cid]), cid))
    self._freed = []
    return self._free

  def _launch(self, m: int, t: float, first: bool = False) -> None:
    scores, durations = self._version_draws()
    if self._availability is None and not first:
      free = self._free_clients(scores)  # pops in the order below: highest score, lowest id
      cand = np.asarray([heapq.heappop(free)[1] for _ in range(min(m, len(free)))], np.int64)
    else:
      eligible = ~self._in_flight & ~self._launched
      if self._availability is not None:
        eligible &= self._availability.active(t)
      cand = np.flatnonzero(eligible)
    if first and len(cand) < m:
      raise ValueError(
          f"concurrency={m} but only {len(cand)} clients are available at virtual time 0; "
          "lower concurrency (it must not exceed the available population).")
    if len(cand) > m:
      cand = cand[np.argpartition(-scores[cand], m - 1)[:m]]
    cand = cand[np.lexsort((cand, -scores[cand]))]  # highest score first, ties by id
    for cid in cand.tolist():
      heapq.heappush(self._heap, (t + durations[cid], self._seq, cid, self.version))
      self._seq += 1
    self._in_flight[cand] = True
    self._launched[cand] = True
    missing = m - len(cand)
    if missing:
      a = self._availability
      if (not self._in_flight.any() and a is not None and a.period is None
          and (not len(a.end) or t > a.end.max())):
        raise RuntimeError(
            f"at virtual time {t:g} no client is training and the availability trace (no "
            "period) has no interval left: no client can ever start again. Give the "
            "Availability a period or a longer trace.")
      self._pending += missing
      if not self._retry_set:
        heapq.heappush(self._heap, (t + self._retry, self._seq, -1, -1))
        self._seq += 1
        self._retry_set = True

  def _advance(self) -> None:
    """Processes every event at the next finish time, then starts the replacements."""
    t = self._heap[0][0]
    started = 0
    while self._heap and self._heap[0][0] == t:
      _, _, cid, v = heapq.heappop(self._heap)
      if cid < 0:
        self._retry_set = False
        continue
      self._in_flight[cid] = False
      self._freed.append(cid)
      started += 1
      if self.version - v > self.max_staleness:
        self._dropped += 1
        continue
      self._buffer.append((cid, v))
      if len(self._buffer) == self.buffer_size:
        ids, versions = zip(*self._buffer, strict=True)
        self._steps.append((ids, versions, t, int(self._in_flight.sum()), self._dropped))
        self._buffer, self._dropped = [], 0
        self.version += 1
    self.time = t
    m, self._pending = started + self._pending, 0
    if m:
      self._launch(m, t)

  def next_steps(self, num_steps: int) -> Schedule:
    """The next ``num_steps`` server steps (advancing the clock as far as they need)."""
    while len(self._steps) < num_steps:
      self._advance()
    steps, self._steps = self._steps[:num_steps], self._steps[num_steps:]
    ids = np.asarray([s[0] for s in steps], np.int32).reshape(num_steps, self.buffer_size)
    versions = np.asarray([s[1] for s in steps], np.int32).reshape(num_steps, self.buffer_size)
    stale = (np.arange(num_steps)[:, None] + self.consumed) - versions
    sched = Schedule(
        ids, versions, self._staleness(stale).astype(np.float32),
        np.asarray([s[2] for s in steps], np.float64),
        np.asarray([s[3] for s in steps], np.int64),
        np.asarray([s[4] for s in steps], np.int64), self.consumed)
    self.consumed += num_steps
    return sched


# -- the compiled server step -----------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class AsyncState:
  """An asynchronous run's device state (a pytree).

  Attributes:
    server: the server state (``fedjax_sim.ServerState``) (``round`` counts server steps).
    ring: the last ``S`` model versions as broadcast to clients (leading dim ``S``; version
      ``v`` in slot ``v % S``), or ``()`` when ``S = 1`` (``max_staleness=0``).
  """

  server: Any  # fedjax_sim.ServerState (a plain name: the API page lists it twice)
  ring: Any = ()


def _broadcast(plan: core.RoundPlan, train_params, server_extra):
  algo = plan.algorithm
  return train_params if algo.broadcast_fn is None else algo.broadcast_fn(train_params,
                                                                          server_extra)


def async_step(plan: core.RoundPlan, ring_size: int, staleness_constant: bool,
               state: AsyncState, population: Population, ids, versions, weights):
  """One server step over a buffer of ``K`` arrivals (pure; traced into a ``lax.scan``).

  Args:
    plan: the round plan (``plan.cohort_size`` is the buffer size K).
    ring_size: ``S``, the model versions kept (``max_staleness + 1``).
    staleness_constant: the staleness weights are all 1 (nothing is multiplied).
    state: the state after ``state.server.round`` server steps.
    population: the clients' data.
    ids, versions, weights: int32 / int32 / float32 ``[K]``: the buffer's clients, the versions
      they trained from, their staleness weights.

  Returns:
    ``(new_state, metrics)``.
  """
  server = state.server
  j = server.round
  keys = core.round_keys(server.key, j)
  if plan.sort_by_size:  # as core.cohort_slots: the same layout as a synchronous cohort
    order = jnp.argsort(-population.num_examples[ids], stable=True)
    ids, versions, weights = ids[order], versions[order], weights[order]
  pad = plan.num_chunks * plan.chunk_size - plan.cohort_size
  real = jnp.arange(plan.cohort_size + pad) < plan.cohort_size
  if pad:
    ids, versions, weights = (jnp.concatenate([a, jnp.zeros((pad,), a.dtype)])
                              for a in (ids, versions, weights))
  slots = core.CohortSlots(ids, real)
  context = plan.context._replace(shared_key=keys.shared, cohort_ids=ids, cohort_mask=real)
  train_params, _ = plan.views(server.params)
  per_slot = ring_size > 1
  client_keys = jax.vmap(lambda v: core.round_keys(server.key, v).client)(versions)
  if per_slot:
    broadcast = jax.tree.map(lambda r: r[versions % ring_size], state.ring)
  else:
    broadcast = _broadcast(plan, train_params, server.server_extra)
  stacked = plan.algorithm.aggregator.reduce.needs_stack

  def one(cid, is_real, ckey, w, bc):
    result = core.client_result(plan, keys._replace(client=ckey), context, population,
                                server.agg_state[0], cid, is_real, ((), ()), bc)
    if staleness_constant:
      return result
    update = result.contribution.update
    update = update._replace(delta=jax.tree.map(lambda d: (w * d).astype(d.dtype), update.delta))
    return result._replace(contribution=result.contribution._replace(update=update))

  chunk = plan.chunk_size
  if chunk == 1 and plan.unbatched_single_client:  # as core.chunk_pass
    def clients(*xs):
      b = xs[-1] if not per_slot else jax.tree.map(lambda x: x[0], xs[-1])
      out = one(*jax.tree.map(lambda x: x[0], xs[:-1]), b)
      return jax.tree.map(lambda x: jnp.asarray(x)[None], out)
  else:
    clients = jax.vmap(one, in_axes=(0, 0, 0, 0, 0 if per_slot else None))
  clients = jax.jit(clients)

  def summable(result):
    return result.contribution._replace(update=()) if stacked else result.contribution

  def split(x):
    return x.reshape(plan.num_chunks, chunk, *x.shape[1:])

  xs = jax.tree.map(split, (ids, real, client_keys, weights))
  if per_slot:
    xs = xs + (jax.tree.map(split, broadcast),)

  def body(acc, x):
    b = x[4] if per_slot else broadcast
    result = clients(x[0], x[1], x[2], x[3], b)
    summed = jax.tree.map(lambda y: jnp.sum(y, axis=0), summable(result))
    slots_run = chunk * jnp.max(result.contribution.stats["client_steps"])
    ys = (result.kept, result.contribution.update if stacked else ())
    return jax.tree.map(jnp.add, acc, (summed, slots_run)), ys

  first = jax.eval_shape(clients, *jax.tree.map(lambda x: x[0], xs[:4]),
                         jax.tree.map(lambda x: x[0], xs[4]) if per_slot else broadcast)
  acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype),
                      (summable(first), jax.ShapeDtypeStruct((1,), jnp.float32)))
  (sums, step_slots), (kept, stack) = jax.lax.scan(body, acc0, xs)
  passed = core.ChunkPass(sums, step_slots, (), kept, stack)
  out = core.server_step(plan, server, keys, context, passed, slots, train_params)
  stats = sums.stats
  no_finite_client = (stats["nan_clients"] > 0) & (stats["clients"] == 0)
  state_ok = _nf.stays_finite((out.params, out.opt_state), (train_params, server.opt_state))
  nonfinite = ~state_ok | no_finite_client
  params, opt_state, agg_state, server_extra = jax.tree.map(
      lambda a, b: jnp.where(~state_ok, b, a), tuple(out[:4]),
      (train_params, server.opt_state, server.agg_state, server.server_extra))
  new_server = core.ServerState(
      round=j + 1, params=params, opt_state=opt_state, agg_state=agg_state, client_states=(),
      key=server.key, server_extra=server_extra, agg_client_states=())
  ring = state.ring
  if per_slot:
    new_version = _broadcast(plan, params, server_extra)
    ring = jax.tree.map(lambda r, p: r.at[(j + 1) % ring_size].set(p), ring, new_version)
  cohort = Cohort(ids, real, jnp.zeros((), jnp.int32))
  metrics = core.round_metrics(plan, cohort, None, passed, out, nonfinite)
  return AsyncState(server=new_server, ring=ring), metrics


def _block_program(plan, ring_size, staleness_constant):
  def run_block(state, population, ids, versions, weights):
    def body(s, x):
      return async_step(plan, ring_size, staleness_constant, s, population, *x)
    return jax.lax.scan(body, state, (ids, versions, weights))
  return jax.jit(run_block, donate_argnums=0)


def initial_state(plan: core.RoundPlan, params: Any, key: jax.Array,
                  ring_size: int) -> AsyncState:
  """The state before the first server step: the server's, and the ring holding version 0.

  Returns:
    An :class:`AsyncState`.
  """
  server = core.initial_state(plan, params, key)
  ring = ()
  if ring_size > 1:
    train, _ = plan.views(server.params)
    first = _broadcast(plan, train, server.server_extra)
    ring = jax.tree.map(lambda p: jnp.zeros((ring_size, *p.shape), p.dtype).at[0].set(p), first)
  return AsyncState(server=server, ring=ring)


def step_runner(plan: core.RoundPlan, population: Population, params: Any, key: jax.Array,
                ring_size: int, staleness_constant: bool, schedule: Schedule):
  """What ``chunk_size="auto"`` times at a candidate chunk (``plan.chunk_size``): ``run()``
  runs one server step over ``schedule``'s first buffer from a fresh state (a step donates its
  state) and blocks until it is done.

  Returns:
    The zero-argument callable (:func:`fedjax_sim.runs.tuning.tune_plan`'s ``runner``).
  """
  program = _block_program(plan, ring_size, staleness_constant)
  ids, versions, weights = schedule.ids[:1], schedule.versions[:1], schedule.weights[:1]

  def run():
    state = initial_state(plan, jax.tree.map(jnp.array, params), key, ring_size)
    state, _ = program(state, population, ids, versions, weights)
    jax.block_until_ready(state.server.params)
  return run


def chunk_performance(chunk_size: Any, buffer_size: int, sort_by_size: bool) -> core.Performance:
  """:class:`AsyncSimulation`'s ``chunk_size`` as the requested speed settings, checked before
  anything compiles: a positive int (at most the buffer size is used), None (the automatic
  chunk of :class:`fedjax_sim.Simulation`, :func:`fedjax_sim.memory.chunk_size_for`), or a
  measured one: ``"auto"``, a list of candidates or an :class:`fedjax_sim.autotune.AutoChunk`.

  Returns:
    A :class:`fedjax_sim.core.Performance` (``chunk_size`` None unless an int was given).

  Raises:
    ValueError: naming ``chunk_size``: another string, a bool, a float or an int < 1, a bad
      candidate list, or a candidate above the buffer size.
  """
  measured = isinstance(chunk_size, (str, list, tuple, np.ndarray, _autotune.AutoChunk))
  if chunk_size is not None and not measured and (
      isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
    raise ValueError(
        f"chunk_size must be a positive int, None (automatic, as fs.Simulation: from the model "
        f"size and the device), 'auto' (measured) or a list of candidate sizes to time; got "
        f"{chunk_size!r}.")
  request = _autotune.chunk_request(chunk_size)
  tune = request["autotune"]
  if tune is not None and tune.candidates and max(tune.candidates) > buffer_size:
    raise ValueError(
        f"chunk_size: candidate {max(tune.candidates)} exceeds the buffer size {buffer_size} "
        "(a chunk holds at most the buffer's K arrivals); drop it or pass 'auto'.")
  return core.Performance(**request, sort_by_size=bool(sort_by_size))


# -- the facade -------------------------------------------------------------------------------

HOST_METRICS = ("virtual_time", "in_flight", "dropped_stale", "staleness_mean", "staleness_max")


def staleness_bins(max_staleness: int) -> list[str]:
  """Labels of the staleness histogram's bins: ``0``, ``1``, ``2-3``, ``4-7``, ...

  Returns:
    one label per column of the ``staleness_hist`` metric.
  """
  labels, lo = ["0"], 1
  while lo <= max_staleness:
    hi = min(2 * lo - 1, max_staleness)
    labels.append(str(lo) if hi == lo else f"{lo}-{hi}")
    lo *= 2
  return labels


def _histogram(stale: np.ndarray, max_staleness: int) -> np.ndarray:
  idx = np.where(stale <= 0, 0, np.floor(np.log2(np.maximum(stale, 1))).astype(int) + 1)
  bins = len(staleness_bins(max_staleness))
  out = np.zeros((stale.shape[0], bins), np.int64)
  for b in range(bins):
    out[:, b] = (idx == b).sum(axis=1)
  return out


class AsyncSimulation:
  """Runs an algorithm asynchronously (FedBuff) on a virtual clock; see the module docstring.

  Args:
    algorithm: a stateless algorithm (``fs.algorithms.fedavg(...)``, any aggregator).
    population: the clients' data.
    concurrency: C, the clients training at once (``<= `` the available population).
    buffer_size: K, the updates per server step (``<= C``).
    timing: a :class:`Timing` (default: every client takes 1 second: synchronous rounds).
    staleness: :func:`constant` (default), :func:`polynomial`, :func:`hinge` or a function
      ``s -> w`` (non-negative; evaluated on the host).
    max_staleness: updates staler than this are dropped (never trained); the ring keeps
      ``max_staleness + 1`` model versions. Default ``4 * ceil(C / K)``.
    chunk_size: arrivals vmapped together (speed only), at most K. Default (None): the
      automatic chunk of ``fs.Simulation`` for a cohort of K (from the memory budget and the
      model size; on CPU 1 for a convolutional or heavy model, a chunk weighed against the
      padding for a light dense one: :func:`fedjax_sim.memory.chunk_size_for`); ``"auto"``
      (or candidates ``[1, 8]``, ``fs.autotune.AutoChunk(...)``): measured at :meth:`init`,
      one server step per candidate (:func:`step_runner`). Fixed by :meth:`init`; read it as
      ``sim.chunk_size``.
    sort_by_size: chunk the buffer by client size (speed only, as in ``fs.Simulation``).
    block_size: server steps per compiled ``lax.scan``.
    delta: refused: no privacy accountant fits asynchronous participation.

  Returns from :meth:`run`: per-step metrics, the synchronous round's (``clients``, ``loss``,
  ``update_norm``, ...) plus ``virtual_time``, ``in_flight``, ``dropped_stale``,
  ``staleness_mean``, ``staleness_max`` and ``staleness_hist`` ``[T, bins]``
  (:func:`staleness_bins`).
  """

  def __init__(self, algorithm: Algorithm, population: Population, *, concurrency: int,
               buffer_size: int, timing: Timing | None = None, staleness=None,
               max_staleness: int | None = None, chunk_size: int | None = None,
               sort_by_size: bool = True, block_size: int = 16, delta: float | None = None):
    if not isinstance(algorithm, Algorithm):
      raise TypeError(f"algorithm must be an fs.algorithms.Algorithm; got "
                      f"{type(algorithm).__name__}.")
    if not isinstance(population, Population):
      raise TypeError(f"population must be an fs.Population; got {type(population).__name__}.")
    n = population.num_clients
    c = _v.positive_int("concurrency", concurrency)
    k = _v.positive_int("buffer_size", buffer_size)
    if k > c:
      raise ValueError(f"buffer_size={k} exceeds concurrency={c}: the buffer could never fill. "
                       "Use buffer_size <= concurrency.")
    if c > n:
      raise ValueError(f"concurrency={c} exceeds the population ({n} clients): a client trains "
                       "at most once at a time. Lower concurrency.")
    if max_staleness is None:
      max_staleness = 4 * math.ceil(c / k)
    if (not isinstance(max_staleness, (int, np.integer)) or isinstance(max_staleness, bool)
        or max_staleness < 0):
      raise ValueError(f"max_staleness must be an int >= 0; got {max_staleness!r}.")
    self.staleness = _staleness(staleness)
    w = self.staleness(np.arange(int(max_staleness) + 1))
    if not np.isfinite(w).all() or (w < 0).any():
      s = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
      raise ValueError(f"staleness {self.staleness.name} gives weight {w[s]!r} at staleness {s}; "
                       "staleness weights must be finite and >= 0.")
    self.staleness = dataclasses.replace(
        self.staleness, is_constant=self.staleness.is_constant or bool((w == 1).all()))
    process = algorithm.aggregator
    if ADDS_NOISE in process.tags and (w > 1).any():
      raise ValueError(f"staleness {self.staleness.name} gives weights > 1 with a DP aggregator: "
                       "that scales a clipped update beyond its clip norm (sensitivity). Use "
                       "weights in [0, 1].")
    if SECURE in process.tags and not self.staleness.is_constant:
      raise ValueError("secure aggregation sums masked updates in a finite group, which a "
                       "staleness weight cannot scale: use staleness=fs.asynchronous.constant().")
    if delta is not None:
      raise ValueError(
          "delta= is refused: asynchronous participation is neither Poisson nor fixed-size "
          "sampling and fedjax_sim has no accountant that fits it, so an asynchronous run "
          "reports no epsilon. Drop delta= (the DP aggregator still clips and noises each "
          "buffer).")
    if algorithm.client_state_init is not None or process.per_client.client_init is not None:
      raise ValueError(f"{algorithm.name} keeps per-client state, which asynchronous runs do not "
                       "support yet (a client's state would be read and written out of order).")
    if algorithm.trainable is not None:
      raise ValueError("trainable= (partial training) is not supported by asynchronous runs yet.")
    self.timing = Timing(steps_per_second=1.0) if timing is None else timing
    if not isinstance(self.timing, Timing):
      raise TypeError(f"timing must be an fs.asynchronous.Timing; got {timing!r}.")
    self.seconds = self.timing.seconds(n)
    self.algorithm, self.population = algorithm, population
    self.concurrency, self.buffer_size, self.max_staleness = c, k, int(max_staleness)
    self._performance = chunk_performance(chunk_size, k, sort_by_size)
    self.sort_by_size = bool(sort_by_size)
    self.block_size = _v.positive_int("block_size", block_size)
    self.ring_size = self.max_staleness + 1
    self._plan = None
    self._programs: dict[int, Any] = {}
    self._scheduler: Scheduler | None = None

  @property
  def chunk_size(self) -> int | None:
    """Arrivals vmapped together: fixed by :meth:`init` (before it, the int requested, capped
    at the buffer size, or None)."""
    if self._plan is not None:
      return self._plan.chunk_size
    c = self._performance.chunk_size
    return None if c is None else min(int(c), self.buffer_size)

  @property
  def plan(self) -> core.RoundPlan | None:
    """The :class:`~fedjax_sim.core.RoundPlan` :meth:`init` fixed (None before it); with
    ``chunk_size="auto"``, ``plan.performance.tuning`` is what was measured."""
    return self._plan

  # -- state ----------------------------------------------------------------------------------
  def _make_plan(self, params, key):
    sampler = UniformSampler(self.buffer_size)
    draft = core.plan_for(self.algorithm, sampler, self.population, params,
                          sort_by_size=self.sort_by_size)
    if draft.algorithm.aggregator.check is not None:  # before anything compiles (tuning)
      draft.algorithm.aggregator.check(draft.context)
    ring_size, constant = self.ring_size, self.staleness.is_constant
    ring_bytes = ring_size * _memory.tree_bytes(params) if ring_size > 1 else 0

    def tuner(*args, signature, **kwargs):  # chunk_size="auto": one server step is timed
      run_key = jax.random.wrap_key_data(jnp.array(jax.random.key_data(key)))  # as the state's
      schedule = self._new_scheduler(run_key).next_steps(1)  # the run's first buffer
      runner = lambda p: step_runner(p, self.population, params, key, ring_size,  # noqa: E731
                                     constant, schedule)
      return tuning.tune_plan(*args, signature=("asynchronous", ring_size, constant, signature),
                              runner=runner, **kwargs)

    # The chunk as fs.Simulation fixes it: the requested int (at most K), the automatic rule
    # (memory budget after the population, the state and the ring; on CPU, FLOPs per step) or
    # the measured choice.
    return planning.plan(self.algorithm, sampler, self.population, params, key,
                         performance=self._performance, reserved_bytes=ring_bytes,
                         tuner=tuner).plan

  def init(self, params: Any, key: jax.Array) -> AsyncState:
    """The state before the first server step (the clock at 0, C clients started).

    Returns:
      an :class:`AsyncState`.
    """
    for leaf in jax.tree.leaves(params):
      if not np.isfinite(np.asarray(leaf)).all():
        raise ValueError("params hold NaN/Inf: start from finite parameters.")
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # runs donate the state
    plan = self._make_plan(params, key)
    program_of = lambda p: (p.chunk_size, str(p.context.params_template))  # noqa: E731
    if self._plan is None or program_of(plan) != program_of(self._plan):
      self._programs = {}  # (the same program keeps its compiled blocks)
    self._plan = plan
    state = initial_state(plan, params, key, self.ring_size)
    self._scheduler = self._new_scheduler(state.server.key)
    return state

  def _new_scheduler(self, key) -> Scheduler:
    t = self.timing
    return Scheduler(key, self.seconds, concurrency=self.concurrency,
                     buffer_size=self.buffer_size, max_staleness=self.max_staleness,
                     staleness=self.staleness, jitter=t.jitter, availability=t.availability,
                     retry_seconds=t.retry_seconds)

  def _sync_scheduler(self, state: AsyncState) -> Scheduler:
    """The scheduler at ``state``'s server step (replayed from the clock's start if needed)."""
    step = int(state.server.round)
    words = np.asarray(jax.random.key_data(state.server.key))
    s = self._scheduler
    if (s is None or s.consumed != step
        or not np.array_equal(np.asarray(jax.random.key_data(s._key)), words)):
      s = self._new_scheduler(state.server.key)
      while s.consumed < step:  # replay the host's clock (no training): deterministic
        s.next_steps(min(4096, step - s.consumed))
      self._scheduler = s
    return s

  @property
  def virtual_time(self) -> float:
    """The clock after the last step handed out (seconds)."""
    return 0.0 if self._scheduler is None else self._scheduler.time

  # -- running --------------------------------------------------------------------------------
  def _program(self, length):
    if length not in self._programs:
      self._programs[length] = _block_program(self._plan, self.ring_size,
                                              self.staleness.is_constant)
    return self._programs[length]

  def run(self, state: AsyncState, num_steps: int, *, log_dir: str | None = None,
          progress: bool = False) -> tuple[AsyncState, dict[str, np.ndarray]]:
    """Runs ``num_steps`` server steps in blocks of ``block_size`` (one ``lax.scan`` each).

    Args:
      state: from :meth:`init`, :meth:`run` or :meth:`restore`.
      num_steps: server steps to run.
      log_dir: append one JSON row per server step to ``<log_dir>/metrics.jsonl``
        (:class:`fedjax_sim.checkpoint.MetricsLog`; the histogram as ``staleness_hist_<bin>``
        columns). A log of another run there is refused.
      progress: a progress bar / line per block.

    Returns:
      ``(state, metrics)``: metrics are NumPy arrays with a leading ``[num_steps]`` axis.
    """
    from fedjax_sim.progress import Progress

    _v.non_negative_int("num_steps", num_steps)
    if self._plan is None:
      raise RuntimeError("call init(params, key) (or restore) before run().")
    if not isinstance(state, AsyncState):
      raise TypeError(f"state must be the AsyncState of init()/run(); got {type(state).__name__}.")
    sched = self._sync_scheduler(state)
    log = None if log_dir is None else self._log(log_dir, state)
    bar = Progress(num_steps, self.buffer_size, enabled=progress)
    rows: list[dict] = []
    done = 0
    bins = staleness_bins(self.max_staleness)
    length = min(self.block_size, num_steps)
    s = sched.next_steps(length) if num_steps else None
    start = int(state.server.round)
    while done < num_steps:
      first = start + done
      state, m = self._program(length)(state, self.population, s.ids, s.versions, s.weights)
      done += length
      # The next block's schedule is computed while this block runs (dispatch is asynchronous).
      next_length = min(self.block_size, num_steps - done)
      next_s = sched.next_steps(next_length) if next_length else None
      m = {k: np.asarray(v) for k, v in m.items()}
      stale = s.staleness
      m.update(virtual_time=s.time, in_flight=s.in_flight.astype(np.float32),
               dropped_stale=s.dropped_stale.astype(np.float32),
               staleness_mean=stale.mean(axis=1), staleness_max=stale.max(axis=1).astype(float),
               staleness_hist=_histogram(stale, self.max_staleness))
      if log is not None:
        flat = {k: v for k, v in m.items() if v.ndim == 1}
        flat.update({f"staleness_hist_{b}": m["staleness_hist"][:, i]
                     for i, b in enumerate(bins)})
        log.write(first, flat)
      if "loss" in m:
        bar.update(first + length, length, m, None)
      rows.append(m)
      s, length = next_s, next_length
    bar.close()
    if not rows:
      return state, {}
    return state, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

  def _log(self, log_dir: str, state: AsyncState):
    from fedjax_sim.checkpoint import MetricsLog, config_hash
    from fedjax_sim.runs import identity

    fp = {**self.fingerprint(),
          "run_key": [int(w) for w in np.asarray(jax.random.key_data(state.server.key)).ravel()]}
    existing = None
    path = os.path.join(log_dir, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        existing = json.load(f)
      saved = existing.get("fingerprint") if isinstance(existing.get("fingerprint"), dict) else {}
      # A log written before the fingerprint recorded the random-number settings: its hash is
      # that of the fingerprint without them (it cannot be checked against them).
      new = [k for k in identity.JAX_SETTINGS if k not in saved]
      legacy = new and existing.get("config_hash") == config_hash(
          {k: v for k, v in fp.items() if k not in new})
      if legacy:
        warnings.warn(f"the log in {log_dir!r} was written by an older version without the "
                      f"JAX settings {new}; it is taken to be this run's.",
                      stacklevel=3)
      elif existing.get("config_hash") != config_hash(fp):
        raise ValueError(f"log_dir {log_dir!r} holds the log of another run (other settings or "
                         "run key); use another log_dir." + identity.settings_hint(saved, fp))
    session = {"start_step": int(state.server.round), "chunk_size": self._plan.chunk_size}
    if self._plan.performance.tuning is not None:  # chunk_size="auto": what was measured
      session["chunk_tuning"] = self._plan.performance.tuning.as_dict()
    return MetricsLog(log_dir, fp, existing=existing, session=session)

  def memory(self, state: AsyncState) -> dict[str, int]:
    """Bytes: the ring of versions, the server state, and XLA's analysis of one block.

    Returns:
      ``{"ring_bytes", "state_bytes", "temp_bytes", "argument_bytes", "output_bytes"}``.
    """
    k = self.buffer_size
    ids = np.zeros((1, k), np.int32)
    lowered = self._program(1).lower(state, self.population, ids, ids,
                                     np.ones((1, k), np.float32))
    analysis = lowered.compile().memory_analysis()
    out = {"ring_bytes": _memory.tree_bytes(state.ring),
           "state_bytes": _memory.tree_bytes(state)}
    for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
      out[name.replace("_size_in", "")] = int(getattr(analysis, name, 0) or 0)
    return out

  # -- checkpoints ----------------------------------------------------------------------------
  def fingerprint(self) -> dict[str, Any]:
    """What a checkpoint must match to resume this run (JSON-able): its settings and JAX's
    global settings that change results (:func:`fedjax_sim.runs.identity.jax_settings`).

    Returns:
      The fingerprint dict.
    """
    from fedjax_sim.runs import identity

    pop = self.population
    return {
        "kind": "fedjax_sim.asynchronous",
        "algorithm": self.algorithm.name,
        "num_clients": pop.num_clients,
        "total_examples": pop.total_examples,
        "concurrency": self.concurrency,
        "buffer_size": self.buffer_size,
        "max_staleness": self.max_staleness,
        "staleness": self.staleness.name,
        "staleness_weights": [float(x) for x in self.staleness(np.arange(self.ring_size))],
        "seconds_digest": _digest(self.seconds),
        "jitter": self.timing.jitter,
        "retry_seconds": self.timing.retry_seconds,
        "availability_digest": None if self.timing.availability is None else _digest(
            np.concatenate([self.timing.availability.client.astype(np.float64),
                            self.timing.availability.start, self.timing.availability.end,
                            np.ravel(0.0 if self.timing.availability.period is None
                                     else self.timing.availability.period)])),
        "sort_by_size": self.sort_by_size,
        **identity.jax_settings(),
    }

  def save(self, state: AsyncState, directory: str) -> int:
    """Saves ``state`` (orbax) with this run's fingerprint; returns the server step saved.

    The host's clock is not stored: it is a deterministic function of the run key and the
    settings in the fingerprint, so :meth:`restore` replays it to the saved step, in-flight
    clients included.
    """
    import orbax.checkpoint as ocp

    step = int(state.server.round)
    savable = dataclasses.replace(
        state, server=dataclasses.replace(state.server, key=jax.random.key_data(state.server.key)))
    mngr = ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))
    meta = {**self.fingerprint(), "step": step,
            "key_impl": str(jax.random.key_impl(state.server.key))}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
        jax.tree.map(np.asarray, savable)), meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return step

  def restore(self, directory: str, params: Any, key: jax.Array, *,
              step: int | None = None) -> AsyncState:
    """Restores a checkpoint of this run; the clock resumes exactly where it stopped.

    Args:
      directory: where :meth:`save` wrote.
      params: a params template (shapes and dtypes).
      key: a key of the same implementation as the run's (its value is restored).
      step: the server step to restore (default: the latest).

    Returns:
      the :class:`AsyncState`.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: the checkpoint is not of an asynchronous run with these settings (which
        one differs is named): resuming it would change its clock.
    """
    import orbax.checkpoint as ocp

    from fedjax_sim.runs import identity

    mngr = ocp.CheckpointManager(os.path.abspath(directory))
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory!r}.")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    fp = self.fingerprint()
    if meta.get("kind") != fp["kind"]:
      raise ValueError(f"{directory!r} does not hold an asynchronous run's checkpoint (a "
                       "synchronous fs.Simulation's?); it cannot resume here.")
    if "key_impl" in meta and meta["key_impl"] != str(jax.random.key_impl(key)):
      raise ValueError(f"the checkpoint in {directory!r} holds a {meta['key_impl']} run key; "
                       f"key is a {jax.random.key_impl(key)} key. Pass a key of the saved "
                       f"implementation, e.g. jax.random.key(0, impl={meta['key_impl']!r}).")
    new = [k for k in identity.JAX_SETTINGS if k not in meta]
    if new:  # saved before the fingerprint recorded these settings: they cannot be checked
      warnings.warn(f"the checkpoint in {directory!r} was written by an older version without "
                    f"the JAX settings {new}; restoring it without those checks.", stacklevel=2)
      meta = {**meta, **{k: fp[k] for k in new}}
    if identity.settings_hint(meta, fp):
      raise ValueError(f"the checkpoint in {directory!r} comes from another run."
                       + identity.settings_hint(meta, fp))
    diff = [k for k in fp if json.dumps(meta.get(k), default=str) != json.dumps(fp[k],
                                                                               default=str)]
    if diff:
      raise ValueError(f"the checkpoint in {directory!r} was written with other settings "
                       f"({', '.join(diff)}): resuming would run another clock. Restore it with "
                       "the settings it was saved with.")
    template = self.init(params, key)
    savable = dataclasses.replace(
        template, server=dataclasses.replace(template.server,
                                             key=jax.random.key_data(template.server.key)))
    saved = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        jax.tree.map(np.asarray, savable))))["state"]
    mngr.close()
    state = dataclasses.replace(saved, server=dataclasses.replace(
        saved.server, key=jax.random.wrap_key_data(jnp.asarray(saved.server.key),
                                                   impl=jax.random.key_impl(key))))
    state = jax.tree.map(jnp.asarray, state)
    self._sync_scheduler(state)
    return state


def _digest(a: np.ndarray) -> str:
  import hashlib

  return hashlib.sha256(np.ascontiguousarray(a, np.float64).tobytes()).hexdigest()[:16]


# -- FedScale traces (its pickle formats, read by fedjax_sim.systems) ------------------------------
def fedscale_timing(capacity: dict, *, batch_size: int, local_steps, model_kbits: float,
                    augmentation_factor: float = 3.0, **timing):
  """An asynchronous :class:`fedjax_sim.asynchronous.Timing` from FedScale capacities.

  FedScale's completion time: ``augmentation_factor * batch_size * local_steps * ms / 1000``
  seconds of compute (forward latency x 3 for the backward pass) plus
  ``(upload + download) / kbps`` of communication.

  Args:
    capacity: from :func:`fedjax_sim.systems.load_fedscale_capacity`.
    batch_size: examples per local step.
    local_steps: local steps (an int or per client).
    model_kbits: the model's size in kbit (one download and one upload).
    augmentation_factor: FedScale's 3.0.
    **timing: other ``Timing`` fields (``jitter``, ``availability``, ``retry_seconds``).

  Returns:
    the :class:`~fedjax_sim.asynchronous.Timing`.
  """
  _v.positive_int("batch_size", batch_size)
  _v.positive("model_kbits", model_kbits)
  steps_per_second = 1000.0 / (augmentation_factor * batch_size * capacity["ms_per_sample"])
  return Timing(steps_per_second=steps_per_second, local_steps=local_steps,
                comm_seconds=2.0 * model_kbits / capacity["kbps"], **timing)


def load_fedscale_behavior(path: str, num_clients: int, *, client_ids=None):
  """Reads FedScale's ``client_behave_trace`` pickle into an availability model.

  Args:
    path: the pickle.
    num_clients: the population size (client ``i`` gets the trace's ``i``-th smallest key).
    client_ids: optional trace key per population client.

  Returns:
    a :class:`fedjax_sim.asynchronous.Availability`: client ``i`` may start at ``t`` when
    ``active[j] <= t % finish_time <= inactive[j]`` for some ``j`` (FedScale's ``is_active``).
  """
  rows = _systems.fedscale_rows(path, num_clients, client_ids, "behaviour")
  client, start, end, period = [], [], [], []
  for i, r in enumerate(rows):
    try:
      a, b, fin = list(r["active"]), list(r["inactive"]), float(r["finish_time"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path}: every entry needs 'active', 'inactive' and 'finish_time' "
                       f"({e}).") from e
    if len(a) != len(b):
      raise ValueError(f"{path}: client {i} has {len(a)} active but {len(b)} inactive times.")
    client += [i] * len(a)
    start += a
    end += b
    period += [fin] * len(a)
  return Availability(np.asarray(client, np.int64), np.asarray(start, np.float64),
                      np.asarray(end, np.float64), num_clients,
                      period=np.asarray(period, np.float64))
