"""Planning a run: every check made before anything compiles, and :func:`plan`, the one place
a :class:`~fedjax_sim.core.RoundPlan` is assembled.

Every check raises a clear ``TypeError`` / ``ValueError`` that names the argument and the fix,
from shapes and Python values only (abstract evaluation, never a compile), so a bad
configuration never surfaces as an XLA traceback or a silent NaN. :func:`plan` resolves the
trainable view, checks the state pieces against memory, and fixes the speed-only
:class:`~fedjax_sim.core.Performance` (the chunk size from the memory budget, with the mesh) in
one pass; :func:`plan_for` is its explicit form (``fs.core.plan_for``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim import autotune as _autotune
from fedjax_sim import flops as _flops
from fedjax_sim import memory as _memory
from fedjax_sim import nonfinite as _nf
from fedjax_sim import partition_views as _views
from fedjax_sim import sharding
from fedjax_sim.aggregators import ADDS_NOISE, CAPS_WEIGHTS, LOCAL_NOISE
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.client import last_batch_sizes
from fedjax_sim.data import disk as _disk
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import PoissonSampler, UniformSampler
from fedjax_sim.plan import Performance, RoundPlan, base_context, check_sampler, initial_state
from fedjax_sim.systems import SystemModel
from fedjax_sim.types import MASK_KEY, RoundContext


def param_count(params) -> int:
  """Scalars in a pytree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def simulation_args(algorithm, population, *, cohort_size, sampler, chunk_size, system, mesh,
                    population_on, sort_by_size=True,
                    unbatched_single_client=True) -> UniformSampler | PoissonSampler:
  """Checks :class:`~fedjax_sim.Simulation`'s arguments (the sampler against the population is
  left to ``sampler.validate``, whose warnings point at the caller's ``Simulation(...)``).

  Returns:
    The sampler (``fs.sampling.uniform(cohort_size)`` when only ``cohort_size`` is given).
  """
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
  check_sampler(sampler, "sampler")
  request = _autotune.chunk_request(chunk_size)  # "auto" / candidates: a measured chunk
  Performance(**request, sort_by_size=sort_by_size,  # the speed settings' checks
              unbatched_single_client=unbatched_single_client)
  chunk_size, tune = request["chunk_size"], request["autotune"]
  if tune is not None and tune.candidates and max(tune.candidates) > sampler.max_cohort_size:
    raise ValueError(
        f"chunk_size: candidate {max(tune.candidates)} exceeds the cohort size "
        f"{sampler.max_cohort_size}; drop it (a chunk holds at most the cohort) or pass 'auto'.")
  if system is not None:
    if not isinstance(system, SystemModel):
      raise TypeError(f"system must be an fs.systems.SystemModel; got {type(system).__name__}.")
    system.validate(population.num_clients)
  if population_on not in ("device", "sharded", "host"):
    raise ValueError(
        f"population_on must be 'device', 'sharded' or 'host'; got {population_on!r}.")
  if population_on != "host" and _disk.on_disk(population):
    raise ValueError(
        f"population is a disk population (fedjax_sim.data.disk.open_native); with "
        f"population_on={population_on!r} every round would read the whole dataset. Pass "
        "population_on='host' to stream each round's cohort from disk, or load it into memory "
        "with fs.data.disk.load(population).")
  if population_on == "sharded" and mesh is None:
    raise ValueError(
        "population_on='sharded' splits the examples over the devices of a mesh's 'clients' "
        "axis; pass mesh=fs.sharding.clients_mesh() (or use 'device' / 'host').")
  if mesh is not None:  # a requested chunk must split evenly over the mesh's devices
    for c in (tune.candidates or ()) if tune is not None else (chunk_size,):
      sharding.fit_chunk(1, sampler.max_cohort_size, sharding.mesh_size(mesh),
                         None if c is None else int(c))
  return sampler


def composition(algorithm: Algorithm, context: RoundContext) -> None:
  """The aggregator's own check, and the DP composition rules."""
  if algorithm.aggregator.check is not None:
    algorithm.aggregator.check(context)
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


