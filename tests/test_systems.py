"""Availability, dropout, stragglers and deadlines: in-jit, keyed by client id."""

import chex
import jax
import numpy as np
import optax
import pytest
from test_client_state import counting_algorithm

import fedjax_sim as fs


def fedavg(loss_fn, **kw):
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=kw.pop("local_epochs", 1), **kw)


def planned_steps(pop, batch_size=4, epochs=1):
  return epochs * -(-np.asarray(pop.num_examples) // batch_size)


def test_dropout_all_keeps_server_and_counts(pop, loss_fn, init_params):
  sim = fs.Simulation(fedavg(loss_fn), pop, cohort_size=5,
                      system=fs.systems.SystemModel(dropout=1.0))
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=3)
  assert np.all(m["dropped"] == 5) and np.all(m["clients"] == 0)
  chex.assert_trees_all_equal(state.params, init_params())


def test_dropout_rate_and_chunk_invariance(pop, loss_fn, init_params):
  system = fs.systems.SystemModel(dropout=0.3, straggler_prob=0.5)
  results = []
  for chunk in (1, 4):
    sim = fs.Simulation(fedavg(loss_fn), pop, cohort_size=10, chunk_size=chunk, system=system)
    state, m = sim.run(sim.init(init_params(), jax.random.key(3)), num_rounds=40)
    results.append((state.params, m))
  (pa, ma), (pb, mb) = results
  chex.assert_trees_all_close(pa, pb, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(ma["dropped"], mb["dropped"])
  rate = ma["dropped"].sum() / 400
  assert 0.22 < rate < 0.38  # 400 Bernoulli(0.3) draws: sd 0.023
  assert np.all(ma["clients"] + ma["dropped"] == 10)


def test_stragglers_do_part_of_their_work(pop, loss_fn, init_params):
  full = fs.Simulation(fedavg(loss_fn, local_epochs=3), pop, cohort_size=pop.num_clients)
  slow = fs.Simulation(fedavg(loss_fn, local_epochs=3), pop, cohort_size=pop.num_clients,
                       system=fs.systems.SystemModel(straggler_prob=1.0,
                                                     straggler_min_fraction=0.5))
  _, mf = full.round(full.init(init_params(), jax.random.key(0)))
  _, ms = slow.round(slow.init(init_params(), jax.random.key(0)))
  planned = planned_steps(pop, epochs=3)
  assert mf["client_steps"] == planned.sum()
  assert 0.5 * planned.sum() <= ms["client_steps"] < planned.sum()
  assert ms["stragglers"] == pop.num_clients


@pytest.mark.parametrize("policy", ["drop", "partial"])
def test_deadline_policies(pop, loss_fn, policy, init_params):
  n = pop.num_clients
  system = fs.systems.SystemModel(deadline=2.0, steps_per_second=np.ones(n),
                                  deadline_policy=policy)
  sim = fs.Simulation(fedavg(loss_fn), pop, cohort_size=n, system=system)
  _, m = sim.round(sim.init(init_params(), jax.random.key(0)))
  planned = planned_steps(pop)
  assert m["late"] == np.sum(planned > 2)
  # client_steps is the compute spent: a late client runs 2 steps under either policy.
  assert m["client_steps"] == np.minimum(planned, 2).sum()
  assert m["clients"] == (np.sum(planned <= 2) if policy == "drop" else n)


def chunked_step_slots(steps, chunk):
  """The oracle: the slots sorted by steps (descending) in chunks of ``chunk``, padded, each
  chunk paying ``chunk x`` its largest client's steps."""
  steps = np.sort(np.asarray(steps))[::-1]
  steps = np.concatenate([steps, np.zeros(-len(steps) % chunk, steps.dtype)])
  return chunk * steps.reshape(-1, chunk).max(axis=1).sum()


@pytest.mark.parametrize("chunk", [1, 5])
def test_step_slots_count_clients_dropped_at_the_deadline(pop, loss_fn, init_params, chunk):
  n = pop.num_clients
  speeds = np.random.default_rng(2).uniform(0.5, 2.5, n)
  system = fs.systems.SystemModel(deadline=2.0, steps_per_second=tuple(speeds),
                                  deadline_policy="drop")
  sim = fs.Simulation(fedavg(loss_fn, local_epochs=2), pop, cohort_size=n, chunk_size=chunk,
                      system=system)
  _, m = sim.round(sim.init(init_params(), jax.random.key(0)))
  # The whole population is the cohort; on the host, the steps each client runs.
  planned = planned_steps(pop, epochs=2)
  cap = np.floor(2.0 * speeds).astype(int)
  ran, late = np.minimum(planned, cap), planned > cap
  assert late.sum() >= 2 and m["late"] == late.sum() and m["clients"] == n - late.sum()
  assert m["step_slots"] == chunked_step_slots(ran, chunk)
  assert m["client_steps"] == ran.sum()  # the late clients ran up to the deadline
  # Not vacuous: zeroing the late clients' steps changes the oracle at chunk 5.
  if chunk > 1:
    assert chunked_step_slots(np.where(late, 0, ran), chunk) < chunked_step_slots(ran, chunk)


def test_unavailable_clients_are_never_selected(pop, loss_fn, init_params):
  avail = np.zeros(pop.num_clients)
  avail[::2] = 1.0
  sim = fs.Simulation(counting_algorithm(loss_fn), pop, cohort_size=4,
                      system=fs.systems.SystemModel(availability=avail))
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=10)
  counts = np.asarray(state.client_states[0])
  assert counts[1::2].sum() == 0 and counts[::2].sum() == 40
  assert np.all(m["available"] == pop.num_clients // 2)


@pytest.mark.slow  # (~2 s) test_dropout_rate_and_chunk_invariance stays
def test_trace_and_diurnal_availability(tmp_path, pop, loss_fn, init_params):
  n = pop.num_clients
  lines = ["client_id,window"] + [f"{c},{c % 3}" for c in range(n)]
  (tmp_path / "trace.csv").write_text("\n".join(lines))
  trace = fs.systems.load_trace(str(tmp_path / "trace.csv"), num_clients=n)
  assert trace.shape == (3, n)
  sim = fs.Simulation(counting_algorithm(loss_fn), pop, cohort_size=2,
                      system=fs.systems.SystemModel(trace=trace))
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=3)
  np.testing.assert_array_equal(m["available"], [np.sum(np.arange(n) % 3 == w) for w in range(3)])
  diurnal = fs.systems.SystemModel(availability=np.ones(n), diurnal_period=8,
                                   phases=np.zeros(n))
  sim = fs.Simulation(fedavg(loss_fn), pop, cohort_size=2, system=diurnal)
  _, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=16)
  expected = n * 0.5 * (1 + np.sin(2 * np.pi * np.arange(16) / 8))
  assert np.corrcoef(m["available"], expected)[0, 1] > 0.9


@pytest.mark.parametrize("fn,match", [
    (lambda n: fs.systems.SystemModel(availability=np.full(n, 1.5)), "lie in \\[0, 1\\]"),
    (lambda n: fs.systems.SystemModel(dropout=-0.1), "dropout"),
    (lambda n: fs.systems.SystemModel(deadline=1.0), "together"),
    (lambda n: fs.systems.SystemModel(deadline_policy="wait"), "deadline_policy"),
])
def test_system_bad_input(pop, fn, match):
  with pytest.raises(ValueError, match=match):
    fn(pop.num_clients)


def test_trace_ids_must_match_population(tmp_path, pop, loss_fn):
  (tmp_path / "t.csv").write_text("0,0\n99,1\n")
  with pytest.raises(ValueError, match="must match the population"):
    fs.systems.load_trace(str(tmp_path / "t.csv"), num_clients=pop.num_clients)
  with pytest.raises(ValueError, match="must match the population"):
    fs.Simulation(fedavg(loss_fn), pop, cohort_size=2,
                  system=fs.systems.SystemModel(trace=np.ones((2, 5))))
