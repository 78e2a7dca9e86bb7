"""The fused round against the Python-loop oracle, identities and invariances."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import oracle_round, round_keys

import fedjax_sim as fs

RTOL, ATOL = 2e-5, 2e-6


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


CASES = {
    "fedavg": dict(factory="fedavg", server=lambda: optax.sgd(1.0), epochs=2),
    "fedavg_steps": dict(factory="fedavg", server=lambda: optax.sgd(1.0), steps=4),
    "fedprox": dict(factory="fedprox", server=lambda: optax.sgd(1.0), epochs=1, mu=0.3),
    "fedadam": dict(factory="fedavg", server=lambda: fs.algorithms.fedadam(0.05), epochs=1),
    "dp_fedavg": dict(factory="fedavg", server=lambda: optax.sgd(1.0), epochs=1, dp=(0.05, 0.7)),
}


def build(case, loss_fn, batch_size=4):
  kw = dict(client_optimizer=optax.sgd(0.2), server_optimizer=case["server"](),
            batch_size=batch_size, local_epochs=case.get("epochs"),
            local_steps=case.get("steps"))
  if case.get("dp"):
    kw["aggregator"] = fs.aggregators.dp_mean(*case["dp"])
  if case["factory"] == "fedprox":
    return fs.algorithms.fedprox(loss_fn, mu=case["mu"], **kw)
  return fs.algorithms.fedavg(loss_fn, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_python_loop_oracle(name, pop, loss_fn, init_params):
  case = CASES[name]
  algo = build(case, loss_fn)
  sim = fs.Simulation(algo, pop, cohort_size=7, chunk_size=3)  # 3 chunks, 2 padded slots
  key = jax.random.key(42)
  params = init_params()
  state = sim.init(params, key)
  server_opt = case["server"]()
  o_params, o_opt = params, server_opt.init(params)
  for r in range(2):
    cohort_key = round_keys(key, r)[0]
    ids = np.asarray(sim.sampler.sample(cohort_key, pop.num_clients).ids)
    o_params, o_opt = oracle_round(
        pop, o_params, o_opt, server_opt, key, r, ids, loss_fn=loss_fn,
        client_opt=optax.sgd(0.2), batch_size=4, epochs=case.get("epochs"),
        steps=case.get("steps"), mu=case.get("mu", 0.0), dp=case.get("dp"))
    state, metrics = sim.round(state)
    assert metrics["clients"] == 7
  assert_trees_close(state.params, o_params)


def test_fedsgd_equals_centralised_gradient_descent(clients, pop, loss_fn, init_params):
  lr = 0.5
  algo = fs.algorithms.fedsgd(loss_fn, server_optimizer=optax.sgd(lr))
  sim = fs.Simulation(algo, pop, cohort_size=pop.num_clients, chunk_size=5)
  params = init_params()
  state = sim.init(params, jax.random.key(0))
  state, _ = sim.run(state, num_rounds=3)
  x = jnp.concatenate([c["x"] for c in clients])
  y = jnp.concatenate([c["y"] for c in clients])
  batch = {"x": x, "y": y, fs.MASK_KEY: jnp.ones(len(y))}
  w = params
  for _ in range(3):
    g = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0])(w)
    w = jax.tree.map(lambda a, b: a - lr * b, w, g)
  assert_trees_close(state.params, w)


def test_fedavg_sgd1_is_weighted_mean_of_client_models(pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.3), batch_size=3,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=pop.num_clients)
  params = init_params()
  key = jax.random.key(3)
  state, _ = sim.round(sim.init(params, key))
  client_key = round_keys(key, 0)[1]
  models, weights = [], []
  for cid in range(pop.num_clients):
    data = fs.ClientData(pop.features, pop.offsets[cid], pop.num_examples[cid], pop.max_examples)
    out = algo.client_update(params, data, (), jax.random.fold_in(client_key, cid))
    models.append(jax.tree.map(lambda p, d: p - d, params, out.delta))
    weights.append(float(out.weight))
  w = np.asarray(weights) / sum(weights)
  expected = jax.tree.map(lambda *ms: sum(wi * m for wi, m in zip(w, ms)), *models)
  assert_trees_close(state.params, expected)


# Slow (default tier budget): fedavg and fedprox (mu=0.3) each match the Python-loop oracle in
# test_matches_python_loop_oracle, which stays in the default tier.
@pytest.mark.slow
def test_fedprox_mu0_equals_fedavg(pop, loss_fn, init_params):
  kw = dict(client_optimizer=optax.sgd(0.2), batch_size=4, local_epochs=2)
  a = fs.Simulation(fs.algorithms.fedavg(loss_fn, **kw), pop, cohort_size=6)
  b = fs.Simulation(fs.algorithms.fedprox(loss_fn, mu=0.0, **kw), pop, cohort_size=6)
  sa, _ = a.run(a.init(init_params(), jax.random.key(5)), num_rounds=3)
  sb, _ = b.run(b.init(init_params(), jax.random.key(5)), num_rounds=3)
  assert_trees_close(sa.params, sb.params)


@pytest.mark.parametrize("make_aggregator", [
    pytest.param(fs.aggregators.weighted_mean, marks=pytest.mark.slow),  # dp_mean includes it
    # Five compiles (~13 s at load): slow. Chunk invariance stays in the default tier in
    # test_systems.py (dropouts) and test_mf.py (chunk size and resume).
    pytest.param(lambda: fs.aggregators.dp_mean(clip=0.1, noise_multiplier=1.0),
                 marks=pytest.mark.slow),
], ids=["mean", "dp"])
def test_invariant_to_chunk_size_and_cohort_order(pop, loss_fn, make_aggregator, init_params):
  agg = make_aggregator()
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, aggregator=agg)
  results = []
  for chunk, sort in [(1, True), (4, True), (9, True), (None, False), (2, False)]:
    sim = fs.Simulation(algo, pop, cohort_size=9, chunk_size=chunk, sort_by_size=sort)
    state, _ = sim.run(sim.init(init_params(), jax.random.key(11)), num_rounds=3)
    results.append(state.params)
  for r in results[1:]:
    assert_trees_close(results[0], r)


def test_masked_padding_examples_change_nothing(loss_fn, init_params):
  rng = np.random.default_rng(0)
  params = init_params()
  x = jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 3, 6).astype(np.int32))
  real = {"x": x[:4], "y": y[:4], fs.MASK_KEY: jnp.ones(4)}
  mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  padded = {"x": x.at[4:].set(1e30), "y": y, fs.MASK_KEY: mask}
  f = jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.key(0))[0])
  (l1, g1), (l2, g2) = f(params, real), f(params, padded)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert_trees_close(g1, g2, rtol=1e-6, atol=1e-7)


# Slow (default tier budget): test_inputs.py's
# test_empty_clients_do_not_participate_under_any_reducer[median] (an oracle without the empty
# clients) stays in the default tier.
@pytest.mark.slow
def test_empty_client_changes_nothing(clients, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1)
  base = fs.Population.from_clients(clients)
  empty = {"x": np.zeros((0, 5), np.float32), "y": np.zeros((0,), np.int32)}
  more = fs.Population.from_clients(list(clients) + [empty])
  assert int(more.num_examples[-1]) == 0
  sa = fs.Simulation(algo, base, cohort_size=base.num_clients)
  sb = fs.Simulation(algo, more, cohort_size=more.num_clients)
  a, _ = sa.run(sa.init(init_params(), jax.random.key(1)), num_rounds=2)
  b, mb = sb.run(sb.init(init_params(), jax.random.key(1)), num_rounds=2)
  assert_trees_close(a.params, b.params)
  assert mb["clients"][0] == more.num_clients - 1  # an empty client does not participate


@pytest.mark.slow  # (~2 s) test_core.py::test_simulation_counts_compiles_on_the_host stays
def test_compiles_once_for_many_rounds(pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=4)
  state = sim.init(init_params(), jax.random.key(0))
  state, m = sim.run(state, num_rounds=7, block_size=3)  # blocks of 3, 3, 1
  state, _ = sim.run(state, num_rounds=5, block_size=3)
  assert sim.num_traces["block"] == 1
  for _ in range(3):
    state, _ = sim.round(state)
  assert sim.num_traces["round"] == 1
  assert int(state.round) == 15
  assert m["loss"].shape == (7,)


def test_run_blocks_equal_single_rounds(pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=5)
  a = sim.init(init_params(), jax.random.key(0))
  b = sim.init(init_params(), jax.random.key(0))
  a, ma = sim.run(a, num_rounds=4, block_size=3)
  for _ in range(4):
    b, mb = sim.round(b)
  assert_trees_close(a.params, b.params)
  np.testing.assert_allclose(ma["loss"][-1], mb["loss"], rtol=1e-5)


def test_nan_client_is_zeroed_and_counted(init_params, linear_apply, make_population):
  clients = make_population(num_clients=6)
  for i, c in enumerate(clients):
    c["poison"] = np.full(len(c["y"]), 1.0 if i == 2 else 0.0, np.float32)
  base = fs.models.classifier_loss(linear_apply)

  def loss_fn(p, batch, key):
    loss, aux = base(p, batch, key)
    return loss / (1.0 - jnp.max(batch["poison"])), aux  # inf for the poisoned client

  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1)
  sim = fs.Simulation(algo, fs.Population.from_clients(clients), cohort_size=6)
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=2)
  assert np.all(m["nan_clients"] == 1)
  assert np.all(m["clients"] == 5)
  chex.assert_tree_all_finite(state.params)
  # Same as a population in which client 2 holds no data at all.
  clean = [dict(c) for c in clients]
  clean[2] = {k: v[:0] for k, v in clean[2].items()}
  sim2 = fs.Simulation(algo, fs.Population.from_clients(clean), cohort_size=6)
  state2, _ = sim2.run(sim2.init(init_params(), jax.random.key(0)), num_rounds=2)
  assert_trees_close(state.params, state2.params)


# Slow (default tier budget): Poisson rounds stay in the default tier in test_client_state.py and
# test_run_integrity.py, an empty cohort keeping the server in test_systems.py
# (test_dropout_all_keeps_server_and_counts).
@pytest.mark.slow
def test_poisson_sampler_round_and_empty_cohort_keeps_server(pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, server_optimizer=fs.algorithms.fedadam(0.1))
  sampler = fs.sampling.poisson(q=0.5, max_cohort_size=8)
  sim = fs.Simulation(algo, pop, sampler=sampler, chunk_size=3)
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=6)
  assert np.all(m["clients"] <= 8) and np.all(m["clients"] + m["truncated"] >= m["clients"])
  tiny = fs.sampling.poisson(q=1e-9, max_cohort_size=2)
  sim0 = fs.Simulation(algo, pop, sampler=tiny)
  s0 = sim0.init(init_params(), jax.random.key(0))
  s1, m0 = sim0.round(s0)
  assert m0["clients"] == 0
  assert_trees_close(s1.params, init_params())


def test_eval_and_callback(pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=4)
  seen = []
  state, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=6, eval_every=2,
                     eval_fn=lambda p: {"norm": float(jnp.linalg.norm(p["w"]))},
                     callback=lambda r, bm: seen.append(r))
  assert seen == [2, 4, 6]
  assert np.isnan(m["eval_norm"][0]) and np.isfinite(m["eval_norm"][1])
  assert np.isfinite(m["eval_norm"][5])