def typed_key(key) -> jax.Array:
  """``key`` as a typed PRNG key of the default implementation (a legacy uint32[2] is wrapped).

  Returns:
    The typed key.
  """
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


def params(params, trainable=None) -> None:
  """Finite, non-empty parameters, floating point where trained (``trainable``: the
  algorithm's ``trainable=`` spec; a frozen leaf may be an integer, e.g. a step counter)."""
  if not jax.tree.leaves(params):
    raise ValueError("params is empty; pass the model's parameter pytree.")
  trained = None if trainable is None else iter(_views.resolve(trainable, params))
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if (trained is None or next(trained)) and not jnp.issubdtype(leaf.dtype, jnp.floating):
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


def state_pieces(plan: RoundPlan, params, memory_budget: int) -> None:
  """The server optimizer fits the params; per-client state and stacked reducers fit memory."""
  algo = plan.algorithm
  train, _ = plan.views(params)
  try:
    jax.eval_shape(algo.server_optimizer.init, train)
  except Exception as e:  # noqa: BLE001
    raise ValueError(
        f"server_optimizer.init(params) failed: {e}. The server optimizer does not fit the "
        "params' structure (check masks / multi_transform labels)."
    ) from e
  n = plan.context.num_clients
  if algo.client_state_init is not None:
    _population_state_fits(jax.eval_shape(algo.client_state_init, train), n, algo.name)
  stage = algo.aggregator.per_client
  if stage.client_init is not None:
    _population_state_fits(jax.eval_shape(stage.client_init, train), n,
                           "the aggregator's per-client stage")
  reduce = algo.aggregator.reduce
  num_params = param_count(train)
  if reduce.check is not None:
    reduce.check(plan.context, num_params)
  if reduce.needs_stack:
    need = plan.cohort_size * num_params * 4
    if need > memory_budget:
      raise ValueError(
          f"this aggregator needs every client's update at once (a [K, P] buffer: robust "
          f"rules and omniscient attacks are not sums, so they cannot stream across chunks or "
          f"devices); K={plan.cohort_size} x P={num_params} floats = "
          f"{need / 2**30:.2f} GiB exceeds memory_budget={memory_budget / 2**30:.2f} "
          "GiB. Use a smaller cohort, raise memory_budget, or a streaming defence "
          "(fs.aggregators.norm_bounded_mean, which is a sum of clipped updates)."
      )


def _population_state_fits(one_client_state, num_clients: int, name: str) -> None:
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


def batch_spec(algorithm: Algorithm, population: Population):
  """``(batch_size, spec)``: the shapes of one batch the loss sees (mask included)."""
  loss_batch = algorithm.batch_size_hint
  bsz = population.max_examples if loss_batch is None else loss_batch
  spec = {
      k: jax.ShapeDtypeStruct((bsz, *v.shape), v.dtype)
      for k, v in population.example_spec().items()
  }
  spec[MASK_KEY] = jax.ShapeDtypeStruct((bsz,), jnp.float32)
  return bsz, spec


def round_traces(plan: RoundPlan, state: Any, population: Population) -> None:
  """Abstract-evaluates the loss and the optimizers to turn shape errors into clear messages."""
  algo = plan.algorithm
  _, spec = batch_spec(algo, population)
  check = getattr(algo.loss_fn, "check_population", None)
  if check is not None:  # the library's own checks name the feature: before the loss trace
    check(state.params, population)
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
  train_params, _ = plan.views(state.params)
  if algo.client_optimizer is not None:
    try:
      opt_state = jax.eval_shape(algo.client_optimizer.init, train_params)
      jax.eval_shape(algo.client_optimizer.update, train_params, opt_state, train_params)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"client_optimizer does not fit the params' structure: {e}") from e
  try:
    jax.eval_shape(algo.server_optimizer.update, train_params, state.opt_state, train_params)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"server_optimizer does not fit the params' structure: {e}") from e


