"""fs.sweep: every lane of the vmapped program equals the corresponding single run."""

import chex
import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs

RTOL, ATOL = 2e-5, 2e-6
HYPER = dict(lr=[0.1, 0.2, 0.05], server_lr=[1.0, 0.5, 1.5], clip=[0.05, 0.1, 0.2],
             z=[0.0, 0.5, 1.0], mu=[0.0, 0.1, 0.3])
SEEDS = [3, 4, 5]


def dp_fedprox(loss_fn):
  def build(lr, server_lr, clip, z, mu):
    return fs.algorithms.fedprox(
        loss_fn, mu=mu, client_optimizer=optax.sgd(lr),
        server_optimizer=optax.sgd(server_lr, momentum=0.5), batch_size=4, local_epochs=1,
        aggregator=fs.aggregators.dp_mean(clip, z))
  return build


# slow tier: two lanes against two compiled single runs (~8 s);
# test_core.py::test_sweep_compiles_once_for_every_lane stays
@pytest.mark.slow
def test_each_lane_equals_its_single_run(pop, loss_fn, init_params):
  # Two lanes (each checked against its own compiled single run, the cost of this test).
  seeds, hyper = SEEDS[:2], {k: v[:2] for k, v in HYPER.items()}
  build = dp_fedprox(loss_fn)
  states, metrics = fs.sweep(build, pop, init_params(), seeds=seeds, hyperparameters=hyper,
                             num_rounds=3, cohort_size=6, chunk_size=3)
  assert metrics["loss"].shape == (2, 3)
  for i, seed in enumerate(seeds):
    sim = fs.Simulation(build(**{k: v[i] for k, v in hyper.items()}), pop, cohort_size=6,
                        chunk_size=3)
    state, m = sim.run(sim.init(init_params(), jax.random.key(seed)), num_rounds=3)
    lane = jax.tree.map(lambda x: x[i], (states.params, states.opt_state))
    chex.assert_trees_all_close(lane, (state.params, state.opt_state), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=RTOL)
  # Different lanes really differ (different seeds and hyper-parameters).
  assert not np.allclose(np.asarray(states.params["w"])[0], np.asarray(states.params["w"])[1])


def test_sweep_bad_input(pop, loss_fn, init_params):
  build = dp_fedprox(loss_fn)
  kw = dict(seeds=SEEDS, num_rounds=1, cohort_size=4)
  with pytest.raises(ValueError, match=r"one value per simulation \(3 seeds\).*'lr': 2"):
    fs.sweep(build, pop, init_params(), hyperparameters={**HYPER, "lr": [0.1, 0.2]}, **kw)
  with pytest.raises(ValueError, match="cannot sweep 'batch_size'.*separate"):
    fs.sweep(build, pop, init_params(), hyperparameters={"batch_size": [2, 4, 8]}, **kw)
  with pytest.raises(ValueError, match="cannot sweep 'steps'.*int64.*separate"):
    fs.sweep(build, pop, init_params(), hyperparameters={"steps": [1, 2, 3]}, **kw)
  with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
    fs.sweep(build, pop, init_params(), hyperparameters={**HYPER, "z": [0.0, -1.0, 1.0]}, **kw)

  def by_width(width_scale):  # a float that sets a shape: caught while tracing, named
    n = int(4 * width_scale)
    return fs.algorithms.fedavg(
        fs.models.classifier_loss(lambda p, x: x[:, :n] @ p["w"][:n] + p["b"]),
        client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)

  with pytest.raises(ValueError, match="cannot sweep 'width_scale'.*separate"):
    fs.sweep(by_width, pop, init_params(), hyperparameters={"width_scale": [0.5, 1.0, 1.0]},
             **kw)
  with pytest.raises(ValueError, match="seeds must be a non-empty 1-D sequence of ints"):
    fs.sweep(build, pop, init_params(), seeds=[], num_rounds=1, cohort_size=4)
