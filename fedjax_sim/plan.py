"""What a round is given: the frozen :class:`RoundPlan` (with its speed-only
:class:`Performance`), the :class:`ServerState` and :func:`initial_state`.

These are values: the pure round (:mod:`fedjax_sim.core`) reads them, the host wing
(:mod:`fedjax_sim.runs`) assembles the plan (:func:`fedjax_sim.runs.planning.plan`, the only
place one is built from a configuration), identifies it and stores the state. Import them from
:mod:`fedjax_sim.core`, which re-exports them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import partition_views as _views
from fedjax_sim import sharding as _sharding
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import CyclicPoissonSampler, PoissonSampler, UniformSampler
from fedjax_sim.systems import SystemModel
from fedjax_sim.types import RoundContext

__all__ = ["Performance", "RoundPlan", "ServerState", "base_context", "initial_state"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerState:
  """Everything a run carries from round to round (a pytree; donated to each compiled step).

  Attributes:
    round: int32 scalar, rounds completed.
    params: the global model.
    opt_state: the server optimizer's state.
    agg_state: ``(per_client_state, post_state)`` of the aggregator process.
    client_states: per-client persistent state for the whole population (leading dim
      ``num_clients``), or ``()`` for stateless algorithms.
    key: the run's typed PRNG key; round ``r`` uses ``fold_in(key, r)``.
    server_extra: server-side algorithm state (``Algorithm.server_extra_init``), or ``()``.
    agg_client_states: per-client state of the aggregator's per-client stages for the whole
      population (e.g. top-k error feedback), or ``()``.
  """

  round: jax.Array
  params: Any
  opt_state: Any
  agg_state: Any
  client_states: Any
  key: jax.Array
  server_extra: Any = ()
  agg_client_states: Any = ()


@dataclasses.dataclass(frozen=True)
class Performance:
  """How fast a round runs, never what it computes (like jax_privacy's ``PerformanceFlags``).

  Two plans that differ only here compute the same rounds up to float summation order, so a
  run's identity (:mod:`fedjax_sim.runs.identity`) hashes its plan with ``Performance()``.

  Attributes:
    chunk_size: clients vmapped together (a multiple of the mesh's ``clients`` axis); None: the
      whole cohort in one chunk.
    sort_by_size: order the cohort before chunking (descending), so that each chunk runs only
      the local steps its own largest client needs: by the steps each client will run this
      round when there is a system model and the algorithm carries ``planned_steps`` (the
      outcome's work fraction and step cap, drawn from the keys the clients use: stragglers
      and deadlines cut steps that size alone does not show), else by client size. Only the
      summation order depends on it.
    unbatched_single_client: a chunk of one client runs without vmap (a size-1 vmap still
      batches every op, which XLA:CPU runs slower).
    mesh: a mesh with a ``clients`` axis that each chunk is split along, or None.
    per_device_scan: with a ``mesh``, run the chunk pass inside a ``jax.shard_map`` over the
      ``clients`` axis: each device scans its share of every chunk (one client at a time, no
      batch dimension, when the share is one client and ``unbatched_single_client``) and the
      sums are reduced with one ``psum``, instead of letting the partitioner split the vmapped
      chunk. Needs the population replicated on the mesh (``population_on="device"``). What a
      :class:`~fedjax_sim.Simulation` on several host CPU devices uses
      (:mod:`fedjax_sim.host_cpu`).
    trim_last_batch: a client that runs alone (a chunk of one with
      ``unbatched_single_client``, or a device's scan of one client at a time) trains the
      partial last batch of each epoch at the smallest of a few static sizes that holds it
      (:func:`fedjax_sim.client.last_batch_sizes`: a quarter, half, three quarters of the batch)
      instead of the full batch with masked padding; the padded slots contribute exactly zero
      either way, and the kept rows' random draws are the same (partitionable threefry, jax's
      default). Compiles the local step once per size. Vmapped chunks are never trimmed.
      None (default): :func:`fedjax_sim.runs.planning.plan` decides, trimming where the local
      step is heavy enough to pay for the extra compiles (``memory.TRIM_STEP_FLOPS``),
      ``jax_threefry_partitionable`` is on and the loss traces at the smaller sizes (a loss
      written for one batch size is not trimmed; ``True`` for one is a ``ValueError`` before
      compiling); a plan built otherwise leaves None as off.
    autotune: an :class:`fedjax_sim.autotune.AutoChunk` request (``chunk_size="auto"``); then
      ``tuning`` is the measured :class:`fedjax_sim.autotune.ChunkChoice`, recorded in config.json.
  """

  chunk_size: int | None = None
  sort_by_size: bool = True
  unbatched_single_client: bool = True
  mesh: jax.sharding.Mesh | None = None
  per_device_scan: bool = False
  trim_last_batch: bool | None = None
  autotune: Any = None
  tuning: Any = None

  def __post_init__(self):  # bad values fail here, not inside a trace
    if self.chunk_size is not None and (
        not isinstance(self.chunk_size, (int, np.integer)) or isinstance(self.chunk_size, bool)
        or self.chunk_size < 1):
      raise ValueError(f"chunk_size must be a positive int or None; got "
                       f"{self.chunk_size!r}.")
    for name in ("sort_by_size", "unbatched_single_client", "per_device_scan"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}.")
    if self.trim_last_batch is not None and not isinstance(self.trim_last_batch,
                                                           (bool, np.bool_)):
      raise TypeError(f"trim_last_batch must be True, False or None (automatic); got "
                      f"{self.trim_last_batch!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class RoundPlan:
  """What a round computes, fixed before compiling (closed over, never traced).

  Build one with :func:`fedjax_sim.core.plan_for` (or let :class:`~fedjax_sim.Simulation` do
  it: :func:`fedjax_sim.runs.planning.plan`).

  Attributes:
    algorithm: the :class:`~fedjax_sim.algorithms.Algorithm`.
    sampler: ``fs.sampling.uniform(K)`` or ``fs.sampling.poisson(q, K)``.
    context: the :class:`~fedjax_sim.types.RoundContext` (population facts and the trainable
      parameters' template) handed to the aggregator stages.
    system: optional :class:`~fedjax_sim.systems.SystemModel`.
    trainable_mask: which leaves of the params train (``Algorithm.trainable`` resolved against
      the params; :mod:`fedjax_sim.partition_views`), or None: all of them.
    performance: the speed-only settings (:class:`Performance`); ``chunk_size``,
      ``sort_by_size``, ``unbatched_single_client`` and ``mesh`` read through to it.
  """

  algorithm: Algorithm
  sampler: UniformSampler | PoissonSampler
  context: RoundContext
  system: SystemModel | None = None
  trainable_mask: tuple[bool, ...] | None = None
  performance: Performance = Performance()

  def __post_init__(self):  # a public constructor: bad values fail here, not inside a trace
    if not isinstance(self.algorithm, Algorithm):
      raise TypeError(f"RoundPlan.algorithm must be an fs.algorithms.Algorithm; got "
                      f"{type(self.algorithm).__name__}.")
    check_sampler(self.sampler)
    if not isinstance(self.performance, Performance):
      raise TypeError(f"RoundPlan.performance must be an fs.core.Performance; got "
                      f"{type(self.performance).__name__}.")
    if self.mesh is not None and self.chunk_size % _sharding.mesh_size(self.mesh):
      _sharding.fit_chunk(self.chunk_size, self.cohort_size, _sharding.mesh_size(self.mesh),
                          self.chunk_size)  # raises, naming the valid chunk sizes

  chunk_size = property(lambda self: self.performance.chunk_size or self.cohort_size,
                        doc="Clients per vmapped chunk (:class:`Performance`).")
  sort_by_size = property(lambda self: self.performance.sort_by_size,
                          doc="Order the cohort by steps or size (:class:`Performance`).")
  unbatched_single_client = property(lambda self: self.performance.unbatched_single_client,
                                     doc="A one-client chunk skips vmap (:class:`Performance`).")
  mesh = property(lambda self: self.performance.mesh,
                  doc="The ``clients`` mesh, or None (:class:`Performance`).")
  per_device_scan = property(lambda self: self.performance.per_device_scan,
                             doc="Scan each device's share in a shard_map (:class:`Performance`).")

  def with_performance(self, **changes) -> RoundPlan:
    """This plan with some speed-only settings changed (``chunk_size=``, ``mesh=``, ...).

    Returns:
      A new plan; what it computes is unchanged.
    """
    return dataclasses.replace(self, performance=dataclasses.replace(self.performance, **changes))

  @property
  def cohort_size(self) -> int:
    """The static cohort capacity ``K``."""
    return self.sampler.max_cohort_size

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.cohort_size / self.chunk_size)

  def views(self, params):
    """``(trainable_view, frozen_view)`` of ``params``; ``(params, None)`` without a mask."""
    if self.trainable_mask is None:
      return params, None
    return _views.split(params, self.trainable_mask)


def check_sampler(sampler, name: str = "RoundPlan.sampler") -> None:
  """The one sampler check (``Simulation``, :func:`base_context` and :class:`RoundPlan`)."""
  if not isinstance(sampler, (UniformSampler, PoissonSampler, CyclicPoissonSampler)):
    raise TypeError(f"{name} must be fs.sampling.uniform(...) or poisson(...); got {sampler!r}.")


def base_context(sampler, population: Population) -> RoundContext:
  """The population's facts for the aggregator stages (no params template yet)."""
  check_sampler(sampler)
  return RoundContext(
      expected_cohort_size=sampler.expected_cohort_size(population.num_clients),
      num_clients=population.num_clients,
      client_sizes=np.asarray(population.num_examples),
      max_cohort_size=sampler.max_cohort_size,
  )


def _per_client(one, num_clients: int):
  return jax.tree.map(lambda x: jnp.tile(x[None], (num_clients,) + (1,) * x.ndim), one)


def initial_state(plan: RoundPlan, params: Any, key: jax.Array) -> ServerState:
  """The state before round 0 (pure; :func:`fedjax_sim.sweep` traces it per lane).

  Args:
    plan: the round plan.
    params: the initial global model.
    key: the run's typed key.

  Returns:
    A :class:`ServerState` at round 0. The optimizer, aggregator and per-client states live on
    the trainable view of ``params``; per-client states are tiled over the population.
  """
  algo = plan.algorithm
  num_clients = plan.context.num_clients
  key = jax.random.wrap_key_data(jnp.array(jax.random.key_data(key)))  # a private copy
  train, _ = plan.views(params)
  client_states = () if algo.client_state_init is None else _per_client(
      algo.client_state_init(train), num_clients)
  stage = algo.aggregator.per_client
  agg_client_states = () if stage.client_init is None else _per_client(
      stage.client_init(train), num_clients)
  return ServerState(
      round=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=algo.server_optimizer.init(train),
      agg_state=algo.aggregator.init(train),
      client_states=client_states,
      key=key,
      server_extra=() if algo.server_extra_init is None else algo.server_extra_init(train),
      agg_client_states=agg_client_states,
  )
