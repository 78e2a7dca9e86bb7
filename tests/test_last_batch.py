"""A client running alone trains its partial last batch trimmed (``Performance.trim_last_batch``):
the same update as the masked full batch (the oracle), at the smallest size that holds it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from chex import assert_trees_all_close

import fedjax_sim as fs
from fedjax_sim.client import ClientData, last_batch_sizes, make_local_trainer
from fedjax_sim.zoo import Dropout

B = 8  # trimmed sizes 2, 4, 6


class Net(nn.Module):
  """Dense layers with both dropouts: their draws must not change when the batch is cut."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    x = Dropout(0.25, deterministic=not train)(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _setup(seen=None):
  model = Net()
  rng = np.random.default_rng(0)
  feats = {"x": jnp.asarray(rng.normal(size=(64, 5)).astype(np.float32)),
           "y": jnp.asarray(rng.integers(0, 3, 64).astype(np.int32))}
  base = fs.models.classifier_loss(fs.models.linen_apply(model))

  def loss_fn(params, batch, key):
    if seen is not None:  # which batch size each executed step ran at
      size = batch["x"].shape[0]
      jax.debug.callback(lambda: seen.append(size))
    return base(params, batch, key)

  params = model.init(jax.random.key(1), feats["x"][:1])["params"]
  return loss_fn, params, feats


def _train(trainer, params, feats, n, trim, key=7):
  data = ClientData(feats, jnp.int32(3), jnp.int32(n), 40, trim_last_batch=trim)
  return jax.jit(trainer)(params, data, jax.random.key(key))


def test_sizes():
  assert last_batch_sizes(8) == (2, 4, 6)
  assert last_batch_sizes(16) == (4, 8, 12)
  assert last_batch_sizes(5) == (2, 3, 4)
  assert last_batch_sizes(2) == ()


@pytest.mark.parametrize("work", [dict(local_epochs=2), dict(local_steps=7)],
                         ids=["epochs", "steps"])
def test_trimmed_equals_the_masked_full_batch(work):
  """Oracle: the masked full-size batch (trim off) gives the same params and metrics, with
  dropout's draws, for clients whose last batch is cut anywhere (or not at all)."""
  loss_fn, params, feats = _setup()
  trainer = make_local_trainer(loss_fn, optax.sgd(0.3), batch_size=B, **work)
  for n in (1, 2, 3, 5, 7, 8, 9, 13, 16, 21, 37, 40):
    want = _train(trainer, params, feats, n, trim=False)
    got = _train(trainer, params, feats, n, trim=True)
    assert int(got.num_steps) == int(want.num_steps)
    assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    assert_trees_all_close(got.metrics, want.metrics, rtol=1e-5, atol=1e-6)


def test_each_last_batch_runs_at_the_smallest_size_that_holds_it():
  seen = []
  loss_fn, params, feats = _setup(seen)
  trainer = make_local_trainer(loss_fn, optax.sgd(0.3), batch_size=B, local_epochs=2)
  for n, sizes in ((21, [8, 8, 6]), (17, [8, 8, 2]), (4, [4]), (16, [8, 8]), (3, [4])):
    seen.clear()
    jax.block_until_ready(_train(trainer, params, feats, n, trim=True))
    assert seen == sizes * 2, (n, seen)  # two epochs
    seen.clear()
    jax.block_until_ready(_train(trainer, params, feats, n, trim=False))
    assert seen == [B] * len(sizes) * 2


def test_automatic_for_heavy_steps_of_clients_that_run_alone(pop, loss_fn, init_params,
                                                             partitionable):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)

  def decided(algorithm, params, **kw):
    sim = fs.Simulation(algorithm, pop, cohort_size=4, **kw)
    sim.init(params, jax.random.key(0))  # plans (abstract traces only)
    return sim.plan.performance.trim_last_batch

  assert decided(algo, init_params(), chunk_size=1) is False  # a tiny step: not worth it
  wide = fs.models.classifier_loss(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"])
  heavy = fs.algorithms.fedavg(wide, client_optimizer=optax.sgd(0.1), batch_size=4,
                               local_epochs=1)
  big = {"w1": jnp.zeros((5, 200_000)), "w2": jnp.zeros((200_000, 3))}  # ~5e7 FLOPs a step
  assert decided(heavy, big, chunk_size=1) is True
  assert decided(heavy, big, chunk_size=2) is False  # vmapped chunks are never trimmed
  # A loss written for one batch size (it reshapes to 4 rows) is not trimmed automatically,
  # and asking for trimming names the problem before anything compiles.
  fixed = fs.models.classifier_loss(
      lambda p, x: jnp.tanh(x.reshape(4, -1) @ p["w1"]) @ p["w2"])
  fixed_algo = fs.algorithms.fedavg(fixed, client_optimizer=optax.sgd(0.1), batch_size=4,
                                    local_epochs=1)
  assert decided(fixed_algo, big, chunk_size=1) is False
  with pytest.raises(ValueError, match=r"trim_last_batch=True\): the loss does not trace on a "
                                       r"batch of 1 examples"):
    fs.runs.planning.plan(fixed_algo, fs.sampling.uniform(4), pop, big, jax.random.key(0),
                          performance=fs.Performance(chunk_size=1, trim_last_batch=True))
  partitionable(False)  # a cut batch's draws would differ from the full one's: not trimmed
  assert decided(heavy, big, chunk_size=1) is False


def test_a_simulation_with_trimming_equals_one_without(pop, loss_fn, init_params):
  """The round with trimmed clients (chunk 1) against the same round without."""
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=2)
  out = []
  for trim in (True, False):
    plan = fs.core.plan_for(algo, fs.sampling.uniform(5), pop, init_params(), chunk_size=1,
                            trim_last_batch=trim)
    state = fs.core.initial_state(plan, init_params(), jax.random.key(3))
    step = jax.jit(lambda s, p, plan=plan: fs.core.round_step(plan, s, p))
    for _ in range(2):
      state, _ = step(state, pop)
    out.append(state.params)
  assert_trees_all_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_bad_setting_is_a_clear_error():
  with pytest.raises(TypeError, match="trim_last_batch must be True, False or None"):
    fs.Performance(trim_last_batch="yes")
