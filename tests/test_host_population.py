"""A host-resident population (cohorts gathered ahead of time) gives the device-resident result."""

import chex
import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.host_population import cohort_capacity, gather_rows


@pytest.fixture(scope="module")
def run_rounds(init_params):
  """``run_rounds(algo, pop, sampler, population_on)``: the Simulation, its state, its metrics
  after 5 rounds in blocks, and one more round's metrics."""

  def run(algo, pop, sampler, population_on):
    sim = fs.Simulation(algo, pop, sampler=sampler, chunk_size=3, population_on=population_on)
    state = sim.init(init_params(), jax.random.key(5))
    state, metrics = sim.run(state, num_rounds=5, block_size=2)  # blocks of 2, 2, 1 (+ prefetch)
    state, last = sim.round(state)
    return sim, state, metrics, last

  return run


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_host_population_equals_device_population(pop, loss_fn, run_rounds):
  sampler = fs.sampling.poisson(0.4, 8)  # variable cohorts: padded slots and an unused capacity
  algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=4, local_epochs=1)
  _, want, want_m, want_last = run_rounds(algo, pop, sampler, "device")
  sim, got, got_m, got_last = run_rounds(algo, pop, sampler, "host")
  assert isinstance(sim.population.features["x"], np.ndarray)  # examples never left the host
  chex.assert_trees_all_equal((want.params, want.client_states, want.server_extra),
                              (got.params, got.client_states, got.server_extra))
  for k in want_m:
    np.testing.assert_array_equal(want_m[k], got_m[k])
  assert want_last == got_last
  assert sim.num_traces == {"round": 1, "block": 1}


def test_gather_rows_matches_clients(pop):
  rng = np.random.default_rng(0)
  offsets, sizes = np.asarray(pop.offsets), np.asarray(pop.num_examples)
  ids = rng.permutation(pop.num_clients)[:5].astype(np.int32)
  mask = np.array([True, True, False, True, True])
  rows = gather_rows(offsets, sizes, ids, mask)
  x = np.asarray(pop.features["x"])
  want = np.concatenate([pop.client(int(i))["x"] for i, m in zip(ids, mask) if m])
  np.testing.assert_array_equal(x[rows], want)
  assert cohort_capacity(sizes, 5) == np.sort(sizes)[-5:].sum()


def test_bad_population_on(pop, loss_fn):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  with pytest.raises(ValueError, match="population_on must be 'device', 'sharded' or 'host'"):
    fs.Simulation(algo, pop, cohort_size=3, population_on="disk")
