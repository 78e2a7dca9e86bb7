"""The model adapters train through the engine: flax linen and flax nnx."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_sim as fs


def small_pop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 4)).astype(np.float32)
  y = (x[:, 0] - x[:, 1] > 0).astype(np.int32)
  return fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 15, 300))


def train(apply_fn, params, rounds=15):
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(apply_fn),
                              client_optimizer=optax.sgd(0.3), batch_size=8, local_epochs=1)
  sim = fs.Simulation(algo, small_pop(), cohort_size=5)
  return sim.run(sim.init(params, jax.random.key(0)), num_rounds=rounds)


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_linen_with_dropout_trains():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = nn.relu(nn.Dense(16)(x))
      x = nn.Dropout(0.2, deterministic=not train)(x)
      return nn.Dense(2)(x)

  module = MLP()
  params = module.init(jax.random.key(0), jnp.ones((1, 4)), train=False)["params"]
  _, m = train(fs.models.linen_apply(module), params)
  assert m["loss"][-1] < m["loss"][0] and m["accuracy"][-1] > 0.8


@pytest.mark.slow  # (~3 s) test_finetune.py::test_nnx_lora_linear_trains_only_its_adapters stays
def test_nnx_trains():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 16, rngs=rngs)
      self.b = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  apply_fn, params = fs.models.nnx_apply(MLP(nnx.Rngs(0)))
  state, m = train(apply_fn, params)
  assert m["loss"][-1] < m["loss"][0] and m["accuracy"][-1] > 0.8
  assert jax.tree.structure(state.params) == jax.tree.structure(params)


def test_regression_loss_padding_is_exact():
  loss_fn = fs.models.regression_loss(lambda w, x: x @ w)
  w = jnp.array([1.0, -2.0])
  x = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
  y = jnp.array([0.0, 0.0, 123.0])
  full = loss_fn(w, {"x": x[:2], "y": y[:2], fs.MASK_KEY: jnp.ones(2)}, None)[0]
  padded = loss_fn(w, {"x": x, "y": y, fs.MASK_KEY: jnp.array([1.0, 1.0, 0.0])}, None)[0]
  np.testing.assert_allclose(full, padded)
  np.testing.assert_allclose(full, 2.5)
