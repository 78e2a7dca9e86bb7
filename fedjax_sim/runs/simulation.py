"""``Simulation``: a thin facade over the pure round and the host wing.

The round is :func:`fedjax_sim.core.round_step` (pure, planned by a
:class:`~fedjax_sim.core.RoundPlan` that :func:`fedjax_sim.runs.planning.plan` assembles and
checks); it is compiled in :mod:`fedjax_sim.programs`. :class:`Simulation` holds the
configuration, fixes the plan in :meth:`Simulation.init` once the model is known, and runs
blocks of rounds (:meth:`Simulation.run`) with the run's records in
:mod:`fedjax_sim.runs.recorder`, its identity in :mod:`fedjax_sim.runs.identity`, its
directories in :mod:`fedjax_sim.runs.ownership`, progress in :mod:`fedjax_sim.progress` and ε in
:mod:`fedjax_sim.privacy`. Every module it calls takes values, never the Simulation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim import autotune as _autotune
from fedjax_sim import core, programs
from fedjax_sim import host_cpu as _host_cpu
from fedjax_sim import host_population as _host
from fedjax_sim import sharding as _sharding
from fedjax_sim.core import Performance, ServerState
from fedjax_sim.progress import Progress
from fedjax_sim.runs import identity, ownership, planning, store, tuning
from fedjax_sim.runs.recorder import RunOptions, RunRecorder

__all__ = ["RunOptions", "ServerState", "Simulation"]


class Simulation:
  """Runs a federated :class:`~fedjax_sim.algorithms.Algorithm` on a :class:`Population`.

  Args:
    algorithm: what to run (``fs.algorithms.fedavg(...)``, ...).
    population: the clients' data.
    cohort_size: K, uniform sampling without replacement; exactly one of this and ``sampler``.
    sampler: ``fs.sampling.uniform(K)`` or ``fs.sampling.poisson(q, max_cohort_size)``.
    chunk_size, sort_by_size, mesh, unbatched_single_client: speed only (``fs.core.Performance``:
      never a change beyond float tolerance). Default chunk: from ``memory_budget`` and the model
      size; ``"auto"`` (or candidates ``[1, 8]``, ``fs.autotune.AutoChunk(budget_s=)``): timed at
      :meth:`init`; default mesh: the default device (or the host CPU devices, ``fs.host_cpu``).
    memory_budget: bytes per device for the client pass when ``chunk_size`` is None.
    system: an ``fs.systems.SystemModel`` (availability, dropout, stragglers, deadlines), in-jit.
    population_on: ``"device"`` (default); ``"sharded"``: the examples split along the mesh's
      ``clients`` axis; ``"host"``: in host memory, each round's cohort gathered ahead of time
      (:mod:`fedjax_sim.host_population`). All give the same results.

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

  def __init__(self, algorithm, population, *, cohort_size: int | None = None, sampler=None,
               chunk_size: int | str | None = None, memory_budget: int | None = None,
               sort_by_size: bool = True, system=None, mesh: jax.sharding.Mesh | None = None,
               population_on: str = "device", unbatched_single_client: bool = True):
    self.sampler = planning.simulation_args(
        algorithm, population, cohort_size=cohort_size, sampler=sampler, chunk_size=chunk_size,
        system=system, mesh=mesh, population_on=population_on, sort_by_size=sort_by_size,
        unbatched_single_client=unbatched_single_client)
    self.sampler.validate(population.num_clients)
    self.algorithm, self.system, self.population_on = algorithm, system, population_on
    self.max_cohort_size = self.sampler.max_cohort_size
    self.sort_by_size, self.unbatched_single_client = sort_by_size, unbatched_single_client
    self._context = core.base_context(self.sampler, population)
    planning.composition(algorithm, self._context)
    per_device_scan = False
    if mesh is None and chunk_size is None and population_on == "device":
      mesh = _host_cpu.default_mesh()  # one client per host CPU device (fedjax_sim/host_cpu.py)
      per_device_scan = mesh is not None  # each device scans its clients (core.per_device_pass)
    self.mesh = planning.mesh_across_processes(mesh)  # warns if each process would run it whole
    self.performance = Performance(  # as requested; init() fixes an automatic chunk size
        **_autotune.chunk_request(chunk_size), sort_by_size=sort_by_size,
        unbatched_single_client=unbatched_single_client, mesh=mesh,
        per_device_scan=per_device_scan)
    population = _host.to_host(population) if population_on == "host" else population
    self.population = (population if mesh is None
                       else _sharding.place_population(population, mesh, population_on))
    memory_budget = _v.memory_budget(memory_budget)
    self._auto_budget = memory_budget is None  # refined in init() once the state is known
    self.memory_budget = planning.memory_budget(memory_budget, self.population, mesh=mesh,
                                                population_on=population_on)
    self.plan: core.RoundPlan | None = None  # fixed by init() once the model is known
    self._programs: dict[int | None, Any] = {}

  context = property(lambda self: self._context if self.plan is None else self.plan.context,
                     doc="The :class:`~fedjax_sim.types.RoundContext` the aggregator sees.")
  chunk_size = property(lambda self: None if self.plan is None else self.plan.chunk_size,
                        doc="Clients per vmapped chunk (None before :meth:`init`).")

  @property
  def num_compiles(self) -> dict[str, int]:
    """Programs compiled so far: ``{"round": ..., "block": ...}`` (counted on the host)."""
    counts = {b: p.num_compiles for b, p in self._programs.items()}
    return {"round": counts.get(None, 0),
            "block": sum(n for b, n in counts.items() if b is not None)}

  num_traces = num_compiles  # the name before programs were compiled ahead of time

  def init(self, params: Any, key: jax.Array) -> ServerState:
    """Validates ``params`` against the model and optimizers, and builds the initial state.

    Args:
      params: the initial global model (a pytree of float arrays).
      key: the run's key, ``jax.random.key(seed)`` (a legacy ``PRNGKey`` is accepted too).

    Returns:
      The :class:`ServerState` before round 0 (placed on the mesh, if any).
    """
    key = planning.typed_key(key)
    params = jax.tree.map(lambda x: jnp.array(x), params)  # a private copy (state is donated)
    planning.params(params, self.algorithm.trainable)
    self._plan(params, key)
    state = core.initial_state(self.plan, params, key)
    planning.round_traces(self.plan, state, self.population)
    return state if self.mesh is None else _sharding.place_state(state, self.mesh)

  def _plan(self, params, key) -> Any:
    """Fixes the plan (:func:`fedjax_sim.runs.planning.plan`); returns the state's shapes."""
    planned = planning.plan(
        self.algorithm, self.sampler, self.population, params, key, system=self.system,
        performance=self.performance, budget=None if self._auto_budget else self.memory_budget,
        population_on=self.population_on, tuner=tuning.tune_plan)
    self.memory_budget, plan = planned.memory_budget, planned.plan
    program_of = lambda p: (p.chunk_size, p.trainable_mask, str(p.context.params_template))
    if self.plan is None or program_of(plan) != program_of(self.plan):
      self.plan, self._programs = plan, {}  # (the same program keeps its compiled executables)
    return planned.state_spec

  def _check_state(self, state, rounds: int = 0) -> None:
    if not isinstance(state, ServerState):
      raise TypeError(f"state must be the ServerState from sim.init(...); got "
                      f"{type(state).__name__}.")
    _v.not_donated("state", state)
    if self.plan is None and self.mesh is None:
      # A state from another Simulation of this configuration: init's checks on it.
      planning.params(state.params, self.algorithm.trainable)
      planning.same_layout(self._plan(state.params, state.key), state)
      planning.round_traces(self.plan, state, self.population)
    if self.plan is None:
      raise ValueError("call sim.init(params, key) first; it fixes the chunk size and checks "
                       "shapes.")
    planning.check_horizon(self.algorithm, int(state.round), rounds, self.sampler)
    core.check_state_fits(self.plan, state)  # per-client state of another population: refused

  def _program(self, block: int | None = None):
    """The compiled round (``block=None``) or block of ``block`` rounds (cached)."""
    if block not in self._programs:
      self._programs[block] = (
          _host.HostFeeder(self.plan, self.population, block) if self.population_on == "host"
          else programs.round_program(self.plan) if block is None
          else programs.block_program(self.plan, block))
    return self._programs[block]

  def round(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
    """Runs one round (``state`` is donated). Returns ``(state, metrics as host floats)``."""
    self._check_state(state, rounds=1)
    state, metrics = self._program()(state, self.population)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  def run(self, state: ServerState, num_rounds: int, options: RunOptions | None = None,
          **kwargs) -> tuple[ServerState, dict[str, np.ndarray]]:
    """Runs ``num_rounds`` rounds, ``block_size`` at a time inside one ``lax.scan``.

    The host is visited only between blocks; one compilation serves every block.

    Args:
      state: from :meth:`init` or a previous run (donated: do not reuse the object passed in).
      num_rounds: rounds to run.
      options: a :class:`~fedjax_sim.runs.recorder.RunOptions` (evaluation, checkpoints, log,
        progress, ε, the non-finite policy, ...).
      **kwargs: any field of :class:`~fedjax_sim.runs.recorder.RunOptions` by name
        (``eval_every=``, ``checkpoint_dir=``, ...), overriding ``options``.

    Returns:
      ``(state, metrics)`` with ``metrics[name]`` a NumPy array ``[num_rounds]``; eval results
      appear as ``metrics["eval_" + name]`` (NaN where not evaluated). Averages over clients or
      examples (``loss``, ``accuracy``, ...) are NaN in a round where no client contributed.

    Raises:
      ValueError: a bad argument, or a directory this run may not use (before any round).
      fedjax_sim.runs.recorder.RunStopped: a failed checkpoint, a signal or (under
        ``on_nonfinite="raise"``) a non-finite round; its ``.state`` is the state to go on from.
    """
    o = RunOptions(**kwargs) if options is None else dataclasses.replace(options, **kwargs)
    num_rounds, block_size, eval_every, checkpoint_every, policy = planning.run_args(
        num_rounds, block_size=o.block_size, eval_every=o.eval_every, eval_fn=o.eval_fn,
        checkpoint_dir=o.checkpoint_dir, checkpoint_every=o.checkpoint_every,
        log_dir=o.log_dir, tensorboard=o.tensorboard, accountant=o.accountant,
        on_nonfinite=o.on_nonfinite)
    self._check_state(state, rounds=num_rounds)
    program = self._program(block_size)
    records = RunRecorder(self.plan, self.population, state, num_rounds, o,
                          block_size=block_size, eval_every=eval_every,
                          checkpoint_every=checkpoint_every)
    bar = Progress(num_rounds, self.max_cohort_size, enabled=o.progress)
    try:
      while records.done < num_rounds:
        active = min(block_size, num_rounds - records.done)
        state, block = program(state, self.population, jnp.int32(active),
                               jnp.bool_(policy == "raise"))
        block = {k: np.asarray(v)[:active] for k, v in jax.device_get(block).items()}
        records.check_finite(block, state, policy)
        evals = records.record(block, state)
        if o.callback is not None:
          o.callback(records.rounds_done, block)
        bar.update(records.rounds_done, active, block, evals)
        records.checkpoint(state, active)
    finally:  # never leave SIGINT swallowed (a notebook kernel), whatever raised
      records.close()
      bar.close()
    return state, records.metrics()

  def fingerprint(self, state: ServerState) -> dict[str, Any]:
    """Returns this run's :func:`fedjax_sim.runs.identity.fingerprint` (a JSON-able dict)."""
    self._check_state(state)
    return identity.fingerprint(self.plan, self.population, state)

  def save(self, state: ServerState, directory: str) -> int:
    """Checkpoints ``state`` (step = its round) under ``directory``.

    Returns:
      The step written.

    Raises:
      ValueError: the directory may not take it (:func:`fedjax_sim.runs.ownership.check_save`).
    """
    fp = self.fingerprint(state)
    ownership.check_save(directory, state, fp)
    return store.save(directory, state, fp)

  def restore(self, directory: str, params: Any, *, step: int | None = None) -> ServerState:
    """Restores the latest (or ``step``) checkpoint of this configuration.

    Args:
      directory: the ``checkpoint_dir`` of a previous run.
      params: parameters with the model's structure (the shapes; values come from the step).
      step: a specific round to restore (default: the latest).

    Returns:
      The restored :class:`ServerState`.

    Raises:
      ValueError: another configuration's (differences named) or an unreadable checkpoint.
    """
    template = self.init(params, jax.random.key(0))
    return ownership.restore(directory, template, self.fingerprint(template), step=step)

  def benchmark(self, state: ServerState, num_rounds: int) -> tuple[ServerState, dict[str, float]]:
    """Times ``num_rounds`` rounds in one block after a compile run.

    Returns:
      ``(state, figures)`` (:func:`fedjax_sim.programs.time_block`).
    """
    self._check_state(state, rounds=2 * num_rounds)  # the compile run, then the timed run
    return programs.time_block(self._program(num_rounds), state, self.population, num_rounds)

  def round_memory(self, state: Any, *, block_size: int | None = None):
    """:func:`fedjax_sim.programs.memory_analysis` of this plan and population.

    Returns:
      A :class:`fedjax_sim.memory.MemoryAnalysis` (per device under a mesh).
    """
    if self.plan is None:
      raise ValueError("call sim.init(params, key) before round_memory(sim, state).")
    if self.population_on == "host":
      raise ValueError("round_memory analyses the program that reads the population from "
                       "device memory; build the Simulation with population_on='device'.")
    return programs.memory_analysis(self.plan, self.population, state, block_size=block_size)
