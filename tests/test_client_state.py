"""Per-client persistent state: gathered for the cohort, scattered back, padded slots ignored."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import round_keys

import fedjax_sim as fs


def counting_algorithm(loss_fn):
  """FedAvg whose clients also count their participations and remember the last round's loss."""
  base = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)

  def client_update(broadcast, data, client_state, key):
    out = base.client_update(broadcast, data, client_state, key)
    count, last_loss = client_state
    return out._replace(client_state=(count + 1, out.metrics["loss"]))

  return base._replace(client_update=client_update,
                       client_state_init=lambda params: (jnp.int32(0), jnp.float32(0)))


@pytest.mark.parametrize("chunk,make_sampler", [
    (3, lambda: fs.sampling.uniform(5)),
    (None, lambda: fs.sampling.uniform(5)),
    (2, lambda: fs.sampling.poisson(0.4, max_cohort_size=7)),
], ids=["uniform-chunk3", "uniform-auto", "poisson-chunk2"])
def test_client_state_counts_participation(pop, loss_fn, chunk, make_sampler, init_params):
  algo = counting_algorithm(loss_fn)
  smp = make_sampler()
  sim = fs.Simulation(algo, pop, sampler=smp, chunk_size=chunk)
  key = jax.random.key(9)
  state = sim.init(init_params(), key)
  assert state.client_states[0].shape == (pop.num_clients,)
  state, _ = sim.run(state, num_rounds=6, block_size=4)
  expected = np.zeros(pop.num_clients, int)
  for r in range(6):
    c = smp.sample(round_keys(key, r)[0], pop.num_clients)
    expected[np.asarray(c.ids)[np.asarray(c.mask)]] += 1
  np.testing.assert_array_equal(np.asarray(state.client_states[0]), expected)
  never = expected == 0
  assert np.all(np.asarray(state.client_states[1])[never] == 0)
  assert np.all(np.asarray(state.client_states[1])[~never] > 0)
