"""fs.zoo.Dropout: flax's Dropout with 8- or 16-bit masks (fewer random bits on XLA:CPU)."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.zoo import Dropout, dropout_keep


def _apply(layer, x, key):
  return layer.apply({}, x, deterministic=False, rngs={"dropout": key})


def test_keep_probability_is_exact_where_the_width_allows():
  assert dropout_keep(0.25) == (8, 0.75)
  assert dropout_keep(0.5) == (8, 0.5)
  assert dropout_keep(1 / 1024) == (16, 1 - 1 / 1024)  # a multiple of 2**-16, not of 2**-8
  bits, keep = dropout_keep(0.1)
  assert bits == 16 and abs(keep - 0.9) <= 2.0 ** -17
  bits, keep = dropout_keep(0.1, bits=32)
  assert bits == 32 and abs(keep - 0.9) <= 2.0 ** -33
  assert dropout_keep(0.0) == (8, 1.0)
  assert dropout_keep(np.float32(0.25)) == (8, 0.75)  # NumPy scalars as flax takes them


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.1, 0.3])
def test_the_realised_rate_and_scale(rate):
  x = jnp.ones((64, 4096), jnp.float32)
  y = np.asarray(_apply(Dropout(rate), x, jax.random.key(3)))
  _, keep = dropout_keep(rate)
  assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / keep)}  # dropped or scaled
  kept = (y != 0).mean()
  sd = math.sqrt(keep * (1 - keep) / y.size)
  assert abs(kept - keep) < 5 * sd  # Bernoulli(keep) per element
  assert abs(y.mean() - 1.0) < 5 * sd / keep  # unbiased: E[y] = x


def test_masks_are_independent_across_elements_and_keys():
  x = jnp.ones((256, 512))
  a = np.asarray(_apply(Dropout(0.5), x, jax.random.key(0))) > 0
  b = np.asarray(_apply(Dropout(0.5), x, jax.random.key(1))) > 0
  # neighbouring elements share a 32-bit word but not their draws
  agree = (a[:, :-1] == a[:, 1:]).mean()
  assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / a[:, 1:].size)
  assert abs((a == b).mean() - 0.5) < 5 * math.sqrt(0.25 / a.size)
  again = np.asarray(_apply(Dropout(0.5), x, jax.random.key(0))) > 0
  np.testing.assert_array_equal(a, again)  # the key decides


def test_deterministic_and_rate_zero_are_the_identity():
  x = jax.random.normal(jax.random.key(0), (3, 5))
  chex.assert_trees_all_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
  chex.assert_trees_all_equal(_apply(Dropout(0.0), x, jax.random.key(1)), x)
  chex.assert_trees_all_equal(Dropout(0.3, deterministic=True).apply({}, x), x)


def test_rate_one_drops_everything_as_flax_does():
  x = jnp.arange(6.0).reshape(2, 3)
  ours = _apply(Dropout(1.0), x, jax.random.key(0))
  theirs = nn.Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  chex.assert_trees_all_equal(ours, theirs, jnp.zeros_like(x))
  assert dropout_keep(1.0) == (8, 0.0)


def test_integer_inputs_give_a_float_unbiased_result():
  """1 / keep is no integer (keep 0.75: 4/3): an integer input scaled in its own dtype would be
  scaled by 1, silently biased. Ours scales in floats (flax's layer raises on integers)."""
  x = jnp.full((64, 256), 3, jnp.int32)
  ours = _apply(Dropout(0.25), x, jax.random.key(3))
  with pytest.raises(TypeError):
    nn.Dropout(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert ours.dtype == jnp.float32
  kept = np.asarray(ours)[np.asarray(ours) != 0]
  np.testing.assert_allclose(kept, 4.0, rtol=1e-6)  # 3 / 0.75
  assert abs(float(ours.mean()) - 3.0) < 5 * 3.0 * np.sqrt(0.25 / 0.75 / x.size)
  for rate in (1.0, 0.5):  # every rate gives floats for integers, rate 1 (all zeros) too
    out = _apply(Dropout(rate), x, jax.random.key(3))
    assert out.dtype == jnp.float32
  assert not np.asarray(_apply(Dropout(1.0), x, jax.random.key(3))).any()


def test_broadcast_dims_share_the_mask():
  x = jnp.ones((8, 16, 32))
  y = np.asarray(_apply(Dropout(0.5, broadcast_dims=(1,)), x, jax.random.key(2)))
  assert (y == y[:, :1, :]).all() and 0 < (y > 0).mean() < 1


def test_vmapped_clients_draw_what_each_would_alone():
  """The engine vmaps the client step: a chunk of keys gives each client its own mask."""
  layer = Dropout(0.25)
  x = jnp.ones((4, 10, 7))
  keys = jax.random.split(jax.random.key(9), 4)
  batched = jax.vmap(lambda xi, k: _apply(layer, xi, k))(x, keys)
  alone = jnp.stack([_apply(layer, x[i], keys[i]) for i in range(4)])
  chex.assert_trees_all_equal(batched, alone)


def test_the_loss_gradient_flows_through_kept_elements_only():
  layer = Dropout(0.5)
  x = jnp.arange(1.0, 65.0).reshape(8, 8)
  key = jax.random.key(4)
  g = jax.grad(lambda v: _apply(layer, v, key).sum())(x)
  y = _apply(layer, x, key)
  np.testing.assert_array_equal(np.asarray(g), np.where(np.asarray(y) != 0, 2.0, 0.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rate=1.5), "rate must be a number in"),
    (dict(rate=-0.1), "rate must be a number in"),
    (dict(rate=0.2, bits=12), "bits must be"),
    (dict(rate=0.2, bits=8.0), "bits must be"),
    (dict(rate=0.999, bits=8), "keeps nothing"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _apply(Dropout(**kwargs), jnp.ones((2, 3)), jax.random.key(0))


def test_the_zoo_models_use_it():
  for module, x in ((fs.zoo.EmnistCNN(10), jnp.ones((1, 28, 28, 1))),
                    (fs.zoo.StackOverflowTransformer(vocab_size=20, embed_dim=8, num_heads=2,
                                                     ff_dim=16, num_layers=1),
                     jnp.ones((1, 20), jnp.int32))):
    variables = module.init(jax.random.key(0), x)
    _, state = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)},
                            capture_intermediates=lambda m, _: isinstance(m, nn.Dropout))
    assert not state.get("intermediates")  # no flax Dropout layer ran
    _, state = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)},
                            capture_intermediates=lambda m, _: isinstance(m, Dropout))
    assert state.get("intermediates")
