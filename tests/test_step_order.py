"""The cohort sorted by the local steps clients run (stragglers, deadlines) before chunking.

``core.cohort_slots`` with a system model sorts by ``core.slot_steps`` (the algorithm's
``planned_steps`` of each client's outcome) instead of by size. It changes only the layout:
results agree with any other order to float summation error, padded slots contribute nothing,
and the padding (chunk max steps x chunk size / steps) is never above the size order's.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import autotune, core

COHORT = 10


def system(num_clients, **kw):
  speeds = np.random.default_rng(5).uniform(0.5, 2.0, num_clients)
  return fs.systems.SystemModel(straggler_prob=0.9, deadline=3.0, steps_per_second=tuple(speeds),
                                deadline_policy="partial", **kw)


def fedavg(loss_fn):
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=2)


def make_plan(pop, loss_fn, params, chunk, sort=True, sys=None):
  plan = core.plan_for(fedavg(loss_fn), fs.sampling.uniform(COHORT), pop, params,
                       chunk_size=chunk, system=system(pop.num_clients) if sys is None else sys)
  return plan.with_performance(sort_by_size=sort)


def padding(steps, chunk):
  """Sum over chunks of (chunk max steps x chunk) / total steps, in the given order."""
  return autotune.padding_factor(steps, chunk, sort_by_size=False)


@pytest.fixture(scope="module")
def layouts(pop, loss_fn, init_params):
  """Per round: the slots in the step order and in the size order, with each slot's steps."""
  plan = make_plan(pop, loss_fn, init_params(), chunk=COHORT)

  @jax.jit
  def lay(key, r):
    keys = core.round_keys(key, r)
    cohort, _ = core.sample_cohort(plan, key, r)
    new = core.cohort_slots(plan, cohort, pop, keys)
    old = core.cohort_slots(plan, cohort, pop)  # no keys: by size
    steps = lambda s: core.slot_steps(plan, keys, pop, s.ids, s.real)  # noqa: E731
    return new, steps(new), old, steps(old)

  return [jax.device_get(lay(jax.random.key(0), r)) for r in range(6)]


def test_step_order_pads_no_more_than_size_order(layouts):
  gained = False
  for new, new_steps, old, old_steps in layouts:
    assert sorted(new.ids[new.real]) == sorted(old.ids[old.real])  # the same clients
    assert np.all(np.diff(new_steps[new.real]) <= 0)  # descending steps
    for chunk in (2, 3, 4):
      p_new, p_old = padding(new_steps, chunk), padding(old_steps, chunk)
      assert p_new <= p_old + 1e-12
      assert p_new == pytest.approx(autotune.padding_factor(new_steps, chunk))  # the optimum
      gained |= p_new < p_old - 1e-9
  assert gained  # with 90 % stragglers the size order leaves padding the step order removes


def test_without_a_system_the_order_is_the_size_order(pop, loss_fn, init_params):
  plan = core.plan_for(fedavg(loss_fn), fs.sampling.uniform(COHORT), pop, init_params(),
                       chunk_size=4)
  key = jax.random.key(1)
  cohort, _ = core.sample_cohort(plan, key, 0)
  keys = core.round_keys(key, 0)
  assert core.slot_steps(plan, keys, pop, cohort.ids, cohort.mask) is None
  chex.assert_trees_all_equal(core.cohort_slots(plan, cohort, pop, keys),
                              core.cohort_slots(plan, cohort, pop))


@pytest.fixture(scope="module")
def runs(pop, loss_fn, init_params):
  """Two rounds of FedAvg (stragglers + deadline) per layout: unsorted in one chunk (no
  padding), and the step order at chunk 3 and 4 (two padded slots each)."""
  params = init_params()
  out = {}
  for name, chunk, sort in (("unsorted", COHORT, False), ("steps3", 3, True),
                            ("steps4", 4, True)):
    plan = make_plan(pop, loss_fn, params, chunk, sort)

    @jax.jit
    def step(state, pop, plan=plan):
      keys = core.round_keys(state.key, state.round)
      cohort, _ = core.sample_cohort(plan, state.key, state.round)
      slots = core.cohort_slots(plan, cohort, pop, keys)  # the layout round_step uses
      steps = core.slot_steps(plan, keys, pop, slots.ids, slots.real)
      return (*core.round_step(plan, state, pop), cohort, slots, steps)

    state = core.initial_state(plan, params, jax.random.key(7))
    rounds = []
    for _ in range(2):
      state, *rest = step(state, pop)
      rounds.append(jax.device_get(rest))
    out[name] = (plan, jax.device_get(state.params), rounds)
  return out