def same_layout(expected: Any, state: Any) -> None:
  """Refuses a state whose structure or leaf shapes differ from ``expected`` (keys aside),
  naming the first piece that differs.

  Raises:
    ValueError: the state was built for another configuration, population or plan.
  """
  def leaves(t):
    t = dataclasses.replace(t, key=None)
    return jax.tree.structure(t), [(jax.tree_util.keystr(p), np.shape(x), jnp.result_type(x))
                                   for p, x in jax.tree_util.tree_leaves_with_path(t)]

  (want_tree, want), (got_tree, got) = leaves(expected), leaves(state)
  if want_tree == got_tree and want == got:
    return
  where = ""
  if want_tree == got_tree:
    path, shape, dtype = next(w for w, g in zip(want, got, strict=True) if w != g)
    g = got[want.index((path, shape, dtype))]
    where = (f" state{path} is {g[1]} {g[2]}, this Simulation's plan needs {shape} {dtype}"
             " (a leading axis of the client count for per-client state);")
  raise ValueError(
      "state does not match this Simulation (its optimizer, aggregator or client state has "
      f"another structure or shape):{where} build it with this sim.init(params, key) or "
      "sim.restore(...)."
  )


def run_args(num_rounds, *, block_size, eval_every, eval_fn, checkpoint_dir, checkpoint_every,
             log_dir, tensorboard, accountant, on_nonfinite) -> tuple[int, int, int | None,
                                                                      int | None, str]:
  """Checks :meth:`~fedjax_sim.Simulation.run`'s schedule arguments.

  Returns:
    ``(num_rounds, block_size, eval_every, checkpoint_every, on_nonfinite)``, the block size
    defaulted to ``eval_every`` or ``min(num_rounds, 100)``.
  """
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
  if accountant not in ("rdp", "pld"):
    raise ValueError(f"accountant must be 'rdp' or 'pld'; got {accountant!r}.")
  if tensorboard and not log_dir:
    raise ValueError("tensorboard=True needs log_dir (where the event files go).")
  return num_rounds, block_size, eval_every, checkpoint_every, policy


# -- the plan --------------------------------------------------------------------------------


def _assemble(algorithm, sampler, population, params, system, performance) -> RoundPlan:
  """The one ``RoundPlan(...)`` of the package: the trainable view resolved against
  ``params`` and the context carrying its template."""
  mask = None
  if algorithm.trainable is not None:
    mask = _views.resolve(algorithm.trainable, params)
  plan = RoundPlan(algorithm, sampler, base_context(sampler, population), system=system,
                   trainable_mask=mask, performance=performance)
  return with_template(plan, params)


def with_template(plan: RoundPlan, params: Any) -> RoundPlan:
  """``plan`` whose context carries the shapes of ``params``' trainable view.

  Returns:
    The plan.
  """
  train, _ = plan.views(params)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), train)
  return dataclasses.replace(plan, context=plan.context._replace(params_template=template))


def mesh_across_processes(mesh):
  """Returns ``mesh``; warns when a run of several processes has none: each process would then
  run the whole simulation by itself (the same results on every one, and no speed-up)."""
  if mesh is None and jax.process_count() > 1:
    warnings.warn(
        f"this Simulation has no mesh in a run of {jax.process_count()} processes, so every "
        "process runs the whole simulation by itself (same results, no speed-up). Pass "
        "mesh=fs.sharding.clients_mesh() to split the cohorts over the processes, or leave "
        "chunk_size=None and population_on='device' (on CPU that mesh is the default).",
        stacklevel=3)
  return mesh


