"""Many simulations in one compiled program: ``jax.vmap`` over a leading simulation axis.

:func:`sweep` runs S independent simulations, one per seed, each with its own values of some
float hyper-parameters (client / server learning rate, clip, noise multiplier, μ, ...). The
algorithm is built by a user function ``build(**hyper_parameters) -> Algorithm`` that is called
*inside* the vmapped program with traced scalars, so the swept values flow into the optax
transforms and aggregator stages as arrays, the way ``optax.sgd(learning_rate)`` already
accepts a ``jax.Array``. Every lane is first built on the host with its concrete values, so each
factory's own argument checks run on every value before anything is traced.

What can be swept: any float that the factories only compute with (learning rates, momentum,
clip, noise multiplier, μ, weight caps, ...). What cannot: anything that sets a shape, a loop
count or a Python branch (batch size, local steps or epochs, cohort / chunk size, model width):
each value of those is a different program and must be a separate run (:class:`Simulation`).
Integer-valued sweeps are refused for that reason.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import core, programs
from fedjax_sim import nonfinite as _nf
from fedjax_sim import sharding as _sharding
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data.population import Population
from fedjax_sim.plan import ServerState
from fedjax_sim.runs import planning
from fedjax_sim.runs.simulation import Simulation

#: Arguments that fix shapes or loop counts: sweeping one needs a separate run per value.
SHAPE_ARGUMENTS = frozenset({
    "batch_size", "local_steps", "local_epochs", "cohort_size", "chunk_size", "max_cohort_size",
    "num_rounds", "num_clients", "hidden", "width", "depth", "num_layers",
})


def _shape_error(name: str, why: str) -> ValueError:
  return ValueError(
      f"cannot sweep {name!r} in one program: {why}. A value that sets a shape, a loop count or a "
      f"Python branch compiles to a different program; run a separate fs.Simulation (or a "
      f"separate fs.sweep) for each value of {name!r} and sweep only float hyper-parameters."
  )


def _check_hyperparameters(hyperparameters, num_simulations: int) -> dict[str, np.ndarray]:
  if hyperparameters is None:
    return {}
  if not isinstance(hyperparameters, Mapping):
    raise TypeError(
        "hyperparameters must be a dict mapping build()'s argument names to 1-D arrays with one "
        f"value per simulation; got {type(hyperparameters).__name__}."
    )
  out = {}
  lengths = {}
  for name, values in hyperparameters.items():
    if not isinstance(name, str):
      raise TypeError(f"hyper-parameter names must be strings (build()'s arguments); got {name!r}.")
    if name in SHAPE_ARGUMENTS:
      raise _shape_error(name, "it sets a shape or a loop count")
    a = np.asarray(values)
    if a.ndim != 1:
      raise ValueError(
          f"hyperparameters[{name!r}] must be 1-D with one value per simulation; got shape "
          f"{a.shape}."
      )
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
      raise _shape_error(name, f"its values are {a.dtype} (integers set shapes and loop counts)")
    if not np.issubdtype(a.dtype, np.floating):
      raise TypeError(f"hyperparameters[{name!r}] must be floats; got dtype {a.dtype}.")
    lengths[name] = a.shape[0]
    out[name] = a.astype(np.float32)
  if any(n != num_simulations for n in lengths.values()):
    raise ValueError(
        f"every swept array needs one value per simulation ({num_simulations} seeds); got "
        f"lengths {lengths}."
    )
  return out


def _state_spec(plan: core.RoundPlan, algorithm: Algorithm, params) -> Any:
  """Shapes of every piece of the initial state ``algorithm`` builds under ``plan`` (derived
  from :func:`fedjax_sim.core.initial_state`, so no piece can be missed)."""
  lane_plan = dataclasses.replace(plan, algorithm=algorithm)
  spec = jax.eval_shape(lambda p, k: core.initial_state(lane_plan, p, k), params,
                        jax.random.key(0))
  return jax.tree.structure(spec), [(x.shape, x.dtype) for x in jax.tree.leaves(spec)]


def sweep(
    build: Callable[..., Algorithm],
    population: Population,
    params: Any,
    *,
    seeds: Sequence[int],
    num_rounds: int,
    hyperparameters: Mapping[str, Any] | None = None,
    on_nonfinite: str = "raise",
    **simulation_kwargs,
) -> tuple[ServerState, dict[str, np.ndarray]]:
  """Runs ``len(seeds)`` simulations in ONE compiled program (vmapped over simulations).

  Lane ``i`` is the simulation ``fs.Simulation(build(**{k: v[i]}), population, **kwargs)`` run
  from ``init(params, jax.random.key(seeds[i]))`` for ``num_rounds`` rounds: the same result, up
  to float tolerance, as that single run.

  Args:
    build: ``build(**hyper_parameters) -> fs.Algorithm``. Called once per lane with Python
      floats (argument checks) and once inside the program with traced float32 scalars, so it
      must only compute with them (pass them to ``optax.sgd``, ``dp_mean``, ``fedprox``'s
      ``mu``, ...), not use them as shapes, loop counts or in ``if``.
    population: the clients' data (shared by every lane).
    params: the initial model (shared by every lane).
    seeds: one int seed per simulation; S = ``len(seeds)``.
    num_rounds: rounds per simulation.
    hyperparameters: ``{name: values}``, each a 1-D float array of length S, passed to
      ``build`` by name. Default: none (a sweep over seeds only).
    on_nonfinite: a lane whose round goes non-finite (:mod:`fedjax_sim.nonfinite`) follows
      :meth:`Simulation.run`'s policy, lane by lane: ``"raise"`` (default) stops that lane at
      its first non-finite round (it keeps its last finite state; its later rounds' metrics
      are NaN; the other lanes run to the end) and then raises
      :class:`~fedjax_sim.nonfinite.NonFiniteError` naming each such lane (index, seed and
      hyper-parameter values), its ``state`` / ``metrics`` holding every lane's;
      ``"warn"`` skips such rounds (the lane keeps its state) and warns naming the lanes;
      ``"ignore"`` skips them silently (``metrics["nonfinite"]`` marks them).
    **simulation_kwargs: the rest of :class:`Simulation`'s arguments (``cohort_size``,
      ``sampler``, ``chunk_size``, ``system``, ...), shared by every lane. ``mesh=`` splits
      the *simulations* along the mesh's ``clients`` axis (S must be a multiple of its size;
      each device runs whole simulations on a replicated population).
      ``population_on="host"`` / ``"sharded"`` are not supported here.

  Returns:
    ``(states, metrics)``: a :class:`ServerState` whose leaves have a leading axis S, and
    ``metrics[name]`` a NumPy array ``[S, num_rounds]``.

  Raises:
    ValueError: swept arrays of different lengths, an integer-valued or shape-setting
      hyper-parameter, or a ``build`` whose states differ in shape across lanes (each says it
      must be a separate run); S not a multiple of the mesh's ``clients`` axis.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(120, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
    >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 12, 120))
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> def build(lr):
    ...   return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), batch_size=8,
    ...                               local_epochs=1)
    >>> states, metrics = fs.sweep(build, pop, jnp.zeros((3, 2)), seeds=[0, 1, 2],
    ...                            hyperparameters={"lr": [0.01, 0.1, 0.5]}, num_rounds=5,
    ...                            cohort_size=4)
    >>> states.params.shape, metrics["loss"].shape
    ((3, 3, 2), (3, 5))
  """
  run = compile_sweep(build, population, params, seeds=seeds, num_rounds=num_rounds,
                      hyperparameters=hyperparameters, on_nonfinite=on_nonfinite,
                      **simulation_kwargs)
  return run()


def compile_sweep(
    build: Callable[..., Algorithm],
    population: Population,
    params: Any,
    *,
    seeds: Sequence[int],
    num_rounds: int,
    hyperparameters: Mapping[str, Any] | None = None,
    on_nonfinite: str = "raise",
    **simulation_kwargs,
) -> CompiledSweep:
  """Builds :func:`sweep`'s program; ``run()`` executes it (compiled on the first call).

  Same arguments as :func:`sweep`; the returned ``run`` can be called again without
  recompiling (e.g. to time the program apart from its compilation).

  Returns:
    A :class:`CompiledSweep`: ``run() -> (states, metrics)``, ``run.num_compiles``.
  """
  if not callable(build):
    raise TypeError("build must be callable as build(**hyper_parameters) -> fs.Algorithm.")
  _nf.check_policy(on_nonfinite)
  if simulation_kwargs.get("population_on", "device") != "device":
    raise ValueError(
        f"fs.sweep keeps the population on the device; population_on="
        f"{simulation_kwargs['population_on']!r} is not supported here.")
  mesh = simulation_kwargs.pop("mesh", None)
  seeds_arr = np.asarray(seeds)
  if seeds_arr.ndim != 1 or seeds_arr.size == 0 or not np.issubdtype(seeds_arr.dtype, np.integer):
    raise ValueError(f"seeds must be a non-empty 1-D sequence of ints; got {seeds!r}.")
  if seeds_arr.min() < 0 or seeds_arr.max() >= 2**32:
    raise ValueError(f"seeds must lie in [0, 2**32); got {seeds!r}.")
  if not isinstance(num_rounds, (int, np.integer)) or isinstance(num_rounds, bool) or (
      num_rounds < 1):
    raise ValueError(f"num_rounds must be a positive int; got {num_rounds!r}.")
  num_sims = seeds_arr.shape[0]
  hps = _check_hyperparameters(hyperparameters, num_sims)
  if mesh is not None:
    devices = _sharding.mesh_size(mesh)
    if num_sims % devices:
      raise ValueError(
          f"{num_sims} simulations cannot be split over the {devices} devices of the mesh's "
          f"'clients' axis; use a multiple of {devices} simulations (or mesh=None).")

  lanes = [{k: float(v[i]) for k, v in hps.items()} for i in range(num_sims)]
  algorithms = [build(**lane) for lane in lanes]  # each lane's values meet the factories' checks
  for i, algo in enumerate(algorithms):
    if not isinstance(algo, Algorithm):
      raise TypeError(f"build(**hyper_parameters) must return an fs.Algorithm; got "
                      f"{type(algo).__name__} for simulation {i}.")
  sim = Simulation(algorithms[0], population, **simulation_kwargs)
  sim.init(params, jax.random.key(int(seeds_arr[0])))  # checks shapes, fixes the chunk size
  for algo in algorithms:  # a strategy matrix's length, a participation cap's rounds
    planning.check_horizon(algo, 0, int(num_rounds), sim.sampler)
  spec0 = _state_spec(sim.plan, algorithms[0], params)
  for i, algo in enumerate(algorithms[1:], start=1):
    if _state_spec(sim.plan, algo, params) != spec0:
      changed = [k for k in hps if lanes[i][k] != lanes[0][k]]
      raise _shape_error(
          ", ".join(changed) or "these values",
          f"simulation {i}'s algorithm has a state of another shape than simulation 0's",
      )

  # The lanes are vmapped, so a trimmed last batch's lax.switch would run every branch.
  plan0 = sim.plan.with_performance(trim_last_batch=False)

  def lane(seed, values, population):
    plan = dataclasses.replace(plan0, algorithm=build(**values))  # traced hyper-parameters
    state = core.initial_state(plan, params, jax.random.key(seed))
    halt = jnp.bool_(on_nonfinite == "raise")  # the lane stops at its first non-finite round
    return jax.lax.scan(lambda s, _: core.round_step(plan, s, population, halt), state, None,
                        length=num_rounds)

  vmapped = jax.vmap(lane, in_axes=(0, 0, None))
  seeds_dev = jnp.asarray(seeds_arr, jnp.uint32)
  values_dev = {k: jnp.asarray(v) for k, v in hps.items()}
  pop = sim.population
  if mesh is None:
    program = programs.Program(vmapped)
  else:  # simulations split along the 'clients' axis; every device holds the population
    lanes_sharding = _sharding.along_clients(mesh)
    seeds_dev, values_dev = _sharding.put((seeds_dev, values_dev), lambda x: lanes_sharding)
    pop = _sharding.place_population(pop, mesh)
    program = programs.Program(lambda *a: _sharding.constrain(vmapped(*a), lanes_sharding))
  try:
    jax.eval_shape(vmapped, seeds_dev, values_dev, pop)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
          jax.errors.TracerBoolConversionError, jax.errors.TracerArrayConversionError) as e:
    culprit = _find_static(lambda seed, values: lane(seed, values, pop), seeds_arr[0], lanes[0],
                           hps)
    first = str(e).splitlines()[0]
    raise _shape_error(culprit, f"build() or the algorithm uses it as a Python value ({first})") \
        from None
  names = [", ".join([f"seed={int(seeds_arr[i])}"] + [f"{k}={v:g}" for k, v in lanes[i].items()])
           for i in range(num_sims)]
  return CompiledSweep(program, (seeds_dev, values_dev, pop), on_nonfinite, names)


class CompiledSweep:
  """:func:`compile_sweep`'s program: ``run()`` executes it (compiled on the first call).

  Attributes:
    num_compiles: executables compiled so far: 1 after any number of calls, however many
      simulations (lanes) and hyper-parameter values the sweep holds.
  """

  def __init__(self, program: programs.Program, args: tuple, on_nonfinite: str = "raise",
               lane_names: Sequence[str] = ()):
    self._program, self._args = program, args
    self._policy, self._names = on_nonfinite, list(lane_names)

  @property
  def num_compiles(self) -> int:
    return self._program.num_compiles

  def __call__(self) -> tuple[ServerState, dict[str, np.ndarray]]:
    states, metrics = self._program(*self._args)
    metrics = {k: np.asarray(v) for k, v in _sharding.fetch(metrics).items()}
    self._apply_policy(states, metrics)
    return states, metrics

  def _apply_policy(self, states, metrics: dict[str, np.ndarray]) -> None:
    """``on_nonfinite`` lane by lane, as :meth:`Simulation.run` applies it to one run."""
    col = metrics.get(_nf.NONFINITE)
    if col is None or self._policy == "ignore" or not np.any(col > 0):
      return
    bad = [(i, int(np.flatnonzero(col[i] > 0)[0])) for i in range(col.shape[0])
           if np.any(col[i] > 0)]
    lines = []
    for i, r in bad:
      name = self._names[i] if i < len(self._names) else ""
      why = _nf.describe(r + 1, {k: float(v[i, r]) for k, v in metrics.items()})
      lines.append(f"simulation {i} ({name}): {why}")
    if self._policy == "warn":
      warnings.warn(f"{len(bad)} of {col.shape[0]} swept simulation(s) had non-finite rounds, "
                    f"skipped (the lane kept its state): {'; '.join(lines)}.", RuntimeWarning,
                    stacklevel=3)
      return
    for k, v in metrics.items():  # a halted lane repeated its failing round: not rounds
      if np.issubdtype(v.dtype, np.floating):
        metrics[k] = v = v.copy()
        for i, r in bad:
          v[i, r + 1:] = np.nan
    raise _nf.NonFiniteError(
        f"{len(bad)} of {col.shape[0]} swept simulation(s) went non-finite and stopped at "
        f"their last finite state (the others ran to the end): {'; '.join(lines)}. Lower "
        "their learning rates or clip, or pass on_nonfinite='warn' to skip such rounds.",
        round=bad[0][1] + 1, state=states, metrics=metrics)


def _find_static(lane, seed, lane0: dict[str, float], hps: dict[str, np.ndarray]) -> str:
  """The swept name that cannot be traced (each traced alone, the others concrete)."""
  for name in hps:
    fixed = {k: v for k, v in lane0.items() if k != name}
    try:
      jax.eval_shape(lambda v, fixed=fixed, name=name: lane(seed, {**fixed, name: v}),
                     jax.ShapeDtypeStruct((), jnp.float32))
    except Exception:  # noqa: BLE001 - any failure names this argument
      return name
  return ", ".join(hps)

