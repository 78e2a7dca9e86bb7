"""The fused round: sample, train the cohort (vmapped in chunks), aggregate, update the server.

One round is ONE compiled XLA program; :meth:`Simulation.run` puts blocks of rounds inside one
``lax.scan``. Client training is ``algorithm.client_update`` for ONE client, vmapped here and
nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import _validation as _v
from fedjax_sim import checkpoint as _ckpt
from fedjax_sim import host_cpu as _host_cpu
from fedjax_sim import host_population as _host
from fedjax_sim import memory as _memory
from fedjax_sim import nonfinite as _nf
from fedjax_sim import run_dir as _run_dir
from fedjax_sim import sharding as _sharding
from fedjax_sim.aggregators import ADDS_NOISE, CAPS_WEIGHTS, LOCAL_NOISE, global_norm
from fedjax_sim.algorithms import Algorithm, _partition
from fedjax_sim.client import LATE, NUM_STEPS, ClientData
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import PoissonSampler, UniformSampler
from fedjax_sim.systems import SystemModel
from fedjax_sim.types import MASK_KEY, RoundContext, WeightedUpdate


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


def _param_count(params) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def default_memory_budget(reserved_bytes: int = 0) -> int:
  """Bytes the client pass may use: 256 MiB on CPU; on an accelerator half of the memory left
  after ``reserved_bytes`` (population and state; :func:`fedjax_sim.memory.device_memory_budget`).
  """
  return _memory.device_memory_budget(reserved_bytes)


#: Chunks of one client run the client unbatched (no vmap); False restores the size-1 vmap.
UNBATCHED_SINGLE_CLIENT = True
#: On CPU, a chunk is sized so that one vmapped local step does about this many FLOPs.
CPU_STEP_FLOPS = 1e6


def auto_chunk_size(
    cohort_size: int,
    num_params: int,
    example_bytes: int,
    batch_size: int,
    memory_budget: int,
    platform: str = "cpu",
    frozen_params: int = 0,
) -> int:
  """Clients per vmapped chunk.

  Memory bound (every backend): one client in flight holds ~8 copies of the parameters (local
  params, gradient, optimizer state, delta, loop carries) plus its batch with activations
  (estimated as 4x the input bytes); the chunk fits in ``memory_budget``.

  CPU: XLA:CPU runs a single client's matmuls on all cores but a vmapped (batched) matmul slower
  (measured on the 2-core CI machine, EMNIST-shaped workloads, cohort 100: dense model 633
  client-updates/s at 1 client per chunk, 470 at 2, 429 at 4; logistic 2050 at 1, 1518 at 4,
  1058 at 17). Batching only pays when a step is too small to keep the cores busy (digits MLP,
  227 kFLOP per step: 8.1k client-updates/s at 1, 16.1k at 5). So on CPU the chunk is sized to
  about ``CPU_STEP_FLOPS`` per vmapped step, estimated as ``6 * params * batch_size`` per client.

  Frozen parameters (``trainable=``; ``frozen_params`` of the ``num_params``) are held once for
  the whole chunk, not per client: they take ``4 * frozen_params`` bytes off the budget.

  The number of chunks is then balanced so that padded slots are fewer than the chunks.
  """
  per_client = 8 * 4 * (num_params - frozen_params) + 4 * example_bytes * batch_size
  budget = max(memory_budget - 4 * frozen_params, 0)
  chunk = max(1, min(cohort_size, budget // max(per_client, 1)))
  if platform == "cpu":
    step_flops = 6.0 * num_params * batch_size
    chunk = max(1, min(chunk, int(round(CPU_STEP_FLOPS / max(step_flops, 1.0)))))
  num_chunks = math.ceil(cohort_size / chunk)
  return math.ceil(cohort_size / num_chunks)


class Simulation:
  """Runs a federated :class:`~fedjax_sim.algorithms.Algorithm` on a :class:`Population`.

  Args:
    algorithm: what to run (``fs.algorithms.fedavg(...)``, ...).
    population: the clients' data.
    cohort_size: K for uniform sampling without replacement (shorthand for
      ``sampler=fs.sampling.uniform(K)``).
    sampler: a sampler object (``fs.sampling.uniform`` / ``fs.sampling.poisson``); exactly one
      of ``cohort_size`` and ``sampler``.
    chunk_size: clients vmapped together. Default: chosen from ``memory_budget`` and the model
      size. *Changing this must not change results beyond float tolerance* (speed only).
    memory_budget: bytes for the client pass when ``chunk_size`` is None.
    sort_by_size: order the cohort by client size before chunking so that each chunk runs only
      as many steps as its largest client needs. Speed only, like ``chunk_size``.
    system: optional :class:`fedjax_sim.systems.SystemModel` (availability, dropout, stragglers,
      deadlines), applied in-jit each round.
    mesh: a :class:`jax.sharding.Mesh` with a ``clients`` axis
      (:func:`fedjax_sim.sharding.clients_mesh`): each chunk's clients are split across its
      devices, sums reduce across them, the server state is replicated and per-client state is
      sharded along ``clients``. The chunk size must be a multiple of the axis size (an
      automatic one is rounded up; padded slots are masked). Default None: one device (the
      default device), no partitioning. *Changing this must not change results beyond float
      tolerance* (speed only).
    population_on: ``"device"`` (default): every example on the device (on every device of
      the mesh). ``"sharded"`` (with a mesh): the examples are split along the ``clients`` axis,
      each device holding ``1/n`` of them (a client's batch is gathered across devices in the
      program). ``"host"``: examples stay in host memory and each round's cohort is gathered on
      the host ahead of time (double-buffered, overlapped with the previous block;
      :mod:`fedjax_sim.host_population`), for populations larger than device memory. All give
      the same results.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
    >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 20, 200))
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])
    >>> algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.5), batch_size=8,
    ...                             local_epochs=1)
    >>> sim = fs.Simulation(algo, pop, cohort_size=5)
    >>> state = sim.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, jax.random.key(0))
    >>> state, metrics = sim.run(state, num_rounds=20)
    >>> bool(metrics["loss"][-1] < metrics["loss"][0])
    True
  """

  def __init__(
      self,
      algorithm: Algorithm,
      population: Population,
      *,
      cohort_size: int | None = None,
      sampler: UniformSampler | PoissonSampler | None = None,
      chunk_size: int | None = None,
      memory_budget: int | None = None,
      sort_by_size: bool = True,
      system: SystemModel | None = None,
      mesh: jax.sharding.Mesh | None = None,
      population_on: str = "device",
  ):
    if not isinstance(algorithm, Algorithm):
      raise TypeError(
          f"algorithm must be an fs.algorithms.Algorithm (e.g. fs.algorithms.fedavg(...)); got "
          f"{type(algorithm).__name__}."
      )
    if not isinstance(population, Population):
      raise TypeError(
          f"population must be an fs.Population (Population.from_arrays / from_clients); got "
          f"{type(population).__name__}."
      )
    if (cohort_size is None) == (sampler is None):
      raise ValueError(
          "pass exactly one of cohort_size=K (uniform sampling without replacement) or "
          "sampler=fs.sampling.poisson(q, max_cohort_size) / fs.sampling.uniform(K)."
      )
    if sampler is None:
      sampler = UniformSampler(cohort_size)
    if not isinstance(sampler, (UniformSampler, PoissonSampler)):
      raise TypeError(f"sampler must be fs.sampling.uniform(...) or poisson(...); got {sampler!r}.")
    sampler.validate(population.num_clients)
    if chunk_size is not None and (
        not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
      raise ValueError(
          f"chunk_size must be a positive int or None (automatic); got {chunk_size!r}."
      )
    self.algorithm = algorithm
    self.population = population
    self.sampler = sampler
    self.max_cohort_size = sampler.max_cohort_size
    self.context = RoundContext(
        expected_cohort_size=sampler.expected_cohort_size(population.num_clients),
        num_clients=population.num_clients,
        client_sizes=np.asarray(population.num_examples),
        max_cohort_size=sampler.max_cohort_size,
    )
    if algorithm.aggregator.check is not None:
      algorithm.aggregator.check(self.context)
    dp_tags = {ADDS_NOISE, LOCAL_NOISE} & algorithm.aggregator.tags
    if algorithm.weight_fn is not None and dp_tags and not (
        algorithm.aggregator.reduce.weighted and CAPS_WEIGHTS in algorithm.aggregator.tags
    ):
      raise ValueError(
          "weight_fn with a DP aggregator that sums clients unweighted: the weights would be "
          "ignored, and uncapped weights would break the DP sensitivity. Use "
          "fs.aggregators.dp_mean(clip, z, weight_cap=w), which caps every weight at 1."
      )
    if algorithm.server_update is not None and dp_tags:
      raise ValueError(
          f"{algorithm.name} sends per-client values besides its update (ClientOutput.extra) that "
          "bypass the aggregator, so a DP aggregator cannot protect them; this combination is "
          "not supported. Use a non-DP aggregator, or FedAvg / FedProx for DP."
      )
    self._requested_chunk_size = None if chunk_size is None else int(chunk_size)
    self._auto_budget = memory_budget is None  # refined in init() once the state is known
    self.memory_budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    self.sort_by_size = bool(sort_by_size)
    if system is not None:
      if not isinstance(system, SystemModel):
        raise TypeError(f"system must be an fs.systems.SystemModel; got {type(system).__name__}.")
      system.validate(population.num_clients)
    self.system = system
    if mesh is None and chunk_size is None and population_on == "device":
      mesh = _host_cpu.default_mesh()  # one client per host CPU device (fedjax_sim/host_cpu.py)
    self.mesh = mesh
    self._num_shards = 1 if mesh is None else _sharding.mesh_size(mesh)
    if population_on not in ("device", "sharded", "host"):
      raise ValueError(
          f"population_on must be 'device', 'sharded' or 'host'; got {population_on!r}.")
    if population_on == "sharded" and mesh is None:
      raise ValueError(
          "population_on='sharded' splits the examples over the devices of a mesh's 'clients' "
          "axis; pass mesh=fs.sharding.clients_mesh() (or use 'device' / 'host').")
    self.population_on = population_on
    if population_on == "host":
      self.population = _host.to_host(population)
    if mesh is not None:
      _sharding.fit_chunk(1, self.max_cohort_size, self._num_shards, self._requested_chunk_size)
      self.population = _sharding.place_population(self.population, mesh, population_on)
    if self._auto_budget:
      self.memory_budget = default_memory_budget(_memory.resident_bytes(self))
    self.chunk_size: int | None = None  # resolved in init() once the model size is known
    self._trainable_mask: tuple[bool, ...] | None = None  # resolved from algorithm.trainable
    self.num_traces = {"round": 0, "block": 0}
    self._round_jit = None
    self._block_jits: dict[int, Callable] = {}

  # -- state ---------------------------------------------------------------------------------
  def init(self, params: Any, key: jax.Array) -> ServerState:
    """Validates ``params`` against the model and optimizers, and builds the initial state.

    Args:
      params: the initial global model (a pytree of float arrays).
      key: the run's key, ``jax.random.key(seed)`` (a legacy ``PRNGKey`` is accepted too).
    """
    key = _as_typed_key(key)
    params = jax.tree.map(lambda x: jnp.array(x), params)  # a private copy (state is donated)
    self._validate_params(params)
    state = self._initial_state(params, key)
    if self._auto_budget:
      self.memory_budget = default_memory_budget(_memory.resident_bytes(self, state))
    self._resolve_chunk_size(params)
    self._check_round_traces(state)
    if self.mesh is not None:
      state = dataclasses.replace(
          _sharding.put_replicated(
              dataclasses.replace(state, client_states=(), agg_client_states=()), self.mesh),
          client_states=_sharding.put_along_clients(state.client_states, self.mesh),
          agg_client_states=_sharding.put_along_clients(state.agg_client_states, self.mesh),
      )
    return state

  def _initial_state(self, params: Any, key: jax.Array) -> ServerState:
    """The state before round 0 (pure: no checks that need concrete values; fs.sweep traces it
    with traced hyper-parameters)."""
    key = jax.random.wrap_key_data(jnp.array(jax.random.key_data(key)))  # a private copy
    algo = self.algorithm
    full_params = params
    if algo.trainable is not None:
      self._trainable_mask = _partition.resolve(algo.trainable, params)
    # Optimizer, aggregator and per-client state live on the trainable view only.
    params, _ = self._views(params)
    try:
      opt_state = algo.server_optimizer.init(params)
    except Exception as e:  # noqa: BLE001
      raise ValueError(
          f"server_optimizer.init(params) failed: {e}. The server optimizer does not fit the "
          "params' structure (check masks / multi_transform labels)."
      ) from e
    if algo.client_state_init is None:
      client_states = ()
    else:
      one = algo.client_state_init(params)
      n = self.population.num_clients
      _check_population_state_fits(one, n, algo.name)
      client_states = jax.tree.map(lambda x: jnp.tile(x[None], (n,) + (1,) * x.ndim), one)
    server_extra = () if algo.server_extra_init is None else algo.server_extra_init(params)
    agg_client_states = ()
    per_client_stage = algo.aggregator.per_client
    if per_client_stage.client_init is not None:
      one = per_client_stage.client_init(params)
      n = self.population.num_clients
      _check_population_state_fits(one, n, "the aggregator's per-client stage")
      agg_client_states = jax.tree.map(lambda x: jnp.tile(x[None], (n,) + (1,) * x.ndim), one)
    self.context = self.context._replace(
        params_template=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    )
    self._check_reducer(params)
    return ServerState(
        round=jnp.zeros((), jnp.int32),
        params=full_params,
        opt_state=opt_state,
        agg_state=algo.aggregator.init(params),
        client_states=client_states,
        key=key,
        server_extra=server_extra,
        agg_client_states=agg_client_states,
    )

  def _views(self, params):
    """``(trainable_view, frozen_view)`` of ``params``; ``(params, None)`` without trainable=."""
    if self._trainable_mask is None:
      return params, None
    return _partition.split(params, self._trainable_mask)

  def _check_reducer(self, params) -> None:
    """Stacked (robust) reducers hold all K updates at once: refuse what cannot fit."""
    reduce = self.algorithm.aggregator.reduce
    num_params = _param_count(params)
    if reduce.check is not None:
      reduce.check(self.context, num_params)
    if reduce.needs_stack:
      need = self.max_cohort_size * num_params * 4
      if need > self.memory_budget:
        raise ValueError(
            f"this aggregator needs every client's update at once (a [K, P] buffer: robust "
            f"rules and omniscient attacks are not sums, so they cannot stream across chunks or "
            f"devices); K={self.max_cohort_size} x P={num_params} floats = "
            f"{need / 2**30:.2f} GiB exceeds memory_budget={self.memory_budget / 2**30:.2f} "
            "GiB. Use a smaller cohort, raise memory_budget, or a streaming defence "
            "(fs.aggregators.norm_bounded_mean, which is a sum of clipped updates)."
        )

  def _validate_params(self, params) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
      raise ValueError("params is empty; pass the model's parameter pytree.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(
            f"params{jax.tree_util.keystr(path)} has dtype {leaf.dtype}; trainable parameters "
            "must be floating point."
        )
      bad = int(leaf.size - jnp.count_nonzero(jnp.isfinite(leaf)))
      if bad:
        raise ValueError(
            f"params{jax.tree_util.keystr(path)} has {bad} non-finite values (NaN or Inf); "
            "initialize the model with finite values (e.g. module.init(key, x))."
        )

  def _batch_spec(self):
    loss_batch = self.algorithm.batch_size_hint
    bsz = self.population.max_examples if loss_batch is None else loss_batch
    spec = {
        k: jax.ShapeDtypeStruct((bsz, *v.shape), v.dtype)
        for k, v in self.population.example_spec().items()
    }
    spec[MASK_KEY] = jax.ShapeDtypeStruct((bsz,), jnp.float32)
    return bsz, spec

  def _check_round_traces(self, state: ServerState) -> None:
    """Abstract-evaluates the loss and one round to turn shape errors into clear messages."""
    algo = self.algorithm
    bsz, spec = self._batch_spec()
    check = getattr(algo.loss_fn, "check_population", None)
    if check is not None:  # the library's own checks name the feature: before the loss trace
      check(state.params, self.population)
    if algo.loss_fn is not None:
      try:
        out = jax.eval_shape(algo.loss_fn, state.params, spec, jax.random.key(0))
      except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"loss_fn(params, batch, key) failed on a batch of this population (features "
            f"{ {k: v.shape for k, v in spec.items()} }) with these params: {e}"
        ) from e
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("loss_fn must return a pair (loss, aux); return (loss, {}) for no aux.")
      loss, _ = out
      if getattr(loss, "shape", None) != ():
        raise ValueError(
            f"loss_fn must return a scalar loss (the mean over the real examples of the batch); "
            f"it returned shape {getattr(loss, 'shape', type(loss))}. Reduce it with "
            "fs.models.masked_mean(per_example_loss, batch[fs.MASK_KEY])."
        )
    train_params, _ = self._views(state.params)
    if algo.client_optimizer is not None:
      try:
        opt_state = jax.eval_shape(algo.client_optimizer.init, train_params)
        jax.eval_shape(algo.client_optimizer.update, train_params, opt_state, train_params)
      except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"client_optimizer does not fit the params' structure: {e}"
        ) from e
    try:
      jax.eval_shape(
          algo.server_optimizer.update, train_params, state.opt_state, train_params
      )
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"server_optimizer does not fit the params' structure: {e}") from e

  def _resolve_chunk_size(self, params) -> None:
    k = self.max_cohort_size
    if self._requested_chunk_size is not None:
      chunk = self._requested_chunk_size
      if self._num_shards == 1:
        chunk = min(chunk, k)
    else:
      bsz, spec = self._batch_spec()
      example_bytes = sum(
          int(np.prod(v.shape[1:])) * np.dtype(v.dtype).itemsize for v in spec.values()
      )
      # The budget is per device: with a mesh each device holds chunk / num_shards clients.
      chunk = self._num_shards * auto_chunk_size(
          -(-k // self._num_shards), _param_count(params), example_bytes, bsz,
          self.memory_budget, _memory.default_device().platform,
          frozen_params=_param_count(self._views(params)[1]),
      )
    self.chunk_size = _sharding.fit_chunk(
        chunk, k, self._num_shards, self._requested_chunk_size
    )

  # -- the round -----------------------------------------------------------------------------
  def _sample_cohort(self, key: jax.Array, round_: jax.Array, num_clients: int):
    """Round ``round_``'s cohort and availability mask (None without a system model).

    A pure function of (run key, round): the round step and the host-side prefetcher
    (``population_on="host"``) draw the same cohort from it.
    """
    round_key = jax.random.fold_in(key, round_)
    cohort_key = jax.random.split(round_key, 3)[0]
    # System heterogeneity draws from its own key (a fold of the round key).
    system_key = jax.random.fold_in(round_key, 0x5157E)
    available = None
    if self.system is not None:
      available = self.system.available(jax.random.fold_in(system_key, 0), round_, num_clients)
    return self.sampler.sample(cohort_key, num_clients, available), available

  def _round_step(self, state: ServerState, population: Population, halt=False):
    """One federated round, traced into the caller's program (pure).

    A non-finite round (:mod:`fedjax_sim.nonfinite`) keeps the server state; with ``halt`` (a
    traced bool, ``on_nonfinite="raise"``) it returns the input state unchanged, round included.
    """
    algo = self.algorithm
    process = algo.aggregator
    context = self.context
    num_clients = population.num_clients
    chunk = self.chunk_size
    k = self.max_cohort_size
    num_chunks = math.ceil(k / chunk)

    round_key = jax.random.fold_in(state.key, state.round)
    _, client_key, agg_key = jax.random.split(round_key, 3)
    per_client_key, post_key, finalize_key = jax.random.split(agg_key, 3)
    # Public per-round randomness shared by all clients and the server (rotations, SecAgg seeds).
    shared_key = jax.random.fold_in(round_key, 0x5EED)
    system_key = jax.random.fold_in(round_key, 0x5157E)
    cohort, available = self._sample_cohort(state.key, state.round, num_clients)
    ids, real = cohort.ids, cohort.mask
    if self.sort_by_size:  # big clients together: each chunk runs only the steps it needs
      sizes = jnp.where(real, population.num_examples[ids], -1)
      order = jnp.argsort(-sizes, stable=True)
      ids, real = ids[order], real[order]
    pad = num_chunks * chunk - k
    if pad:
      ids = jnp.concatenate([ids, jnp.zeros((pad,), jnp.int32)])
      real = jnp.concatenate([real, jnp.zeros((pad,), bool)])
    slot_ids, slot_real = ids, real
    context = context._replace(shared_key=shared_key, cohort_ids=slot_ids, cohort_mask=slot_real)
    ids = ids.reshape(num_chunks, chunk)
    real = real.reshape(num_chunks, chunk)
    per_client_state, post_state = state.agg_state
    # trainable=: the algorithm sees the trainable view; the frozen view goes to every client of
    # a chunk once (an unbatched argument of the vmapped client function).
    train_params, frozen = self._views(state.params)
    broadcast = (
        train_params if algo.broadcast_fn is None
        else algo.broadcast_fn(train_params, state.server_extra)
    )
    if frozen is not None:
      broadcast = _partition.FinetuneBroadcast(broadcast, frozen)

    system = self.system

    stacked = process.reduce.needs_stack

    def one_client(cid, is_real, client_state, broadcast):
      client_state, agg_client_state = client_state
      selected = is_real
      if system is not None:
        outcome = system.after_selection(jax.random.fold_in(system_key, 1), cid[None])
        outcome = jax.tree.map(lambda x: x[0], outcome)
        is_real = is_real & outcome.kept  # a dropped client's update is lost (it trains nothing)
        work_fraction, step_cap = outcome.work_fraction, outcome.step_cap
      else:
        work_fraction, step_cap = jnp.float32(1.0), jnp.int32(2**30)
      # A client without examples does not participate (the one definition, for every reducer
      # and the `clients` count; fs.Population documents it).
      is_real = is_real & (population.num_examples[cid] > 0)
      data = ClientData(
          population.features,
          population.offsets[cid],
          jnp.where(is_real, population.num_examples[cid], 0),
          population.max_examples,
          work_fraction,
          step_cap,
      )
      key = jax.random.fold_in(client_key, cid)
      out = algo.client_update(broadcast, data, client_state, key)
      if algo.weight_fn is not None:
        w = algo.weight_fn(data.num_examples.astype(jnp.float32), out.metrics, cid)
        out = out._replace(weight=jnp.maximum(jnp.asarray(w, jnp.float32), 0.0))
      late = is_real & (jnp.asarray(out.metrics.get(LATE, 0.0)) > 0)
      if system is not None and system.deadline_policy == "drop":
        is_real = is_real & ~late
      # A non-finite update has a non-finite norm: the same reduction clip_l2 computes, so XLA
      # shares it and the check costs no extra pass over the update. (An update whose squared
      # norm overflows float32, i.e. entries beyond ~1e19, is treated as non-finite too.)
      finite = jnp.isfinite(global_norm(out.delta)) & jnp.isfinite(out.weight)
      real = is_real & finite
      real_f = real.astype(jnp.float32)
      update, _, stage_metrics = process.per_client.aggregate(
          WeightedUpdate(out.delta, out.weight, agg_client_state), per_client_state,
          jax.random.fold_in(per_client_key, cid), context._replace(client_id=cid),
      )
      new_agg_client_state = update.client_state
      update = update._replace(client_state=())
      # Zero (select, never multiply: NaN * 0 is NaN) everything a dropped client produced.
      contribution = jax.tree.map(
          lambda c: jnp.where(real, c, jnp.zeros_like(c)),
          update if stacked else process.reduce.contribute(update, real_f),
      )
      n = data.num_examples.astype(jnp.float32) * real_f
      client_metrics = {
          name: jnp.where(real, m * n, 0.0)
          for name, m in out.metrics.items() if name not in (NUM_STEPS, LATE)
      }
      stage_metrics = jax.tree.map(lambda m: jnp.where(real, m, 0.0), stage_metrics)
      steps = jnp.asarray(out.metrics.get(NUM_STEPS, 0.0), jnp.float32) * is_real
      stats = {
          "clients": real_f,
          "examples": n,
          "nan_clients": (is_real & ~finite).astype(jnp.float32),
          "client_steps": steps,
      }
      if system is not None:
        stats["dropped"] = (selected & ~outcome.kept).astype(jnp.float32)
        stats["stragglers"] = (selected & outcome.kept & outcome.straggler).astype(jnp.float32)
        stats["late"] = late.astype(jnp.float32)
      extra = jax.tree.map(lambda e: jnp.where(real, e, jnp.zeros_like(e)), out.extra)
      return ((contribution, client_metrics, stage_metrics, stats, extra),
              (out.client_state, new_agg_client_state), real)

    if chunk == 1 and UNBATCHED_SINGLE_CLIENT:
      # A vmap over ONE client still batches every op (size-1 batch dimension: batched GEMMs,
      # grouped convolutions), which XLA:CPU runs slower (benchmarks/chunk1.py); run it plain.
      def vmapped(*args):
        out = one_client(*jax.tree.map(lambda x: x[0], args[:3]), args[3])
        return jax.tree.map(lambda x: jnp.asarray(x)[None], out)
    else:
      vmapped = jax.vmap(one_client, in_axes=(0, 0, 0, None))

    # The cohort's persistent states are gathered once (O(K x state)), streamed through the
    # chunk loop as inputs/outputs, and scattered back once per round: carrying the whole
    # population state through the loop would copy it per chunk (round time ~ population).
    cohort_states = jax.tree.map(
        lambda s: s[ids], (state.client_states, state.agg_client_states)
    )

    def chunk_body(acc, xs):
      cids, creal, cstates = _sharding.constrain(xs, self._chunk_sharding())  # split over devices
      outputs, new_cstates, kept = vmapped(cids, creal, cstates, broadcast)
      per_client_updates = outputs[0]
      if stacked:  # keep every update (robust rules); sum the rest
        outputs = ((),) + tuple(outputs[1:])
      summed = jax.tree.map(lambda x: jnp.sum(x, axis=0), outputs)
      summed[3]["step_slots"] = chunk * jnp.max(outputs[3]["client_steps"])
      ys = (new_cstates, kept, per_client_updates if stacked else ())
      return jax.tree.map(jnp.add, acc, summed), ys

    acc0 = jax.tree.map(
        lambda s: jnp.zeros(s.shape[1:], s.dtype),
        jax.eval_shape(
            lambda: _summable(vmapped(ids[0], real[0], jax.tree.map(lambda s: s[0],
                                                                     cohort_states),
                                      broadcast), stacked)
        ),
    )
    acc, (new_states, kept, stack) = jax.lax.scan(
        chunk_body, acc0, (ids, real, cohort_states)
    )
    reduced, client_sums, stage_sums, stats, extra_sums = acc
    kept_flat = kept.reshape(-1)
    reduce_metrics = {}
    if stacked:
      reduced, reduce_metrics = _reduce_stack(
          process.reduce, jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), stack),
          kept_flat, slot_ids, jax.random.fold_in(post_key, 0x57AC), context,
      )
    aggregated, post_state, post_metrics = process.post.aggregate(
        reduced, post_state, post_key,
        context._replace(per_client_state=per_client_state, cohort_kept=kept_flat),
    )
    finalize_metrics = {}
    if process.per_client.finalize is not None:
      per_client_state, finalize_metrics = process.per_client.finalize(
          per_client_state, stage_sums, finalize_key, context
      )
    server_delta, server_extra = aggregated.delta, state.server_extra
    if algo.server_update is not None:
      server_delta, server_extra = algo.server_update(
          aggregated.delta, extra_sums, state.server_extra,
          {"clients": stats["clients"], "examples": stats["examples"]}, context,
      )
    updates, opt_state = algo.server_optimizer.update(
        server_delta, state.opt_state, train_params
    )
    new_params = optax.apply_updates(train_params, updates)
    if ADDS_NOISE not in process.tags:
      # No client took part (possible under Poisson sampling): keep the server unchanged. Under
      # DP the noisy update is always applied, so an empty cohort is not revealed.
      took_part = stats["clients"] > 0
      new_params = jax.tree.map(lambda a, b: jnp.where(took_part, a, b), new_params, train_params)
      opt_state = jax.tree.map(lambda a, b: jnp.where(took_part, a, b), opt_state, state.opt_state)
      server_extra = jax.tree.map(
          lambda a, b: jnp.where(took_part, a, b), server_extra, state.server_extra
      )
    # Non-finite rounds (fedjax_sim.nonfinite): the server step is not applied.
    no_finite_client = (stats["nan_clients"] > 0) & (stats["clients"] == 0)
    state_ok = _nf.stays_finite((new_params, opt_state), (train_params, state.opt_state))
    nonfinite = ~state_ok | no_finite_client
    discard = ~state_ok | (halt & no_finite_client)
    keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(discard, b, a), new, old)
    new_params = keep_old(new_params, train_params)  # the trainable view (all of it by default)
    opt_state = keep_old(opt_state, state.opt_state)
    server_extra = keep_old(server_extra, state.server_extra)
    per_client_state, post_state = keep_old((per_client_state, post_state), state.agg_state)
    client_states, agg_client_states = state.client_states, state.agg_client_states
    if client_states != () or agg_client_states != ():
      # Padded slots (which may repeat a real id), clients whose update was non-finite (or was
      # dropped) and every client of a discarded round write out of bounds and are dropped:
      # their state is unchanged.
      write = jnp.where(kept & ~discard, ids, num_clients).reshape(-1)
      client_states, agg_client_states = jax.tree.map(
          lambda s, new: s.at[write].set(new.reshape(-1, *new.shape[2:]), mode="drop"),
          (client_states, agg_client_states), new_states,
      )
    # Averages over nothing are NaN (nothing was measured), not 0.
    has_examples = stats["examples"] > 0
    has_clients = stats["clients"] > 0
    examples = jnp.maximum(stats["examples"], 1.0)
    clients = jnp.maximum(stats["clients"], 1.0)
    metrics = {
        "clients": stats["clients"],
        "examples": stats["examples"],
        "nan_clients": stats["nan_clients"],
        "truncated": cohort.truncated.astype(jnp.float32),
        **({} if self.system is None else {
            "available": jnp.sum(available).astype(jnp.float32),
            "dropped": stats["dropped"], "stragglers": stats["stragglers"],
            "late": stats["late"],
        }),
        "update_norm": global_norm(server_delta),
        "client_steps": stats["client_steps"],
        "step_slots": stats["step_slots"],
        _nf.NONFINITE: nonfinite.astype(jnp.float32),
    }
    metrics.update({k: jnp.where(has_examples, v / examples, jnp.nan)
                    for k, v in client_sums.items()})
    metrics.update({k: jnp.where(has_clients, v / clients, jnp.nan)
                    for k, v in stage_sums.items()})
    metrics.update(reduce_metrics)
    metrics.update(post_metrics)
    metrics.update(finalize_metrics)
    if frozen is not None:  # the frozen leaves are the incoming buffers, unchanged
      new_params = _partition.merge(new_params, frozen)
    new_state = ServerState(
        round=state.round + jnp.where(halt & nonfinite, 0, 1).astype(state.round.dtype),
        params=new_params,
        opt_state=opt_state,
        agg_state=(per_client_state, post_state),
        client_states=client_states,
        key=state.key,
        server_extra=server_extra,
        agg_client_states=agg_client_states,
    )
    return new_state, metrics

  # -- compiled entry points -----------------------------------------------------------------
  def _chunk_sharding(self):
    """Sharding of one chunk's per-client arrays: split along ``clients`` (None: no mesh)."""
    return None if self.mesh is None else _sharding.along_clients(self.mesh)

  def _placed(self, state: ServerState, metrics):
    """Output placement: replicated server state and metrics, client states along clients."""
    if self.mesh is None:
      return state, metrics
    rep = _sharding.replicated(self.mesh)
    n = self._num_shards
    client_states, agg_client_states = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x, _sharding.along_clients(self.mesh) if x.shape[0] % n == 0 else rep),
        (state.client_states, state.agg_client_states),
    )
    state = dataclasses.replace(
        _sharding.constrain(
            dataclasses.replace(state, client_states=(), agg_client_states=()), rep),
        client_states=client_states,
        agg_client_states=agg_client_states,
    )
    return state, _sharding.constrain(metrics, rep)

  def _round_fn(self):
    if self._round_jit is None and self.population_on == "host":
      self._round_jit = _host.HostFeeder(self, None)
    if self._round_jit is None:

      def step(state, population):
        self.num_traces["round"] += 1
        return self._placed(*self._round_step(state, population))

      self._round_jit = jax.jit(step, donate_argnums=0)
    return self._round_jit

  def _block_fn(self, block: int):
    if block not in self._block_jits and self.population_on == "host":
      self._block_jits[block] = _host.HostFeeder(self, block)
    if block not in self._block_jits:

      def run_block(state, population, num_active, halt):
        self.num_traces["block"] += 1

        def body(carry, i):
          state, halted = carry
          state, metrics = jax.lax.cond(
              (i < num_active) & ~halted,
              lambda s: self._round_step(s, population, halt),
              lambda s: (s, skipped_metrics),
              state,
          )
          return (state, halted | (halt & (metrics[_nf.NONFINITE] > 0))), metrics

        _, metric_shapes = jax.eval_shape(self._round_step, state, population)
        skipped_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (state, _), metrics = jax.lax.scan(body, (state, jnp.bool_(False)), jnp.arange(block))
        return self._placed(state, metrics)

      self._block_jits[block] = jax.jit(run_block, donate_argnums=0)
    return self._block_jits[block]

  def _check_state(self, state) -> None:
    if not isinstance(state, ServerState):
      raise TypeError(
          f"state must be the ServerState from sim.init(...); got {type(state).__name__}."
      )
    _v.not_donated("state", state)
    if self.chunk_size is None and self.mesh is None:
      self._adopt(state)
    if self.chunk_size is None:
      raise ValueError(
          "call sim.init(params, key) first; it fixes the chunk size and checks shapes."
      )

  def _adopt(self, state: ServerState) -> None:
    """A state from another Simulation of the same configuration (e.g. rebuilt in a new
    session): run init's checks on it, refusing a state whose structure does not match."""
    self._validate_params(state.params)
    template = self._initial_state(state.params, state.key)
    def signature(t):
      t = dataclasses.replace(t, key=None)
      return jax.tree.structure(t), [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(t)]

    if signature(template) != signature(state):
      raise ValueError(
          "state does not match this Simulation (its optimizer, aggregator or client state has "
          "another structure or shape); build it with this sim.init(params, key) or "
          "sim.restore(...)."
      )
    self._resolve_chunk_size(state.params)
    self._check_round_traces(state)

  def round(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
    """Runs one round (one compiled step; ``state`` is donated). Returns host-side metrics."""
    self._check_state(state)
    state, metrics = self._round_fn()(state, self.population)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  def run(
      self,
      state: ServerState,
      num_rounds: int,
      *,
      block_size: int | None = None,
      eval_every: int | None = None,
      eval_fn: Callable[[Any], dict[str, float]] | None = None,
      callback: Callable[[int, dict[str, np.ndarray]], None] | None = None,
      delta: float | None = None,
      checkpoint_dir: str | None = None,
      checkpoint_every: int | None = None,
      log_dir: str | None = None,
      progress: bool = False,
      tensorboard: bool = False,
      accountant: str = "rdp",
      overwrite: bool = False,
      settings: dict[str, Any] | None = None,
      on_nonfinite: str = "raise",
  ) -> tuple[ServerState, dict[str, np.ndarray]]:
    """Runs ``num_rounds`` rounds, ``block_size`` at a time inside one ``lax.scan``.

    The host is visited only between blocks (for ``eval_fn`` and ``callback``). One compilation
    serves every block (a shorter last block skips its extra rounds in-graph).

    Args:
      state: from :meth:`init` or a previous run (donated: do not reuse the object passed in).
      num_rounds: rounds to run.
      block_size: rounds per compiled block; default ``eval_every`` or ``min(num_rounds, 100)``.
      eval_every: evaluate every this many rounds (must divide into blocks; sets the default
        ``block_size``).
      eval_fn: ``eval_fn(params) -> dict of floats``, called on the host after rounds that are
        multiples of ``eval_every`` and after the last round.
      callback: ``callback(rounds_done, block_metrics)`` after each block (progress, logging).
      delta: for a central-DP aggregator (``dp_mean``, ``adaptive_dp_mean``), report the
        user-level ε spent so far at this δ as ``metrics["epsilon"]`` (and in each block's
        callback), computed on the host for the sampler actually used (``fs.privacy``).
      checkpoint_dir: the run owns this directory (:mod:`fedjax_sim.run_dir`): another run's
        checkpoints there are refused (unless ``overwrite``); this run's steps after its start
        round (a rollback) are deleted with a warning; an unwritable directory or a state orbax
        cannot save is refused before the first round. Saves the state there (orbax) after
        blocks that end on a multiple of
        ``checkpoint_every`` rounds (default: every block), at the end, and when SIGINT or
        SIGTERM arrives (the current block finishes first; then
        :class:`~fedjax_sim.checkpoint.SimulationInterrupted` is raised). Resume with
        :meth:`restore`: the continuation is bit-identical to an uninterrupted run.
      checkpoint_every: rounds between checkpoints (a multiple of ``block_size`` is exact).
      log_dir: append every round's metrics, and the ``eval_*`` results of evaluated rounds, to
        ``<log_dir>/metrics.jsonl`` (with the config hash; ``config.json`` records the
        fingerprint, versions, run key, ``settings`` and each session). Owned like
        ``checkpoint_dir``: another run's log is refused unless ``overwrite``; this run's rows
        after its start round are dropped.
      tensorboard: with ``log_dir``, also write TensorBoard event files there (tensorboardX).
      progress: show progress per block: a tqdm bar (loss, accuracy, ε, client-updates/s of
        the clients that took part) on a terminal, one plain line per block otherwise (CI logs).
      accountant: ``"rdp"`` or ``"pld"``, the accountant behind ``metrics["epsilon"]``.
      overwrite: delete another run's checkpoints / log in ``checkpoint_dir`` / ``log_dir``
        (explicitly, with a warning) instead of refusing them.
      settings: a JSON-able dict recorded in ``config.json`` (the CLI records its config).

      on_nonfinite: what a non-finite round does (:mod:`fedjax_sim.nonfinite`; a round whose
        server step would make the state NaN/Inf, or whose every client diverged; its server
        step is never applied). ``"raise"`` (default): stop there and raise
        :class:`~fedjax_sim.nonfinite.NonFiniteError` naming the round, with the last finite
        state and the metrics so far. ``"warn"``: skip such rounds with a warning;
        ``"ignore"``: skip them silently (``metrics["nonfinite"]`` marks them).


    Returns:
      ``(state, metrics)`` with ``metrics[name]`` a NumPy array ``[num_rounds]``; eval results
      appear as ``metrics["eval_" + name]`` (NaN where not evaluated). Averages over clients or
      examples (``loss``, ``accuracy``, ...) are NaN in a round where no client contributed.

    Raises:
      ValueError: a bad argument, or a directory this run may not use (before any round).
      fedjax_sim.checkpoint.CheckpointSaveError: a checkpoint could not be written; its ``state``
        holds the state after the completed rounds (the donated input is gone).
      fedjax_sim.nonfinite.NonFiniteError: under ``on_nonfinite="raise"``, at the first
        non-finite round.
    """
    self._check_state(state)
    policy = _nf.check_policy(on_nonfinite)
    # One integer rule (fs._validation.positive_int): Python or NumPy ints >= 1, never bools.
    num_rounds = _v.positive_int("num_rounds", num_rounds)
    eval_every = _v.positive_int("eval_every", eval_every, allow_none=True)
    block_size = _v.positive_int("block_size", block_size, allow_none=True)
    checkpoint_every = _v.positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    if eval_every is not None and eval_fn is None:
      raise ValueError("eval_every is set but eval_fn is None; pass eval_fn(params) -> dict.")
    if block_size is None:
      block_size = eval_every if eval_every is not None else min(int(num_rounds), 100)
    if eval_every is not None and eval_every % block_size and block_size % eval_every:
      raise ValueError(
          f"eval_every={eval_every} and block_size={block_size}: one must divide the other so "
          "evaluations fall between blocks."
      )
    if checkpoint_every is not None and checkpoint_dir is None:
      raise ValueError("checkpoint_every is set but checkpoint_dir is None.")
    fn = self._block_fn(block_size)
    start = int(state.round)
    if accountant not in ("rdp", "pld"):
      raise ValueError(f"accountant must be 'rdp' or 'pld'; got {accountant!r}.")
    epsilons = self._epsilons(start, num_rounds, delta, accountant)
    if checkpoint_dir is not None:
      _v.checkpointable("state", state)
    if tensorboard and not log_dir:
      raise ValueError("tensorboard=True needs log_dir (where the event files go).")
    fp = _ckpt.fingerprint(self, state) if (checkpoint_dir or log_dir) else None
    # Everything that could fail at save time is checked now, before the first round.
    if checkpoint_dir is not None:
      _run_dir.prepare_checkpoint_dir(checkpoint_dir, state, fp, overwrite=overwrite)
    log = None
    if log_dir:
      existing = _run_dir.prepare_log_dir(log_dir, fp, start, overwrite=overwrite)
      seed_info = {"run_key_data": np.asarray(jax.random.key_data(state.key)).tolist(),
                   "start_round": start}
      session = {"num_rounds": num_rounds, "block_size": block_size, "eval_every": eval_every,
                 "checkpoint_every": checkpoint_every, "delta": delta,
                 "accountant": accountant}
      log = _ckpt.MetricsLog(log_dir, fp, seed_info, tensorboard=tensorboard,
                             existing=existing, settings=settings, session=session)
    stop = _SignalFlag() if checkpoint_dir is not None else None
    bar = _Progress(num_rounds, self.max_cohort_size) if progress else None
    done = 0
    chunks: list[dict[str, np.ndarray]] = []
    evals: dict[int, dict[str, float]] = {}
    try:
      while done < num_rounds:
        active = min(block_size, num_rounds - done)
        state, block_metrics = fn(state, self.population, jnp.int32(active),
                                  jnp.bool_(policy == "raise"))
        block_metrics = {k: np.asarray(v)[:active]
                         for k, v in jax.device_get(block_metrics).items()}
        bad = _nf.first_nonfinite(block_metrics)
        if bad is not None and policy == "raise":
          self._raise_nonfinite(start + done, bad, state, block_metrics, chunks, log)
        if bad is not None and policy == "warn":
          _nf.warn(start + done, block_metrics)
        if epsilons is not None:
          block_metrics["epsilon"] = epsilons(done, done + active)
        chunks.append(block_metrics)
        done += active
        if eval_fn is not None:
          at = start + done
          due = done == num_rounds or (eval_every is not None and at % eval_every == 0)
          if due:
            evals[done - 1] = {k: float(v) for k, v in eval_fn(state.params).items()}
        if log is not None:  # after eval_fn: the evaluated round's row holds its eval_* values
          logged = dict(block_metrics)
          for k, v in evals.get(done - 1, {}).items():
            logged["eval_" + k] = np.full(active, np.nan)
            logged["eval_" + k][-1] = v
          log.write(start + done - active, logged)
        if callback is not None:
          callback(start + done, block_metrics)
        if bar is not None:
          bar.update(start + done, active, block_metrics, evals.get(done - 1))
        if checkpoint_dir is not None:
          interrupted = stop.raised
          crossed = checkpoint_every is None or (
              (start + done) // checkpoint_every > (start + done - active) // checkpoint_every)
          if done == num_rounds or interrupted or crossed:
            try:
              _ckpt.save(checkpoint_dir, state, fp)
            except Exception as e:  # noqa: BLE001 - the donated state must not be lost
              partial = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
              raise _run_dir.CheckpointSaveError(
                  state, partial,
                  f"saving checkpoint step {start + done} in {checkpoint_dir!r} failed "
                  f"({type(e).__name__}: {e}). The state after round {start + done} is this "
                  "exception's .state (sim.save(e.state, other_dir) keeps it)."
              ) from e
          if interrupted:
            partial = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
            raise _ckpt.SimulationInterrupted(
                state, partial,
                f"{stop.raised} received: stopped after round {start + done}, checkpoint saved "
                f"in {checkpoint_dir!r} (resume with sim.restore)."
            )
    finally:  # never leave SIGINT swallowed (a notebook kernel), whatever raised
      if stop is not None:
        stop.restore()
      if bar is not None:
        bar.close()
    metrics = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    for names in {n for e in evals.values() for n in e}:
      col = np.full(num_rounds, np.nan)
      for r, e in evals.items():
        col[r] = e.get(names, np.nan)
      metrics["eval_" + names] = col
    return state, metrics

  def _raise_nonfinite(self, first, bad, state, block_metrics, chunks, log):
    """``on_nonfinite="raise"``: log the finite rounds, then raise with the last finite state."""
    if log is not None and bad:
      log.write(first, {k: v[:bad] for k, v in block_metrics.items()})
    # The signal handlers and the progress bar are restored/closed by run()'s `finally`.
    chunks = [*chunks, {k: v[: bad + 1] for k, v in block_metrics.items()}]
    metrics = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    number = first + bad + 1
    row = {k: float(v[bad]) for k, v in block_metrics.items()}
    raise _nf.NonFiniteError(
        f"{_nf.describe(number, row)}. The run stopped there; the error's .state is the last "
        f"finite state ({int(state.round)} rounds done) and .metrics the rounds so far. Lower "
        "the learning rate (or clip updates), or pass on_nonfinite='warn' to skip such rounds.",
        round=number, state=state, metrics=metrics,
    )

  # -- checkpoints ---------------------------------------------------------------------------
  def save(self, state: ServerState, directory: str) -> int:
    """Checkpoints ``state`` (step = its round) under ``directory``; returns the step.

    Raises:
      ValueError: the state cannot be saved, the directory is unusable or holds another run's
        checkpoints, this step, or later steps (:func:`fedjax_sim.run_dir.check_save`).
    """
    self._check_state(state)
    fp = _ckpt.fingerprint(self, state)
    _run_dir.check_save(directory, state, fp)
    return _ckpt.save(directory, state, fp)

  def restore(self, directory: str, params: Any, *, step: int | None = None) -> ServerState:
    """Restores the latest (or ``step``) checkpoint of this configuration.

    Args:
      directory: the ``checkpoint_dir`` of a previous run.
      params: parameters with the model's structure (e.g. the initial ones); they give the
        shapes, the values come from the checkpoint.
      step: a specific round to restore (default: the latest).

    Raises:
      ValueError: the checkpoint is from another configuration (the differences are named) or
        unreadable (the other steps are named).
    """
    template = self.init(params, jax.random.key(0))
    return _ckpt.restore(directory, template, _ckpt.fingerprint(self, template), step=step)

  def _epsilons(self, start: int, num_rounds: int, delta: float | None,
                accountant: str = "rdp"):
    """``f(lo, hi) -> ε after rounds start+lo+1 .. start+hi`` for the run, or None."""
    if delta is None:
      return None
    from fedjax_sim import privacy
    from fedjax_sim.data.sampling import PoissonSampler

    privacy._check(delta=delta)

    z = self.algorithm.aggregator.noise_multiplier
    if z is None:
      raise ValueError(
          "delta is set but the aggregator is not central DP (no noise_multiplier); use "
          "fs.aggregators.dp_mean / adaptive_dp_mean, or drop delta."
      )
    system = self.system
    if system is not None and (system.availability is not None or system.trace is not None
                               or system.diurnal_period is not None):
      raise ValueError(
          "cannot report epsilon: the SystemModel restricts availability, so each available "
          "client's chance of selection exceeds what the sampler alone gives and the accountant "
          "would under-report epsilon. Drop delta (or the availability model); dropout, "
          "stragglers and deadlines alone keep the accounting valid (conservative)."
      )
    n = self.population.num_clients
    sampler = self.sampler
    truncated = isinstance(sampler, PoissonSampler) and sampler.max_cohort_size < n
    if z == 0:
      return lambda lo, hi: np.full(hi - lo, np.inf)
    if truncated or accountant != "rdp":  # the full epsilon() (block ends only)
      def at_ends(lo, hi):
        col = np.full(hi - lo, np.nan)
        col[-1] = privacy.epsilon(sampler, n, z, start + hi, delta, accountant=accountant)
        return col
      # Fail early if unbounded (the message names the cap, or accountant="pld").
      privacy.epsilon(sampler, n, z, start + num_rounds, delta, accountant=accountant)
      return at_ends
    table = privacy.epsilon_per_round(sampler, n, z, start + num_rounds, delta)
    return lambda lo, hi: table[start + lo : start + hi]

  def benchmark(self, state: ServerState, num_rounds: int) -> tuple[ServerState, dict[str, float]]:
    """Times ``num_rounds`` rounds in one block after a compile run; returns throughput figures."""
    self._check_state(state)
    fn = self._block_fn(num_rounds)
    t0 = time.perf_counter()
    state, m0 = fn(state, self.population, jnp.int32(num_rounds), jnp.bool_(False))
    jax.block_until_ready(state.params)
    compile_and_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = fn(state, self.population, jnp.int32(num_rounds), jnp.bool_(False))
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - t0
    m = jax.device_get(m)
    return state, {
        "seconds": seconds,
        "first_block_seconds": compile_and_first,
        "rounds_per_s": num_rounds / seconds,
        "clients": float(np.sum(m["clients"])),
        "examples": float(np.sum(m["examples"])),
        "client_steps": float(np.sum(m["client_steps"])),
        "step_slots": float(np.sum(m["step_slots"])),
        # Rounds whose server step was skipped as non-finite, in both blocks (a diverged run).
        "nonfinite_rounds": float(np.sum(m0[_nf.NONFINITE]) + np.sum(m[_nf.NONFINITE])),
    }


class _Progress:
  """Per-block progress: tqdm on a terminal, plain lines otherwise."""

  def __init__(self, total: int, cohort: int):
    import sys

    self.cohort = cohort
    self.tty = sys.stderr.isatty()
    self.last = time.perf_counter()
    self.bar = None
    if self.tty:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, unit="round", dynamic_ncols=True)

  def update(self, rounds_done: int, active: int, block: dict, evals: dict | None) -> None:
    import sys

    now = time.perf_counter()
    info = {"loss": f"{block['loss'][-1]:.4f}"}
    if "accuracy" in block:
      info["acc"] = f"{block['accuracy'][-1]:.3f}"
    for k, v in (evals or {}).items():
      info[f"eval_{k}"] = f"{v:.4f}"
    if "epsilon" in block and np.isfinite(block["epsilon"][-1]):
      info["eps"] = f"{block['epsilon'][-1]:.3g}"
    # Clients that took part (under Poisson sampling fewer than the cohort's capacity).
    real = float(np.sum(block["clients"])) if "clients" in block else active * self.cohort
    info["cu/s"] = f"{real / max(now - self.last, 1e-9):.0f}"
    self.last = now
    if self.bar is not None:
      self.bar.set_postfix(info, refresh=False)
      self.bar.update(active)
    else:
      print(f"round {rounds_done}: " + " ".join(f"{k}={v}" for k, v in info.items()),
            file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _SignalFlag:
  """Records SIGINT/SIGTERM during a run (main thread only) so the block in flight can finish
  and be checkpointed; ``restore`` puts the previous handlers back."""

  def __init__(self):
    self.raised = None
    self._old = {}
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.raised = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}


def _summable(outputs, stacked=False):
  (contribution, cm, sm, stats, extra), _, _ = outputs
  stats = dict(stats)
  stats["step_slots"] = jnp.zeros((1,), jnp.float32)
  return (() if stacked else contribution), cm, sm, stats, extra


def _reduce_stack(reducer, updates, mask, ids, key, context):
  """The stacked reduce: an optional omniscient attack, then the robust rule (or the sum)."""
  metrics = {}
  if reducer.attack is not None:
    updates, m = reducer.attack(updates, mask, ids, jax.random.fold_in(key, 0), context)
    updates = jax.tree.map(
        lambda u: jnp.where(mask.reshape((-1,) + (1,) * (u.ndim - 1)), u, jnp.zeros_like(u)),
        updates,
    )
    metrics.update(m)
  if reducer.stacked is not None:
    reduced, m = reducer.stacked(updates, mask, jax.random.fold_in(key, 1), context)
    metrics.update(m)
    return reduced, metrics
  contributions = jax.vmap(reducer.contribute)(updates, mask.astype(jnp.float32))
  contributions = jax.tree.map(
      lambda c: jnp.where(mask.reshape((-1,) + (1,) * (c.ndim - 1)), c, jnp.zeros_like(c)),
      contributions,
  )
  return jax.tree.map(lambda c: jnp.sum(c, axis=0), contributions), metrics


def _check_population_state_fits(one_client_state, num_clients: int, name: str) -> None:
  """Refuses per-client state for the whole population that cannot fit in device memory."""
  per_client = sum(
      int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(one_client_state)
  )
  needed = per_client * num_clients
  dev = jax.devices()[0]
  try:
    available = int(dev.memory_stats()["bytes_limit"])
  except Exception:  # noqa: BLE001 - CPU: the host's physical memory
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if needed > 0.8 * available:
    raise ValueError(
        f"{name} keeps {per_client / 2**20:.2f} MiB of state per client; for {num_clients} "
        f"clients that is {needed / 2**30:.2f} GiB, more than 80% of the "
        f"{available / 2**30:.1f} GiB of {dev.platform} memory. Use fewer clients, a smaller "
        "model, or a stateless algorithm."
    )


def _as_typed_key(key) -> jax.Array:
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single key (shape ()); got shape {key.shape}.")
    default = jax.random.key_impl(jax.random.key(0))
    if jax.random.key_impl(key) != default:
      raise ValueError(
          f"key must use the default PRNG implementation ({default}), which the run's "
          f"derivations, logs and checkpoints record; got {jax.random.key_impl(key)}. Use "
          "jax.random.key(seed) without impl=."
      )
    return key
  try:
    arr = jnp.asarray(key)
  except TypeError:
    arr = None
  if arr is not None and arr.dtype == jnp.uint32 and arr.shape == (2,):
    return jax.random.wrap_key_data(arr)
  raise TypeError(
      f"key must be a PRNG key such as jax.random.key(0); got {type(key).__name__} "
      f"{getattr(key, 'shape', '')}."
  )
