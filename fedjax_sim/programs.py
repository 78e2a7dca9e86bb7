"""The one place that compiles: a round, a block of rounds, and their output placement.

:class:`Program` is ``jax.jit`` compiled ahead of time once per input signature (shapes, dtypes,
shardings), so the number of compilations is counted on the host, never by code running under
a trace. :func:`round_program` and :func:`block_program` build the two programs a
:class:`~fedjax_sim.Simulation` runs from a :class:`~fedjax_sim.core.RoundPlan`;
:func:`scan_rounds` is the block's ``lax.scan`` (shared with the host-resident feeder,
:mod:`fedjax_sim.host_population`), and :func:`placed` pins the output placement on a mesh.

Examples:
  >>> import jax.numpy as jnp
  >>> from fedjax_sim.programs import Program
  >>> double = Program(lambda x: 2 * x)
  >>> double(jnp.ones(3)).tolist(), double(jnp.zeros(3)).tolist(), double.num_compiles
  ([2.0, 2.0, 2.0], [0.0, 0.0, 0.0], 1)
  >>> _ = double(jnp.ones(4)); double.num_compiles  # a new shape is a new program
  2
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import core
from fedjax_sim import memory as _memory
from fedjax_sim import nonfinite as _nf
from fedjax_sim import sharding as _sharding


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  sig = []
  for x in leaves:
    if isinstance(x, jax.Array):
      sig.append((x.shape, x.dtype, x.aval.weak_type, x.sharding))
    else:
      sig.append((type(x), np.shape(x), getattr(x, "dtype", None)))
  return treedef, tuple(sig)


class Program:
  """A function jitted once and compiled ahead of time once per input signature (and JAX
  settings that change what it computes: ``jax_default_prng_impl``,
  ``jax_threefry_partitionable``, ``jax_enable_x64``).

  Args:
    fn: the (pure) function.
    donate_argnums: positional arguments whose buffers the program may reuse.

  Attributes:
    num_compiles: how many executables were compiled (one per distinct input signature).
  """

  def __init__(self, fn: Callable, *, donate_argnums: int | tuple[int, ...] = ()):
    self._jit = jax.jit(fn, donate_argnums=donate_argnums)
    self._executables: dict[tuple, Any] = {}

  @property
  def num_compiles(self) -> int:
    return len(self._executables)

  def lower(self, *args):
    """``jax.jit(fn).lower(*args)`` (for memory / cost analyses; not counted, not cached)."""
    return self._jit.lower(*args)

  def __call__(self, *args):
    # JAX's global settings can change what the same arguments compile to (the run's
    # fingerprint records them, fedjax_sim.runs.identity.jax_settings): a flip after a compile
    # compiles again instead of running the old setting's executable.
    sig = (_signature(args), jax.config.jax_default_prng_impl,
           jax.config.jax_threefry_partitionable, jax.config.jax_enable_x64)
    executable = self._executables.get(sig)
    if executable is None:
      executable = self._executables[sig] = self._jit.lower(*args).compile()
    return executable(*args)


def placed(plan: core.RoundPlan, state: core.ServerState, metrics):
  """Output placement on ``plan.mesh``: replicated server state and metrics, per-client state
  split along ``clients`` (where its leading axis divides). No mesh: unchanged."""
  mesh = plan.mesh
  if mesh is None:
    return state, metrics
  rep = _sharding.replicated(mesh)
  n = _sharding.mesh_size(mesh)
  client_states, agg_client_states = jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(
          x, _sharding.along_clients(mesh) if x.shape[0] % n == 0 else rep),
      (state.client_states, state.agg_client_states),
  )
  state = dataclasses.replace(
      _sharding.constrain(dataclasses.replace(state, client_states=(), agg_client_states=()),
                          rep),
      client_states=client_states,
      agg_client_states=agg_client_states,
  )
  return state, _sharding.constrain(metrics, rep)


def scan_rounds(step: Callable, state, num_active, halt, length: int, xs: Any = None):
  """``length`` rounds of ``step(state, x, halt) -> (state, metrics)`` in one ``lax.scan``.

  Rounds ``i >= num_active`` are skipped in-graph (one compilation serves a shorter last
  block), and so is every round after a non-finite one when ``halt`` is set.

  Returns:
    ``(state, metrics)`` with every metric stacked ``[length]`` (zeros for skipped rounds).
  """
  first = None if xs is None else jax.tree.map(lambda x: x[0], xs)
  # A trace cache, not a compile: the shape probe and the scan's body share one trace of the
  # round; XLA inlines the nested call into this program.
  step = jax.jit(step)
  _, shapes = jax.eval_shape(step, state, first, halt)
  skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, inputs):
    (state, halted), (i, x) = carry, inputs
    state, metrics = jax.lax.cond(
        (i < num_active) & ~halted, lambda s: step(s, x, halt), lambda s: (s, skipped), state)
    return (state, halted | (halt & (metrics[_nf.NONFINITE] > 0))), metrics

  (state, _), metrics = jax.lax.scan(body, (state, jnp.bool_(False)), (jnp.arange(length), xs))
  return state, metrics


def round_program(plan: core.RoundPlan) -> Program:
  """``program(state, population) -> (state, metrics)``: one round (``state`` donated).

  Returns:
    The :class:`Program`.
  """
  return Program(lambda state, population: placed(plan, *core.round_step(plan, state,
                                                                          population)),
                 donate_argnums=0)


def block_program(plan: core.RoundPlan, block: int) -> Program:
  """``program(state, population, num_active, halt) -> (state, metrics[block])``: a block of
  rounds in one ``lax.scan`` (``state`` donated; :func:`scan_rounds`).

  Returns:
    The :class:`Program`.
  """

  def run_block(state, population, num_active, halt):
    step = lambda s, _, h: core.round_step(plan, s, population, h)
    return placed(plan, *scan_rounds(step, state, num_active, halt, block))

  return Program(run_block, donate_argnums=0)


def time_block(program, state, population, num_rounds: int):
  """Runs a block program twice, timing the second run (the first compiles).

  Returns:
    ``(state, figures)``: ``seconds``, ``first_block_seconds`` (compile + first block),
    ``rounds_per_s``, the work counted in the timed block (``clients``, ``examples``,
    ``client_steps``, ``step_slots``) and ``nonfinite_rounds`` over both blocks (a diverged
    run's rounds are skipped, so its figures are not a speed).
  """
  figures = {"nonfinite_rounds": 0.0}
  for name in ("first_block_seconds", "seconds"):
    t0 = time.perf_counter()
    state, metrics = program(state, population, jnp.int32(num_rounds), jnp.bool_(False))
    jax.block_until_ready(state.params)
    figures[name] = time.perf_counter() - t0
    metrics = jax.device_get(metrics)
    figures["nonfinite_rounds"] += float(np.sum(metrics[_nf.NONFINITE]))
  figures["rounds_per_s"] = num_rounds / figures["seconds"]
  for k in ("clients", "examples", "client_steps", "step_slots"):
    figures[k] = float(np.sum(metrics[k]))
  return state, figures


def memory_analysis(plan: core.RoundPlan, population, state, *,
                    block_size: int | None = None) -> _memory.MemoryAnalysis:
  """XLA's memory analysis of the round of ``plan`` (compiled here, not run).

  Lowers the same jitted program that :meth:`fedjax_sim.Simulation.round` (or, with
  ``block_size``, :meth:`fedjax_sim.Simulation.run`'s block of rounds) executes, for ``state``'s
  shapes, and reads ``compiled.memory_analysis()``. ``state`` is not donated or modified; a tree
  of ``jax.ShapeDtypeStruct`` with the state's structure works too.

  Args:
    plan: the round plan (``sim.plan``, fixed by ``sim.init``).
    population: the population on the device.
    state: the ``ServerState`` (or its shapes).
    block_size: analyse the block of this many rounds instead of one round.

  Returns:
    A :class:`fedjax_sim.memory.MemoryAnalysis` (per device under a mesh).

  Raises:
    ValueError: a bad ``block_size``, or the backend gives no memory analysis.
  """
  if block_size is not None and (
      not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
    raise ValueError(f"block_size must be a positive int or None; got {block_size!r}.")
  if block_size is None:
    lowered = round_program(plan).lower(state, population)
  else:
    lowered = block_program(plan, block_size).lower(  # (state, pop, active, halt)
        state, population, jax.ShapeDtypeStruct((), np.int32),
        jax.ShapeDtypeStruct((), np.bool_))
  return _memory.analysis_of(lowered.compile())