def plan_for(algorithm: Algorithm, sampler, population: Population, params: Any, *,
             system: SystemModel | None = None, chunk_size: int = 1, **performance) -> RoundPlan:
  """A :class:`~fedjax_sim.core.RoundPlan` for ``params`` with explicit speed settings.

  Args:
    algorithm: the algorithm.
    sampler: the cohort sampler.
    population: the clients' data (its size and client sizes go into the context).
    params: the model (concrete or ``jax.ShapeDtypeStruct`` leaves).
    system: optional :class:`~fedjax_sim.systems.SystemModel`.
    chunk_size: clients vmapped together (default 1).
    **performance: the other :class:`~fedjax_sim.core.Performance` settings
      (``sort_by_size``, ``unbatched_single_client``, ``mesh``).

  Returns:
    The plan, its context holding the trainable parameters' template.
  """
  for name, value, kind, spelled in (
      ("algorithm", algorithm, Algorithm, "fs.algorithms.Algorithm (e.g. fedavg(...))"),
      ("population", population, Population, "fs.Population (e.g. Population.from_arrays)")):
    if not isinstance(value, kind):  # e.g. the name "fedavg": the API takes values, not names
      raise TypeError(f"plan_for: {name} must be an {spelled}; got {type(value).__name__} "
                      f"{value!r:.80}.")
  return _assemble(algorithm, sampler, population, params, system,
                   Performance(chunk_size=chunk_size, **performance))


class Planned(NamedTuple):
  """What :func:`plan` fixes: the plan, the initial state's shapes and the memory budget."""

  plan: RoundPlan
  state_spec: Any
  memory_budget: int


def memory_budget(budget: int | None, population, state_spec=None, *, mesh=None,
                  population_on: str = "device", reserved_bytes: int = 0) -> int:
  """``budget``, or by default the device's budget after the resident population and state
  (and ``reserved_bytes`` more the caller keeps on the device).

  Returns:
    Bytes per device for the client pass.
  """
  if budget is not None:
    return budget
  return _memory.device_memory_budget(reserved_bytes + _memory.resident_bytes(
      population, state_spec, mesh=mesh, population_on=population_on))


