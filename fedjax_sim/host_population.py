"""A population kept in host memory: each round's cohort is gathered ahead of time on the host.

``Simulation(..., population_on="host")`` keeps the examples (the bulk of a population) in host
NumPy arrays; only the per-client ``offsets`` and ``num_examples`` live on the device. Before a
block of rounds runs, the host

1. draws the block's cohorts with the same in-jit sampler and keys as the round step
   (:func:`fedjax_sim.core.sample_cohort`, a pure function of the run key and the round number),
2. gathers those clients' examples into a compact CSR buffer per round (``[rounds, capacity,
   ...]``, ``capacity`` = the examples of the ``K`` largest clients, so shapes are static),
3. transfers it to the device.

Inside the program each round rebuilds the cohort's offsets into that buffer and runs the usual
round step, so results equal the device-resident run exactly. The gather and transfer of block
``b + 1`` run in a background thread while block ``b`` computes (double buffering: at most two
blocks of cohort examples are held). ``block_size`` in :meth:`Simulation.run` bounds the buffer:
``2 * block_size * capacity`` examples.

A population opened with :func:`fedjax_sim.data.disk.open_native` (features memory-mapped from
disk) is read the same way, with one ``pread`` per client and feature into the buffer: host
memory stays bounded by the two blocks, never by the dataset (docs/disk.md).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import core, programs
from fedjax_sim import sharding as _sharding
from fedjax_sim.data import disk as _disk
from fedjax_sim.data.population import Population


def to_host(population: Population) -> Population:
  """The same population with its features as host NumPy arrays (offsets stay on device)."""
  return Population(
      {k: v if isinstance(v, np.memmap) else np.asarray(v)  # a disk population stays on disk
       for k, v in population.features.items()},
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


def host_round(plan: core.RoundPlan, state, meta: Population, features, halt=False):
  """In-jit: round ``state.round`` on its cohort's examples gathered into ``features``.

  ``meta`` holds the population's offsets and sizes (no features); the cohort is drawn again
  here (:func:`fedjax_sim.core.sample_cohort`), exactly as the host drew it.

  Returns:
    ``(state, metrics)`` of :func:`fedjax_sim.core.round_step`.
  """
  cohort, _ = core.sample_cohort(plan, state.key, state.round)
  offsets = cohort_offsets(meta, cohort.ids, cohort.mask)
  pop = Population(features, offsets, meta.num_examples, meta.max_examples)
  return core.round_step(plan, state, pop, halt)


class HostFeeder:
  """Runs a round (``block=None``) or a block of rounds of ``plan`` on host-gathered cohorts.

  Called like the device-resident programs: ``feeder(state, population)`` for one round,
  ``feeder(state, population, num_active, halt)`` for a block; ``population`` is ignored (the
  host population given here is used).
  """

  def __init__(self, plan: core.RoundPlan, population: Population, block: int | None):
    self.plan = plan
    self.block = block
    pop = population
    self.features = pop.features
    self.offsets = np.asarray(pop.offsets)
    self.num_examples = np.asarray(pop.num_examples)
    self.capacity = cohort_capacity(self.num_examples, plan.cohort_size)
    self.meta = Population({}, pop.offsets, pop.num_examples, pop.max_examples)
    # A native disk population (fedjax_sim.data.disk): cohorts are read with pread, not paged in.
    self.reader = _disk.CohortReader(pop.features, pop.labels) if _disk.on_disk(pop) else None
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: tuple[int, Any, concurrent.futures.Future] | None = None
    rounds = 1 if block is None else block
    self._cohorts = programs.Program(lambda key, start: jax.vmap(
        lambda r: core.sample_cohort(plan, key, r)[0])(start + jnp.arange(rounds)))

    def one_round(state, meta, features, num_active, halt):
      del num_active, halt
      first = jax.tree.map(lambda f: f[0], features)
      return programs.placed(plan, *host_round(plan, state, meta, first))

    def block_of_rounds(state, meta, features, num_active, halt):
      step = lambda s, feats, h: host_round(plan, s, meta, feats, h)
      return programs.placed(
          plan, *programs.scan_rounds(step, state, num_active, halt, block, xs=features))

    self.program = programs.Program(one_round if block is None else block_of_rounds,
                                    donate_argnums=0)

  @property
  def num_compiles(self) -> int:
    return self.program.num_compiles

  # -- host side ------------------------------------------------------------------------------
  def _gather(self, key_data: np.ndarray, impl, start: int):
    key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=impl)
    cohorts = jax.device_get(self._cohorts(key, jnp.int32(start)))
    ids, mask = np.asarray(cohorts.ids), np.asarray(cohorts.mask)
    out = {}
    for name, values in self.features.items():
      buf = np.zeros((ids.shape[0], self.capacity, *values.shape[1:]), values.dtype)
      for r in range(ids.shape[0]):  # rounds of the block; the clients are gathered at once
        if self.reader is not None:
          self.reader.read(name, buf[r], self.offsets, self.num_examples, ids[r], mask[r])
          continue
        rows = gather_rows(self.offsets, self.num_examples, ids[r], mask[r])
        buf[r, : rows.size] = values[rows]
      out[name] = buf
    mesh = self.plan.mesh
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
    out = self.program(state, self.meta, features, jnp.int32(active), jnp.bool_(halt))  # async
    nxt = start + active
    self._pending = (nxt, key_data, self._pool.submit(self._gather, key_data, impl, nxt))
    return out
