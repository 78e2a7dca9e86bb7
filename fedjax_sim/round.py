"""``Simulation``: a thin facade over the pure round core.

The round itself is :func:`fedjax_sim.core.round_step` (pure, planned by a
:class:`~fedjax_sim.core.RoundPlan`); it is compiled in :mod:`fedjax_sim.programs` and checked
before compiling by :mod:`fedjax_sim.checks`. :class:`Simulation` holds the configuration, fixes
the plan in :meth:`Simulation.init` once the model is known, and runs blocks of rounds
(:meth:`Simulation.run`) with the run's records in :mod:`fedjax_sim.run_dir`, progress in
:mod:`fedjax_sim.progress` and ε in :mod:`fedjax_sim.privacy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim import checkpoint as _ckpt
from fedjax_sim import checks, core, privacy, programs
from fedjax_sim import host_cpu as _host_cpu
from fedjax_sim import host_population as _host
from fedjax_sim import memory as _memory
from fedjax_sim import run_dir as _run_dir
from fedjax_sim import sharding as _sharding
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.core import ServerState
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import PoissonSampler, UniformSampler
from fedjax_sim.memory import CPU_STEP_FLOPS, auto_chunk_size  # noqa: F401 - moved; kept here
from fedjax_sim.progress import Progress
from fedjax_sim.systems import SystemModel

__all__ = ["ServerState", "Simulation", "auto_chunk_size", "default_memory_budget"]


def default_memory_budget(reserved_bytes: int = 0) -> int:
  """Bytes the client pass may use (:func:`fedjax_sim.memory.device_memory_budget`).

  Returns:
    256 MiB on CPU; on an accelerator half of the memory left after ``reserved_bytes``.
  """
  return _memory.device_memory_budget(reserved_bytes)


class Simulation:
  """Runs a federated :class:`~fedjax_sim.algorithms.Algorithm` on a :class:`Population`.

  Args:
    algorithm: what to run (``fs.algorithms.fedavg(...)``, ...).
    population: the clients' data.
    cohort_size: K for uniform sampling without replacement (``fs.sampling.uniform(K)``);
      exactly one of ``cohort_size`` and ``sampler``.
    sampler: ``fs.sampling.uniform(K)`` or ``fs.sampling.poisson(q, max_cohort_size)``.
    chunk_size: clients vmapped together. Speed only, like the four settings after it: they
      never change results beyond float tolerance. Default: from ``memory_budget`` and the
      model size (:func:`fedjax_sim.memory.chunk_size_for`).
    memory_budget: bytes per device for the client pass when ``chunk_size`` is None.
    sort_by_size: order the cohort by client size so that each chunk runs only the steps its
      largest client needs.
    system: a :class:`fedjax_sim.systems.SystemModel` (availability, dropout, stragglers,
      deadlines), applied in-jit each round.
    mesh: a mesh with a ``clients`` axis (:func:`fedjax_sim.sharding.clients_mesh`): each
      chunk's clients split across its devices, the server state replicated, per-client state
      split. Default: the default device (or the host CPU devices, :mod:`fedjax_sim.host_cpu`).
    population_on: ``"device"`` (default); ``"sharded"``: the examples split along the mesh's
      ``clients`` axis; ``"host"``: in host memory, each round's cohort gathered ahead of time
      (:mod:`fedjax_sim.host_population`). All give the same results.
    unbatched_single_client: a chunk of one client runs without ``vmap`` (XLA:CPU runs a
      size-1 vmap slower). Speed only.

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

  def __init__(self, algorithm: Algorithm, population: Population, *,
               cohort_size: int | None = None,
               sampler: UniformSampler | PoissonSampler | None = None,
               chunk_size: int | None = None, memory_budget: int | None = None,
               sort_by_size: bool = True, system: SystemModel | None = None,
               mesh: jax.sharding.Mesh | None = None, population_on: str = "device",
               unbatched_single_client: bool = True):
    self.sampler = checks.simulation_args(
        algorithm, population, cohort_size=cohort_size, sampler=sampler, chunk_size=chunk_size,
        system=system, mesh=mesh, population_on=population_on, sort_by_size=sort_by_size,
        unbatched_single_client=unbatched_single_client)
    self.sampler.validate(population.num_clients)
    self.algorithm, self.system, self.population_on = algorithm, system, population_on
    self.max_cohort_size = self.sampler.max_cohort_size
    self.sort_by_size, self.unbatched_single_client = sort_by_size, unbatched_single_client
    self._context = core.base_context(self.sampler, population)
    checks.composition(algorithm, self._context)
    if mesh is None and chunk_size is None and population_on == "device":
      mesh = _host_cpu.default_mesh()  # one client per host CPU device (fedjax_sim/host_cpu.py)
    self.mesh, self._requested_chunk_size = mesh, None if chunk_size is None else int(chunk_size)
    population = _host.to_host(population) if population_on == "host" else population
    self.population = (population if mesh is None
                       else _sharding.place_population(population, mesh, population_on))
    memory_budget = _v.memory_budget(memory_budget)
    self._auto_budget = memory_budget is None  # refined in init() once the state is known
    self.memory_budget = (default_memory_budget(_memory.resident_bytes(self))
                          if memory_budget is None else memory_budget)
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

  # -- state ---------------------------------------------------------------------------------
  def init(self, params: Any, key: jax.Array) -> ServerState:
    """Validates ``params`` against the model and optimizers, and builds the initial state.

    Args:
      params: the initial global model (a pytree of float arrays).
      key: the run's key, ``jax.random.key(seed)`` (a legacy ``PRNGKey`` is accepted too).

    Returns:
      The :class:`ServerState` before round 0 (placed on the mesh, if any).
    """
    key = checks.typed_key(key)
    params = jax.tree.map(lambda x: jnp.array(x), params)  # a private copy (state is donated)
    checks.params(params)
    self._plan(params, key)
    state = core.initial_state(self.plan, params, key)
    checks.round_traces(self.plan, state, self.population)
    return state if self.mesh is None else _sharding.place_state(state, self.mesh)

  def _plan(self, params, key) -> Any:
    """Fixes the plan for ``params``: trainable view, memory budget, chunk size. Returns the
    initial state's shapes."""
    plan = core.plan_for(self.algorithm, self.sampler, self.population, params,
                         system=self.system, sort_by_size=self.sort_by_size,
                         unbatched_single_client=self.unbatched_single_client)
    try:
      spec = jax.eval_shape(lambda p, k: core.initial_state(plan, p, k), params, key)
    except Exception:  # noqa: BLE001 - the checks below name what does not fit
      checks.state_pieces(plan, params, self.memory_budget)
      raise
    if self._auto_budget:
      self.memory_budget = default_memory_budget(_memory.resident_bytes(self, spec))
    checks.state_pieces(plan, params, self.memory_budget)
    bsz, batch = checks.batch_spec(self.algorithm, self.population)
    plan = dataclasses.replace(plan, chunk_size=_memory.chunk_size_for(
        self.max_cohort_size, params, plan.views(params)[1], batch, bsz, self.memory_budget,
        self.mesh, self._requested_chunk_size), mesh=self.mesh)  # the mesh with its chunk
    program_of = lambda p: (p.chunk_size, p.trainable_mask, str(p.context.params_template))
    if self.plan is None or program_of(plan) != program_of(self.plan):
      self.plan, self._programs = plan, {}  # (the same program keeps its compiled executables)
    return spec

  def _check_state(self, state) -> None:
    if not isinstance(state, ServerState):
      raise TypeError(f"state must be the ServerState from sim.init(...); got "
                      f"{type(state).__name__}.")
    _v.not_donated("state", state)
    if self.plan is None and self.mesh is None:
      # A state from another Simulation of the same configuration (e.g. rebuilt in a new
      # session): init's checks on it, refusing a state whose structure does not match.
      checks.params(state.params)
      checks.same_layout(self._plan(state.params, state.key), state)
      checks.round_traces(self.plan, state, self.population)
    if self.plan is None:
      raise ValueError("call sim.init(params, key) first; it fixes the chunk size and checks "
                       "shapes.")

  def _program(self, block: int | None = None):
    """The compiled round (``block=None``) or block of ``block`` rounds (cached)."""
    if block not in self._programs:
      self._programs[block] = (
          _host.HostFeeder(self.plan, self.population, block) if self.population_on == "host"
          else programs.round_program(self.plan) if block is None
          else programs.block_program(self.plan, block))
    return self._programs[block]

  # -- running -------------------------------------------------------------------------------
  def round(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
    """Runs one round (one compiled step; ``state`` is donated).

    Returns:
      ``(state, metrics)`` with host-side float metrics.
    """
    self._check_state(state)
    state, metrics = self._program()(state, self.population)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  def run(self, state: ServerState, num_rounds: int, *, block_size: int | None = None,
          eval_every: int | None = None,
          eval_fn: Callable[[Any], dict[str, float]] | None = None,
          callback: Callable[[int, dict[str, np.ndarray]], None] | None = None,
          delta: float | None = None, checkpoint_dir: str | None = None,
          checkpoint_every: int | None = None, log_dir: str | None = None,
          progress: bool = False, tensorboard: bool = False, accountant: str = "rdp",
          overwrite: bool = False, settings: dict[str, Any] | None = None,
          on_nonfinite: str = "raise") -> tuple[ServerState, dict[str, np.ndarray]]:
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
      checkpoint_dir: save the state there (orbax) after blocks that end on a multiple of
        ``checkpoint_every`` rounds (default: every block), at the end, and after SIGINT /
        SIGTERM (the block in flight finishes, then ``SimulationInterrupted`` is raised).
        :meth:`restore` continues bit-identically. The run owns the directory
        (:mod:`fedjax_sim.run_dir`): another run's checkpoints are refused unless
        ``overwrite``; this run's later steps (a rollback) are deleted with a warning.
      checkpoint_every: rounds between checkpoints (a multiple of ``block_size`` is exact).
      log_dir: append each round's metrics and ``eval_*`` results to
        ``<log_dir>/metrics.jsonl``; ``config.json`` records the fingerprint, versions, run
        key, ``settings`` and each session. Owned like ``checkpoint_dir``.
      tensorboard: with ``log_dir``, also write TensorBoard event files there (tensorboardX).
      progress: show progress per block: a tqdm bar (loss, accuracy, ε, client-updates/s of
        the clients that took part) on a terminal, one plain line per block otherwise (CI logs).
      accountant: ``"rdp"`` or ``"pld"``, the accountant behind ``metrics["epsilon"]``.
      overwrite: delete another run's checkpoints / log in ``checkpoint_dir`` / ``log_dir``
        (explicitly, with a warning) instead of refusing them.
      settings: a JSON-able dict recorded in ``config.json`` (the CLI records its config).
      on_nonfinite: a non-finite round (its server step would make the state NaN / Inf, or
        every client diverged; :mod:`fedjax_sim.nonfinite`) is never applied. ``"raise"``
        (default): stop and raise ``NonFiniteError`` with the last finite state and the metrics
        so far; ``"warn"`` / ``"ignore"``: skip it (``metrics["nonfinite"]`` marks it).

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
    num_rounds, block_size, eval_every, checkpoint_every, policy = checks.run_args(
        num_rounds, block_size=block_size, eval_every=eval_every, eval_fn=eval_fn,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log_dir=log_dir,
        tensorboard=tensorboard, accountant=accountant, on_nonfinite=on_nonfinite)
    horizon = getattr(self.algorithm.aggregator, "horizon", None)
    if horizon is not None and int(state.round) + num_rounds > horizon:
      raise ValueError(
          f"num_rounds={num_rounds} from round {int(state.round)} runs past the aggregator's "
          f"strategy matrix ({horizon} rounds): build it for the run's length "
          "(dp_ftrl_mean(num_rounds=...), band_mf_mean(strategy=[T, T] matrix)), or use "
          "band_mf_mean's Toeplitz coefficients (any length).")
    program = self._program(block_size)
    epsilons = None if delta is None else privacy.epsilon_column(
        self.sampler, self.population.num_clients, self.algorithm.aggregator.noise_multiplier,
        self.system, int(state.round), num_rounds, delta, accountant,
        num_bands=getattr(self.algorithm.aggregator, "num_bands", 1),
        strategy_gram=getattr(self.algorithm.aggregator, "strategy_gram", None))
    records = _run_dir.RunRecorder(
        self, state, num_rounds, block_size=block_size, eval_every=eval_every, eval_fn=eval_fn,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log_dir=log_dir,
        tensorboard=tensorboard, delta=delta, accountant=accountant, overwrite=overwrite,
        settings=settings)
    bar = Progress(num_rounds, self.max_cohort_size, enabled=progress)
    try:
      while records.done < num_rounds:
        active = min(block_size, num_rounds - records.done)
        state, block = program(state, self.population, jnp.int32(active),
                               jnp.bool_(policy == "raise"))
        block = {k: np.asarray(v)[:active] for k, v in jax.device_get(block).items()}
        records.check_finite(block, state, policy)
        if epsilons is not None:
          block["epsilon"] = epsilons(records.done, records.done + active)
        evals = records.record(block, state)
        if callback is not None:
          callback(records.rounds_done, block)
        bar.update(records.rounds_done, active, block, evals)
        records.checkpoint(state, active)
    finally:  # never leave SIGINT swallowed (a notebook kernel), whatever raised
      records.close()
      bar.close()
    return state, records.metrics()

  # -- checkpoints ---------------------------------------------------------------------------
  def save(self, state: ServerState, directory: str) -> int:
    """Checkpoints ``state`` (step = its round) under ``directory``.

    Returns:
      The step written.

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

    Returns:
      The restored :class:`ServerState`.

    Raises:
      ValueError: the checkpoint is from another configuration (the differences are named) or
        unreadable (the other steps are named).
    """
    template = self.init(params, jax.random.key(0))
    return _ckpt.restore(directory, template, _ckpt.fingerprint(self, template), step=step)

  def benchmark(self, state: ServerState, num_rounds: int) -> tuple[ServerState, dict[str, float]]:
    """Times ``num_rounds`` rounds in one block after a compile run.

    Returns:
      ``(state, figures)``: seconds, rounds per second and the work counted (clients,
      examples, local steps and the step slots the chunks paid for, non-finite rounds).
    """
    self._check_state(state)
    return programs.time_block(self._program(num_rounds), state, self.population, num_rounds)