def plan(algorithm: Algorithm, sampler, population: Population, params: Any, key: jax.Array, *,
         system: SystemModel | None = None, performance: Performance | None = None,
         budget: int | None = None, population_on: str = "device", tuner=None,
         reserved_bytes: int = 0) -> Planned:
  """The whole plan of a run in one pass, with every check that needs the params.

  Resolves the trainable view, traces the initial state's shapes, checks the state pieces
  against memory and fixes the chunk size (``performance.chunk_size``, fitted to the mesh, or
  automatic from the memory budget and the model size, :func:`fedjax_sim.memory.chunk_size_for`).

  Args:
    algorithm: the algorithm.
    sampler: the cohort sampler.
    population: the clients' data (as placed).
    params: the model.
    key: the run key (its shape and type for the initial state).
    system: optional system model.
    performance: the requested speed settings (``chunk_size=None``: automatic); default
      ``Performance()``.
    budget: bytes per device for the client pass; None: from the device's free memory.
    population_on: where the population lives (``"device"``, ``"sharded"``, ``"host"``).
    tuner: times candidate chunks for ``performance.autotune`` (``chunk_size="auto"``):
      :func:`fedjax_sim.runs.tuning.tune_plan`.
    reserved_bytes: device bytes the run keeps besides the population and the state (the
      asynchronous ring of model versions), taken off the default budget.

  Returns:
    A :class:`Planned`.

  Raises:
    ValueError: a state piece does not fit the params or memory (named).
  """
  performance = Performance() if performance is None else performance
  if performance.per_device_scan and (performance.mesh is None or population_on != "device"):
    raise ValueError(
        f"Performance(per_device_scan=True) needs a mesh and the population replicated on it "
        f"(population_on='device'); got mesh={performance.mesh!r}, "
        f"population_on={population_on!r}. Each device would gather the whole population "
        "every round: use per_device_scan=False (the partitioner's split) with a sharded or "
        "host population.")
  draft = _assemble(algorithm, sampler, population, params, system,
                    dataclasses.replace(performance, chunk_size=1, mesh=None))
  where = dict(mesh=performance.mesh, population_on=population_on,
               reserved_bytes=reserved_bytes)
  try:
    spec = jax.eval_shape(lambda p, k: initial_state(draft, p, k), params, key)
  except Exception:  # noqa: BLE001 - the checks below name what does not fit
    state_pieces(draft, params, memory_budget(budget, population, **where))
    raise
  budget = memory_budget(budget, population, spec, **where)
  state_pieces(draft, params, budget)
  bsz, batch = batch_spec(algorithm, population)
  steps = step_flops = conv = None
  if (performance.chunk_size is None and performance.mesh is None
      and _memory.default_device().platform == "cpu"):
    # The CPU rule weighs a light dense model's chunk against one cohort's exact padding; the
    # step's FLOPs and whether it convolves are counted from the loss's jaxpr.
    steps = _autotune.cohort_steps(np.asarray(population.num_examples),
                                   sampler.max_cohort_size, bsz, system=system,
                                   planned_steps=algorithm.planned_steps)
    step_flops, conv = _step_flops(algorithm, params, batch, key)
  chunk = _memory.chunk_size_for(
      sampler.max_cohort_size, params, draft.views(params)[1], batch, bsz, budget,
      performance.mesh, performance.chunk_size, steps=steps,
      sort_by_size=performance.sort_by_size, step_flops=step_flops, convolutional=conv)
  trim = performance.trim_last_batch
  if trim is None:  # automatic: for clients that run alone, where the step is heavy
    per_device = (1 if performance.mesh is None or not performance.per_device_scan
                  else sharding.mesh_size(performance.mesh))
    # (With chunk_size="auto" the tuned chunk may be one: decided for it too. The round trims
    # only clients that do run alone, so the flag is inert on vmapped chunks.)
    alone = performance.unbatched_single_client and (chunk == per_device
                                                     or performance.autotune is not None)
    if alone and step_flops is None:
      step_flops, conv = _step_flops(algorithm, params, batch, key)
    # Without partitionable threefry a cut batch's dropout draws would differ from the full
    # one's (results would then depend on the chunk size): not trimmed.
    trim = bool(alone and step_flops is not None and step_flops >= _memory.TRIM_STEP_FLOPS
                and jax.config.jax_threefry_partitionable
                and _traces_at_last_batch_sizes(algorithm, params, batch, bsz, key) is None)
  elif trim:
    error = _traces_at_last_batch_sizes(algorithm, params, batch, bsz, key)
    if error is not None:
      raise ValueError(
          f"Performance(trim_last_batch=True): the loss does not trace on a batch of "
          f"{error[0]} examples (a trimmed last batch; the full batch is {bsz}): {error[1]}. "
          "Make the loss work for any batch size, or pass trim_last_batch=False (or None: "
          "automatic, which does not trim such a loss).")
  planned = dataclasses.replace(
      draft, performance=dataclasses.replace(performance, chunk_size=chunk,
                                              trim_last_batch=trim))
  if performance.autotune is not None:
    if tuner is None:
      raise ValueError("chunk_size='auto' is measured by Simulation.init; plan() needs "
                       "tuner=fedjax_sim.runs.tuning.tune_plan to time the candidates.")
    planned = _tuned(planned, population, params, key, batch, bsz, budget, population_on, tuner)
  return Planned(planned, spec, budget)


def _traces_at_last_batch_sizes(algorithm: Algorithm, params: Any, batch: dict, bsz: int,
                                key: jax.Array):
  """None when the loss traces (abstractly) on every trimmed last-batch size of ``bsz``; else
  ``(size, error)`` for the first that fails (a loss written for one batch size)."""
  if algorithm.loss_fn is None:
    return None
  for size in last_batch_sizes(bsz):
    cut = {k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype) for k, v in batch.items()}
    try:
      jax.eval_shape(algorithm.loss_fn, params, cut, key)
    except Exception as e:  # noqa: BLE001 - reported (explicit) or not trimmed (automatic)
      return size, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def _step_flops(algorithm: Algorithm, params: Any, batch: dict, key: jax.Array):
  """``(FLOPs, convolves)`` of one local step (3x the loss's forward on one batch, counted from
  its jaxpr by :func:`fedjax_sim.flops.count_flops`), or ``(None, None)`` where the algorithm
  has no ``loss_fn`` or the counter cannot count it (a ``while`` loop)."""
  if algorithm.loss_fn is None:
    return None, None
  try:
    counts = _flops.count_flops(algorithm.loss_fn, params, batch, key)
  except Exception:  # noqa: BLE001 - uncountable: the rule falls back to 6 x params x batch
    return None, None
  return 3.0 * counts["total"], counts["conv"] > 0


