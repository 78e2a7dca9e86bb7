"""SCAFFOLD, FedNova and q-FFL against Python-loop oracles, and their degenerate cases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import round_keys, train_client

import fedjax_sim as fs
from fedjax_sim.types import PERSONAL_SALT

RTOL, ATOL = 2e-5, 2e-6


def close(a, b, rtol=RTOL, atol=ATOL):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def tree(f, *xs):
  return jax.tree.map(f, *xs)


def cohort_ids(sim, key, r):
  c = sim.sampler.sample(round_keys(key, r)[0], sim.population.num_clients)
  return np.asarray(c.ids)[np.asarray(c.mask)]


def test_scaffold_matches_oracle(pop, loss_fn, init_params):
  lr, key = 0.2, jax.random.key(4)
  algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=lr, batch_size=4, local_epochs=2)
  sim = fs.Simulation(algo, pop, cohort_size=5, chunk_size=2)
  state = sim.init(init_params(), key)
  x = init_params()
  zero = tree(jnp.zeros_like, x)
  c, c_i = zero, {i: zero for i in range(pop.num_clients)}
  for r in range(3):
    client_key = round_keys(key, r)[1]
    deltas, dcs, weights = [], [], []
    for cid in cohort_ids(sim, key, r):
      n = int(pop.num_examples[cid])
      y, k = train_client(loss_fn, optax.sgd(lr), x, pop.client(int(cid)), n, pop.max_examples,
                          jax.random.fold_in(client_key, int(cid)), batch_size=4, epochs=2,
                          shift=tree(lambda a, b: a - b, c, c_i[cid]), return_steps=True)
      d = tree(lambda a, b: a - b, x, y)
      new = tree(lambda ci, cc, dd: ci - cc + dd / (k * lr), c_i[cid], c, d)
      dcs.append(tree(lambda a, b: a - b, new, c_i[cid]))
      c_i[cid] = new
      deltas.append(d)
      weights.append(n)
    w = np.asarray(weights) / sum(weights)
    mean_delta = tree(lambda *ds: sum(wi * di for wi, di in zip(w, ds)), *deltas)
    x = tree(lambda a, b: a - b, x, mean_delta)
    c = tree(lambda cc, *ds: cc + sum(ds) / pop.num_clients, c, *dcs)
    state, _ = sim.round(state)
  close(state.params, x)
  close(state.server_extra, c)
  for cid, ci in c_i.items():
    close(tree(lambda s: s[cid], state.client_states), ci)


def test_scaffold_first_round_with_zero_control_variates_is_fedavg(pop, loss_fn, init_params):
  kw = dict(batch_size=4, local_epochs=1)
  a = fs.Simulation(fs.algorithms.scaffold(loss_fn, client_learning_rate=0.3, **kw), pop,
                    cohort_size=6)
  b = fs.Simulation(fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.3), **kw), pop,
                    cohort_size=6)
  sa, _ = a.round(a.init(init_params(), jax.random.key(2)))
  sb, _ = b.round(b.init(init_params(), jax.random.key(2)))
  close(sa.params, sb.params)


@pytest.mark.slow  # test_fednova_matches_oracle stays in the default tier
def test_fednova_equal_steps_is_fedavg(loss_fn, init_params, make_population):
  clients = make_population(num_clients=8, min_size=8, max_size=8)
  pop = fs.Population.from_clients(clients)
  kw = dict(batch_size=3, local_epochs=2)
  a = fs.Simulation(fs.algorithms.fednova(loss_fn, client_learning_rate=0.2, **kw), pop,
                    cohort_size=5)
  b = fs.Simulation(fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), **kw), pop,
                    cohort_size=5)
  sa, _ = a.run(a.init(init_params(), jax.random.key(0)), num_rounds=3)
  sb, _ = b.run(b.init(init_params(), jax.random.key(0)), num_rounds=3)
  close(sa.params, sb.params)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_fednova_matches_oracle(pop, loss_fn, momentum, init_params):
  lr, key = 0.1, jax.random.key(8)
  algo = fs.algorithms.fednova(loss_fn, client_learning_rate=lr, momentum=momentum,
                               batch_size=3, local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=6, chunk_size=4)
  state, _ = sim.round(sim.init(init_params(), key))
  x = init_params()
  client_key = round_keys(key, 0)[1]
  opt = optax.sgd(lr, momentum=momentum or None)
  ds, ns, a_s = [], [], []
  for cid in cohort_ids(sim, key, 0):
    n = int(pop.num_examples[cid])
    y, tau = train_client(loss_fn, opt, x, pop.client(int(cid)), n, pop.max_examples,
                          jax.random.fold_in(client_key, int(cid)), batch_size=3, epochs=1,
                          return_steps=True)
    a = tau if momentum == 0 else (tau - momentum * (1 - momentum**tau) / (1 - momentum)) / (
        1 - momentum)
    ds.append(tree(lambda u, v: (u - v) / a, x, y))
    ns.append(n)
    a_s.append(a)
  p = np.asarray(ns) / sum(ns)
  tau_eff = float(np.sum(p * np.asarray(a_s)))
  step = tree(lambda *d: tau_eff * sum(pi * di for pi, di in zip(p, d)), *ds)
  close(state.params, tree(lambda u, v: u - v, x, step))


@pytest.mark.slow  # test_qffl_matches_oracle stays in the default tier
def test_qffl_q0_is_fedavg_with_unweighted_mean(pop, loss_fn, init_params):
  kw = dict(batch_size=4, local_epochs=1)
  a = fs.Simulation(fs.algorithms.qffl(loss_fn, q=0.0, client_learning_rate=0.2, **kw), pop,
                    cohort_size=6)
  b = fs.Simulation(fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2),
                                         aggregator=fs.aggregators.mean(), **kw), pop,
                    cohort_size=6)
  sa, _ = a.run(a.init(init_params(), jax.random.key(1)), num_rounds=3)
  sb, _ = b.run(b.init(init_params(), jax.random.key(1)), num_rounds=3)
  close(sa.params, sb.params)


def test_qffl_matches_oracle(pop, loss_fn, init_params):
  q, lr, key = 2.0, 0.2, jax.random.key(6)
  algo = fs.algorithms.qffl(loss_fn, q=q, client_learning_rate=lr, batch_size=4, local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=5)
  state, _ = sim.round(sim.init(init_params(), key))
  x = init_params()
  client_key = round_keys(key, 0)[1]
  deltas, hs = [], []
  for cid in cohort_ids(sim, key, 0):
    data = pop.client(int(cid))
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    batch[fs.MASK_KEY] = jnp.ones(len(data["y"]))
    f = float(loss_fn(x, batch, jax.random.key(0))[0])
    y = train_client(loss_fn, optax.sgd(lr), x, data, len(data["y"]), pop.max_examples,
                     jax.random.fold_in(client_key, int(cid)), batch_size=4, epochs=1)
    dw = tree(lambda u, v: (u - v) / lr, x, y)
    sq = sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(dw))
    deltas.append(tree(lambda d: f**q * d, dw))
    hs.append(q * f ** (q - 1) * sq + f**q / lr)
  expected = tree(lambda u, *ds: u - sum(ds) / sum(hs), x, *deltas)
  close(state.params, expected, rtol=1e-4, atol=1e-6)


def test_algorithms_with_extras_refuse_dp(pop, loss_fn):
  algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=4, local_epochs=1,
                                aggregator=fs.aggregators.dp_mean(1.0, 1.0))
  with pytest.raises(ValueError, match="scaffold sends per-client values"):
    fs.Simulation(algo, pop, cohort_size=3)
  with pytest.raises(ValueError, match="q must be >= 0"):
    fs.algorithms.qffl(loss_fn, q=-1, client_learning_rate=0.1, batch_size=4, local_epochs=1)
  with pytest.raises(ValueError, match="momentum"):
    fs.algorithms.fednova(loss_fn, client_learning_rate=0.1, momentum=1.0, batch_size=4,
                          local_epochs=1)


def test_ditto_matches_oracle_and_global_part_is_fedavg(pop, loss_fn, init_params):
  lam, lr, key = 0.5, 0.2, jax.random.key(12)
  algo = fs.algorithms.ditto(loss_fn, lam=lam, client_optimizer=optax.sgd(lr), batch_size=4,
                             local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=5, chunk_size=2)
  state = sim.init(init_params(), key)
  fedavg = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), batch_size=4,
                                local_epochs=1)
  ref = fs.Simulation(fedavg, pop, cohort_size=5)
  ref_state = ref.init(init_params(), key)
  x = init_params()
  personal = {i: init_params() for i in range(pop.num_clients)}
  for r in range(2):
    client_key = round_keys(key, r)[1]
    for cid in cohort_ids(sim, key, r):
      ckey = jax.random.fold_in(jax.random.fold_in(client_key, int(cid)), PERSONAL_SALT)
      v = personal[int(cid)]
      # The personal objective F_k(v) + lam/2 ||v - x||^2 = the FedProx objective anchored at x.
      personal[int(cid)] = _prox_train(loss_fn, lr, v, x, lam, pop, int(cid), ckey)
    state, _ = sim.round(state)
    ref_state, _ = ref.round(ref_state)
    x = ref_state.params
  close(state.params, ref_state.params)
  for cid, v in personal.items():
    close(tree(lambda s: s[cid], state.client_states), v)
  ev = fs.evaluation.evaluate_clients(loss_fn, state.params, pop,
                                      client_params=state.client_states)
  assert np.isfinite(ev.summary()["loss_mean"])


def _prox_train(loss_fn, lr, v, anchor, lam, pop, cid, key):
  from oracle import train_client  # the same loop, with the proximal anchor moved to `anchor`

  def prox_loss(p, batch, k):
    loss, aux = loss_fn(p, batch, k)
    sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(anchor)))
    return loss + 0.5 * lam * sq, aux

  n = int(pop.num_examples[cid])
  return train_client(prox_loss, optax.sgd(lr), v, pop.client(cid), n, pop.max_examples, key,
                      batch_size=4, epochs=1)


def test_ditto_large_lambda_pins_personal_to_global(pop, loss_fn, init_params):
  lr = 1e-3
  algo = fs.algorithms.ditto(loss_fn, lam=1.0 / lr, client_optimizer=optax.sgd(lr), batch_size=4,
                             local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=pop.num_clients)
  state, _ = sim.round(sim.init(init_params(), jax.random.key(0)))
  start = init_params()
  # lr * lam = 1: every personal step lands on (global - lr * grad), i.e. within lr*|grad|.
  for cid in range(pop.num_clients):
    close(tree(lambda s: s[cid], state.client_states), start, rtol=0, atol=5e-3)


def test_feddyn_matches_oracle(pop, loss_fn, init_params):
  alpha, lr, key = 0.3, 0.1, jax.random.key(21)
  algo = fs.algorithms.feddyn(loss_fn, alpha=alpha, client_optimizer=optax.sgd(lr), batch_size=4,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=5, chunk_size=3)
  state = sim.init(init_params(), key)
  theta = init_params()
  zero = tree(jnp.zeros_like, theta)
  h, g = zero, {i: zero for i in range(pop.num_clients)}
  for r in range(3):
    client_key = round_keys(key, r)[1]
    models = []
    for cid in cohort_ids(sim, key, r):
      n = int(pop.num_examples[cid])
      gk = g[int(cid)]
      y = train_client(loss_fn, optax.sgd(lr), theta, pop.client(int(cid)), n, pop.max_examples,
                       jax.random.fold_in(client_key, int(cid)), batch_size=4, epochs=1,
                       mu=alpha, shift=tree(jnp.negative, gk))
      g[int(cid)] = tree(lambda gg, yy, tt: gg - alpha * (yy - tt), gk, y, theta)
      models.append(y)
    m = len(models)
    h = tree(lambda hh, tt, *ys: hh - alpha / pop.num_clients * sum(yy - tt for yy in ys),
             h, theta, *models)
    theta = tree(lambda hh, *ys: sum(ys) / m - hh / alpha, h, *models)
    state, _ = sim.round(state)
  close(state.params, theta, rtol=1e-4, atol=1e-5)
  close(state.server_extra, h, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # (~3 s) test_weight_fn_with_unweighted_dp_is_refused and the q-FFL oracle stay
def test_dynamic_weight_fn_matches_manual_weighting(pop, loss_fn, init_params):
  # Loss-proportional weights: the update is sum(loss_k * delta_k) / sum(loss_k).
  key = jax.random.key(5)
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, weight_fn=lambda n, m, cid: m["loss"])
  sim = fs.Simulation(algo, pop, cohort_size=5, chunk_size=2)
  state, _ = sim.round(sim.init(init_params(), key))
  plain = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                               local_epochs=1)
  client_key = round_keys(key, 0)[1]
  x = init_params()
  outs = []
  for cid in cohort_ids(sim, key, 0):
    data = fs.ClientData(pop.features, pop.offsets[cid], pop.num_examples[cid], pop.max_examples)
    outs.append(plain.client_update(x, data, (), jax.random.fold_in(client_key, int(cid))))
  w = np.asarray([float(o.metrics["loss"]) for o in outs])
  expected = tree(lambda xx, *ds: xx - sum(wi * d for wi, d in zip(w, ds)) / w.sum(), x,
                  *[o.delta for o in outs])
  close(state.params, expected)


def test_weight_fn_with_unweighted_dp_is_refused(pop, loss_fn):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, weight_fn=lambda n, m, cid: m["loss"],
                              aggregator=fs.aggregators.dp_mean(1.0, 1.0))
  with pytest.raises(ValueError, match="weight_cap"):
    fs.Simulation(algo, pop, cohort_size=3)
  capped = algo._replace(aggregator=fs.aggregators.dp_mean(1.0, 1.0, weight_cap=2.0))
  fs.Simulation(capped, pop, cohort_size=3)  # capped weights: allowed
