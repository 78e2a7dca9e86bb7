"""Timing a plan's round at candidate chunk sizes, for ``Simulation(chunk_size="auto")``.

:func:`fedjax_sim.runs.planning.plan` picks and checks the candidates (before anything
compiles) and hands them to :func:`tune_plan`, which compiles and times what the engine would
run (one round, :func:`round_runner`; :class:`fedjax_sim.AsyncSimulation` passes its own
runner, one server step); the measuring, the cache and the choice are
:mod:`fedjax_sim.autotune`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from fedjax_sim import host_population, programs, sharding
from fedjax_sim.autotune import AutoChunk, ChunkChoice, cache_key, cache_path, tune_chunk_size
from fedjax_sim.plan import initial_state

__all__ = ["round_runner", "tune_plan"]


def tune_plan(plan: Any, population: Any, params: Any, key: jax.Array, request: AutoChunk,
              candidates: Sequence[int], *, signature: Any, steps: Sequence[int] | None = None,
              population_on: str = "device",
              runner: Callable[[Any], Callable[[], Any]] | None = None) -> ChunkChoice:
  """Times ``plan``'s round at each candidate chunk size (compile + first round, then
  ``request.timed_calls`` rounds, each from a fresh initial state) and returns the fastest.

  What the engine would run is what is timed: the one-round block program (or the host feeder
  with ``population_on="host"``) of ``plan.with_performance(chunk_size=c)``, or what
  ``runner`` builds for that plan.

  Args:
    plan: a :class:`~fedjax_sim.core.RoundPlan` (its chunk size is replaced per candidate).
    population: the population as placed.
    params: the initial model (copied per call: the round donates its state).
    key: the run key.
    request: the :class:`AutoChunk` (budget, cache directory, timed calls).
    candidates: the chunk sizes to time.
    signature: what identifies the workload for the cache key (:func:`cache_key`).
    steps: per-client local steps of a cohort, for the recorded padding.
    population_on: where the population lives.
    runner: ``plan -> run`` for another program over the same plan (``run()`` runs one timed
      unit from a fresh state and blocks until it is done; :class:`fedjax_sim.AsyncSimulation`
      times one server step); ``signature`` should then name that program. Default: one round
      (:func:`round_runner`).

  Returns:
    A :class:`ChunkChoice`.
  """
  key_str = cache_key(signature)
  if key_str in request.memo:
    return request.memo[key_str]

  if runner is None:
    runner = lambda p: round_runner(p, population, params, key, population_on)  # noqa: E731

  def build(chunk):
    return runner(plan.with_performance(chunk_size=chunk, autotune=None, tuning=None))

  choice = tune_chunk_size(candidates, build, steps=steps, timed_calls=request.timed_calls,
                           time_budget_s=request.budget_s,
                           cache_path=cache_path(request.cache_dir), key=key_str)
  request.memo[key_str] = choice
  return choice


def round_runner(plan: Any, population: Any, params: Any, key: jax.Array,
                 population_on: str = "device") -> Callable[[], None]:
  """``run()``: one round of ``plan``'s block program (or host feeder) from a fresh initial
  state (the round donates its state), blocking until it is done.

  Returns:
    The zero-argument callable.
  """
  program = (host_population.HostFeeder(plan, population, 1) if population_on == "host"
             else programs.block_program(plan, 1))

  def run():
    state = initial_state(plan, jax.tree.map(jax.numpy.array, params), key)
    if plan.mesh is not None:
      state = sharding.place_state(state, plan.mesh)
    state, _ = program(state, population, jax.numpy.int32(1), jax.numpy.bool_(False))
    jax.block_until_ready(state.params)
  return run
