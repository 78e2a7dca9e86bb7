"""A population kept in host memory: each round's cohort is gathered ahead of time on the host.

``Simulation(..., population_on="host")`` keeps the examples (the bulk of a population) in host
NumPy arrays; only the per-client ``offsets`` and ``num_examples`` live on the device. Before a
block of rounds runs, the host

1. draws the block's cohorts with the same in-jit sampler and keys as the round step
   (``Simulation._sample_cohort``, a pure function of the run key and the round number),
2. gathers those clients' examples into a compact CSR buffer per round (``[rounds, capacity,
   ...]``, ``capacity`` = the examples of the ``K`` largest clients, so shapes are static),
3. transfers it to the device.

Inside the program each round rebuilds the cohort's offsets into that buffer and runs the usual
round step, so results equal the device-resident run exactly. The gather and transfer of block
``b + 1`` run in a background thread while block ``b`` computes (double buffering: at most two
blocks of cohort examples are held). ``block_size`` in :meth:`Simulation.run` bounds the buffer:
``2 * block_size * capacity`` examples.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import sharding as _sharding
from fedjax_sim.data.population import Population


def to_host(population: Population) -> Population:
  """The same population with its features as host NumPy arrays (offsets stay on device)."""
  return Population(
      {k: np.asarray(v) for k, v in population.features.items()},
      population.offsets,
      population.num_examples,
      population.max_examples,
      population.labels,
  )


def cohort_capacity(num_examples: np.ndarray, max_cohort_size: int) -> int:
  """Rows of a round's buffer: the examples of the ``max_cohort_size`` largest clients."""
  sizes = np.sort(np.asarray(num_examples))[::-1][:max_cohort_size]
  return max(int(sizes.sum()), 1)


def gather_rows(
    offsets: np.ndarray, num_examples: np.ndarray, ids: np.ndarray, mask: np.ndarray
) -> np.ndarray:
  """Rows of the cohort's real clients, in cohort order, concatenated (vectorised CSR gather).

  Examples:
    >>> import numpy as np
    >>> from fedjax_sim.host_population import gather_rows
    >>> gather_rows(np.array([0, 3, 5]), np.array([3, 2, 4]), np.array([2, 0, 1]),
    ...             np.array([True, True, False])).tolist()
    [5, 6, 7, 8, 0, 1, 2]
  """
  n = np.where(mask, num_examples[ids], 0)
  starts = offsets[ids] - (np.cumsum(n) - n)
  return np.repeat(starts, n) + np.arange(int(n.sum()))


def cohort_offsets(population: Population, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """In-jit: the population's offsets with the cohort's clients pointing into the round buffer."""
  n = jnp.where(mask, population.num_examples[ids], 0)
  starts = jnp.cumsum(n) - n
  write = jnp.where(mask, ids, population.num_clients)
  return population.offsets.at[write].set(starts.astype(jnp.int32), mode="drop")


class HostFeeder:
  """Runs a round (``block=None``) or a block of rounds of ``sim`` on host-gathered cohorts.

  Called like the device-resident entry points: ``feeder(state, population)`` for one round,
  ``feeder(state, population, num_active)`` for a block; ``population`` is ignored (the
  simulation's host population is used).
  """

  def __init__(self, sim: Any, block: int | None):
    self.sim = sim
    self.block = block
    pop = sim.population
    self.features = pop.features
    self.offsets = np.asarray(pop.offsets)
    self.num_examples = np.asarray(pop.num_examples)
    self.capacity = cohort_capacity(self.num_examples, sim.max_cohort_size)
    self.meta = Population({}, pop.offsets, pop.num_examples, pop.max_examples)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: tuple[int, Any, concurrent.futures.Future] | None = None
    rounds = 1 if block is None else block
    n = pop.num_clients

    def cohorts(key, start):
      return jax.vmap(lambda r: sim._sample_cohort(key, r, n)[0])(start + jnp.arange(rounds))

    self._cohorts = jax.jit(cohorts)
    self._fn = jax.jit(self._program, donate_argnums=0)

  # -- device side ----------------------------------------------------------------------------
  def _round(self, state, meta, features, halt=False):
    cohort, _ = self.sim._sample_cohort(state.key, state.round, meta.num_clients)
    offsets = cohort_offsets(meta, cohort.ids, cohort.mask)
    pop = Population(features, offsets, meta.num_examples, meta.max_examples)
    return self.sim._round_step(state, pop, halt)

  def _program(self, state, meta, features, num_active, halt):
    sim = self.sim
    if self.block is None:
      sim.num_traces["round"] += 1
      return sim._placed(*self._round(state, meta, jax.tree.map(lambda f: f[0], features)))
    sim.num_traces["block"] += 1
    first = jax.tree.map(lambda f: f[0], features)
    _, metric_shapes = jax.eval_shape(self._round, state, meta, first)
    skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

    def body(carry, xs):  # as Simulation._block_fn: a non-finite round halts under ``halt``
      (state, halted), (i, feats) = carry, xs
      state, metrics = jax.lax.cond(
          (i < num_active) & ~halted, lambda s: self._round(s, meta, feats, halt),
          lambda s: (s, skipped), state
      )
      return (state, halted | (halt & (metrics["nonfinite"] > 0))), metrics

    (state, _), metrics = jax.lax.scan(
        body, (state, jnp.bool_(False)), (jnp.arange(self.block), features))
    return sim._placed(state, metrics)

  # -- host side ------------------------------------------------------------------------------
  def _gather(self, key_data: np.ndarray, impl, start: int):
    key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=impl)
    cohorts = jax.device_get(self._cohorts(key, jnp.int32(start)))
    ids, mask = np.asarray(cohorts.ids), np.asarray(cohorts.mask)
    out = {}
    for name, values in self.features.items():
      buf = np.zeros((ids.shape[0], self.capacity, *values.shape[1:]), values.dtype)
      for r in range(ids.shape[0]):  # rounds of the block; the clients are gathered at once
        rows = gather_rows(self.offsets, self.num_examples, ids[r], mask[r])
        buf[r, : rows.size] = values[rows]
      out[name] = buf
    mesh = self.sim.mesh
    if mesh is None:
      return jax.device_put(out)
    return _sharding.put_replicated(out, mesh)

  def __call__(self, state, population, num_active=None, halt=False):
    del population
    start = int(state.round)
    key_data = np.asarray(jax.random.key_data(state.key))
    impl = jax.random.key_impl(state.key)
    pending, self._pending = self._pending, None
    if pending is not None and pending[0] == start and np.array_equal(pending[1], key_data):
      features = pending[2].result()
    else:
      features = self._gather(key_data, impl, start)
    active = (1 if self.block is None else self.block) if num_active is None else int(num_active)
    out = self._fn(state, self.meta, features, jnp.int32(active), jnp.bool_(halt))  # async
    nxt = start + active
    self._pending = (nxt, key_data, self._pool.submit(self._gather, key_data, impl, nxt))
    return out
