"""fs.zoo.StackOverflowTransformer: pfl-research's Stack Overflow transformer, ported."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs


def _pfl_param_count(vocab, d, ff, layers):
  """torch.nn.TransformerEncoderLayer (in/out proj, 2 linears, 2 LayerNorms) + tied embedding."""
  attn = 3 * d * d + 3 * d + d * d + d
  feed = d * ff + ff + ff * d + d
  norms = 2 * 2 * d
  return vocab * d + layers * (attn + feed + norms)


@pytest.mark.parametrize("vocab,d,heads,ff,layers", [(10004, 96, 8, 1536, 3), (37, 16, 4, 24, 2)])
def test_param_count_matches_pfl_formula(vocab, d, heads, ff, layers):
  m = fs.zoo.StackOverflowTransformer(vocab_size=vocab, embed_dim=d, num_heads=heads,
                                      ff_dim=ff, num_layers=layers)
  shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((2, 20), jnp.int32))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert n == _pfl_param_count(vocab, d, ff, layers)


# slow tier: a 1.96M-parameter forward and loss (~5 s); the shape doctest, parameter count and
# FLOP tests stay
@pytest.mark.slow
def test_forward_shape_causal_and_finite_loss():
  m = fs.zoo.StackOverflowTransformer(vocab_size=40, embed_dim=16, num_heads=4, ff_dim=32,
                                      num_layers=1)
  x = jax.random.randint(jax.random.key(1), (3, 20), 1, 40)
  v = m.init(jax.random.key(0), x)
  apply = jax.jit(m.apply)
  logits = apply(v, x)
  assert logits.shape == (3, 20, 40)
  # Causal: changing the last token leaves every earlier position's logits unchanged.
  x2 = x.at[:, -1].set((x[:, -1] % 39) + 1)
  logits2 = apply(v, x2)
  np.testing.assert_allclose(logits2[:, :-1], logits[:, :-1], atol=1e-5)
  assert not np.allclose(logits2[:, -1], logits[:, -1])
  loss_fn = fs.models.sequence_loss(lambda p, xx, k: m.apply(p, xx, train=True,
                                                             rngs={"dropout": k}))
  batch = {"x": x, "y": jnp.roll(x, -1, 1).at[:, -1].set(0), fs.MASK_KEY: jnp.ones(3)}
  loss, aux = loss_fn(v, batch, jax.random.key(2))
  assert np.isfinite(float(loss)) and 0.0 <= float(aux["accuracy"]) <= 1.0


def test_too_long_sequence_is_a_clear_error():
  m = fs.zoo.StackOverflowTransformer(vocab_size=10, embed_dim=8, num_heads=2, ff_dim=8)
  with pytest.raises(ValueError, match="max_len"):
    m.init(jax.random.key(0), jnp.ones((1, 21), jnp.int32))


def test_workload_flops_are_the_analytic_transformer_count():
  from benchmarks import workloads

  w = workloads.WORKLOADS["stackoverflow-transformer"]
  assert w.loss == "sequence" and w.batch_size == 16 and 400 in w.cohorts
  m = fs.zoo.StackOverflowTransformer(vocab_size=30, embed_dim=8, num_heads=2, ff_dim=12,
                                      num_layers=2)
  x = jnp.ones((1, 20), jnp.int32)
  params = m.init(jax.random.key(0), x)["params"]
  t, d, f, v, layers = 20, 8, 12, 30, 2
  # per layer: qkv, output projection, scores and weighted values (T x T), two feed-forward dots
  per_layer = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * f
  assert workloads.forward_flops(m, params, x)["matmul"] == layers * per_layer + 2 * t * d * v