def test_results_match_other_orders(runs):
  _, ref, ref_rounds = runs["unsorted"]
  ref_metrics = [r[0] for r in ref_rounds]
  for name in ("steps3", "steps4"):
    _, params, rounds = runs[name]
    chex.assert_trees_all_close(params, ref, rtol=2e-5, atol=2e-6)
    for (m, *_), r in zip(rounds, ref_metrics, strict=True):
      for k in ("clients", "examples", "client_steps", "stragglers", "late"):
        assert m[k] == r[k], k
      np.testing.assert_allclose(m["loss"], r["loss"], rtol=2e-5)
  assert sum(m["stragglers"] for m in ref_metrics) > 0
  assert sum(m["late"] for m in ref_metrics) > 0


def test_padded_slots_contribute_nothing(runs, pop):
  sizes = np.asarray(pop.num_examples)
  for name in ("steps3", "steps4"):
    plan, _, rounds = runs[name]
    assert plan.num_chunks * plan.chunk_size > COHORT  # padded
    for m, cohort, slots, steps in rounds:
      assert not np.any(slots.real[COHORT:]) and np.all(steps[COHORT:] == 0)
      # Padded slots repeat client 0: counted, they would add a client and its examples.
      assert m["clients"] == COHORT
      assert m["examples"] == sizes[cohort.ids].sum()
      # The steps the sort used are the steps the clients ran, and the chunk schedule's.
      assert m["client_steps"] == steps.sum()
      chunk = plan.chunk_size
      assert m["step_slots"] == chunk * steps.reshape(-1, chunk).max(1).sum()


def test_planned_steps_is_the_trainers_rule(loss_fn):
  algo = fedavg(loss_fn)
  n = jnp.array([0, 1, 4, 5, 17])
  np.testing.assert_array_equal(algo.planned_steps(n), [0, 2, 2, 4, 10])
  np.testing.assert_array_equal(algo.planned_steps(n, 0.5, 3), [0, 1, 1, 2, 3])
  full = fs.algorithms.fedsgd(loss_fn, server_optimizer=optax.sgd(1.0))
  np.testing.assert_array_equal(full.planned_steps(n, max_examples=17), [0, 1, 1, 1, 1])
  with pytest.raises(ValueError, match="max_examples"):
    full.planned_steps(n)


def test_cohort_steps_draws_the_system_on_the_host(loss_fn):
  sizes = np.arange(1, 41)
  plain = autotune.cohort_steps(sizes, 20, 4)
  np.testing.assert_array_equal(
      plain, autotune.cohort_steps(sizes, 20, 4, system=fs.systems.SystemModel()))  # no rule
  rule = fedavg(loss_fn).planned_steps
  none = autotune.cohort_steps(sizes, 20, 4, system=fs.systems.SystemModel(), planned_steps=rule)
  np.testing.assert_array_equal(none, 2 * plain)  # two epochs, nobody straggles
  slow = autotune.cohort_steps(sizes, 20, 4, planned_steps=rule,
                               system=fs.systems.SystemModel(straggler_prob=1.0))
  assert np.all(slow <= none) and slow.sum() < none.sum()
  gone = autotune.cohort_steps(sizes, 20, 4, planned_steps=rule,
                               system=fs.systems.SystemModel(dropout=1.0))
  assert not gone.any()


def test_cohort_steps_respects_the_deadline_cap(loss_fn):
  """The host draw is the system model's own: no client runs past floor(deadline * speed)."""
  sizes = np.arange(1, 41)
  speeds = np.linspace(0.5, 3.0, 40)
  sysm = fs.systems.SystemModel(deadline=2.0, steps_per_second=tuple(speeds))
  steps = autotune.cohort_steps(sizes, 40, 4, planned_steps=fedavg(loss_fn).planned_steps,
                                system=sysm)  # the whole population: pick is a permutation
  assert steps.max() <= np.floor(2.0 * speeds.max())
  assert sorted(steps) == sorted(np.minimum(2 * -(-sizes // 4), np.floor(2.0 * speeds)))