def _tuned(plan: RoundPlan, population, params, key, batch, bsz: int, budget: int,
           population_on: str, tuner) -> RoundPlan:
  """``plan`` at the measured chunk of its ``performance.autotune`` request
  (:func:`fedjax_sim.autotune.tune_plan`); candidates are checked against the memory-bound
  chunk before anything compiles."""
  request, k = plan.performance.autotune, plan.cohort_size
  n = 1 if plan.mesh is None else sharding.mesh_size(plan.mesh)
  frozen = param_count(plan.views(params)[1])
  example_bytes = sum(int(np.prod(v.shape[1:])) * np.dtype(v.dtype).itemsize
                      for v in batch.values())
  bound = min(k, n * _memory.memory_bound_chunk(param_count(params), example_bytes, bsz, budget,
                                                frozen))
  candidates = request.candidates or _autotune.candidates_for(k, bound, n)
  if max(candidates) > bound:
    raise ValueError(
        f"chunk_size: candidate {max(candidates)} exceeds {bound}, the largest chunk that fits "
        f"memory_budget={budget} bytes for this model; drop it, pass a larger memory_budget, or "
        "pass chunk_size='auto' (candidates up to the memory bound).")
  signature = ("chunk_size", plan.algorithm.name, str(plan.context.params_template),
               {name: (v.shape, str(v.dtype)) for name, v in batch.items()}, k, n,
               np.asarray(population.num_examples).tolist(), population_on,
               plan.sort_by_size, plan.unbatched_single_client, candidates)
  if plan.system is not None:  # its stragglers and deadline set the steps, and the order
    signature += (("system", repr(plan.system), plan.algorithm.planned_steps is not None),)
  # Timed nearest-first around the model's own chunk (plan.chunk_size, memory.chunk_size_for):
  # the budget may run out before the last candidates, so the likely winners go first (on CPU
  # the small chunks, on an accelerator the large ones).
  candidates = tuple(sorted(candidates, key=lambda c: (abs(math.log2(c / plan.chunk_size)), c)))
  # The recorded padding follows the round's order: with a system model, the steps the
  # clients run (stragglers, deadline; core.cohort_slots sorts by them), else their sizes.
  steps = _autotune.cohort_steps(np.asarray(population.num_examples), k, bsz,
                                 system=plan.system, planned_steps=plan.algorithm.planned_steps)
  choice = tuner(plan, population, params, key, request, candidates, signature=signature,
                 steps=steps, population_on=population_on)
  return plan.with_performance(chunk_size=choice.choice, tuning=choice)


def check_horizon(algorithm: Algorithm, start: int, num_rounds: int, sampler=None) -> None:
  """Refuses a run past the aggregator's strategy matrix (a fixed-size BandMF / tree), or past
  the rounds a participation-capped sampler covers (``max_participations`` with ``num_rounds``)."""
  cover = getattr(sampler, "num_rounds", None)
  if cover is not None and start + num_rounds > cover:
    raise ValueError(
        f"num_rounds={num_rounds} from round {start} runs past the sampler's num_rounds={cover}: "
        f"its cap max_participations={sampler.max_participations} holds only over those rounds "
        "(each client's window of cycles would wrap). Build the sampler with num_rounds = the "
        "run's length.")
  horizon = getattr(algorithm.aggregator, "horizon", None)
  if horizon is not None and start + num_rounds > horizon:
    raise ValueError(
        f"num_rounds={num_rounds} from round {start} runs past the aggregator's "
        f"strategy matrix ({horizon} rounds): build it for the run's length "
        "(dp_ftrl_mean(num_rounds=...), band_mf_mean(strategy=[T, T] matrix)), or use "
        "band_mf_mean's Toeplitz coefficients (any length).")
