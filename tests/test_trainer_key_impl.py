"""The client trainer with a non-default (rbg) key: what benchmarks/lm_step_breakdown.py times.

fs.Simulation rejects such run keys (tests/test_inputs.py); the trainer itself is key-impl
agnostic, which a future documented key-impl option would rely on.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.client import ClientData, make_local_trainer


def _setup():
  module = fs.zoo.StackOverflowTransformer(vocab_size=30, embed_dim=8, num_heads=2, ff_dim=16)
  tokens = np.random.default_rng(0).integers(1, 30, (12, 6)).astype(np.int32)
  feats = {"x": jnp.asarray(tokens[:, :-1]), "y": jnp.asarray(tokens[:, 1:])}
  params = module.init(jax.random.key(0), feats["x"][:4])["params"]
  loss = fs.models.sequence_loss(fs.models.linen_apply(module, train=True))
  train = jax.jit(make_local_trainer(loss, optax.sgd(0.1), batch_size=4, local_epochs=1))
  return train, params, ClientData(feats, jnp.int32(0), jnp.int32(10), 12)


def test_trainer_runs_with_rbg_key_deterministically():
  train, params, data = _setup()
  a = train(params, data, jax.random.key(3, impl="rbg"))
  b = train(params, data, jax.random.key(3, impl="rbg"))
  c = train(params, data, jax.random.key(4, impl="rbg"))
  assert int(a.num_steps) == 3
  assert np.isfinite(float(a.metrics["loss"]))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params)))
