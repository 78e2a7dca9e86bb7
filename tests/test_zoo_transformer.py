"""fs.zoo.StackOverflowTransformer: parameter count equals pfl's PyTorch LMTransformer."""
import jax
import jax.numpy as jnp
import pytest

import fedjax_sim as fs


def _torch_formula(v, e, h, f, n):
  # nn.Embedding + n x TransformerEncoderLayer (in/out proj, two linears, two LayerNorms),
  # logits tied to the embedding; projections only when e != h.
  layer = 4 * h * h + 4 * h + h * f + f + f * h + h + 4 * h
  proj = 0 if e == h else (e * h + h) + (h * e + e)
  return v * e + n * layer + proj


def _count(m, t=20):
  v = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, t), jnp.int32))
  return sum(x.size for x in jax.tree.leaves(v))


def test_default_param_count_matches_pytorch():
  # 1,962,912 was also measured with torch.nn in /work/venvs/pfl (torch TransformerEncoder).
  m = fs.zoo.StackOverflowTransformer()
  assert _count(m) == _torch_formula(10004, 96, 96, 1536, 3) == 1_962_912


def test_param_count_matches_torch_module_when_importable():
  torch = pytest.importorskip("torch")
  nn = torch.nn
  v, e, h, f, n = 54, 8, 12, 16, 2
  emb = nn.Embedding(v, e)
  enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(h, 2, f, 0.1, batch_first=True), n,
                              enable_nested_tensor=False)
  proj = nn.Linear(e, h), nn.Linear(h, e)
  want = sum(p.numel() for mod in (emb, enc, *proj) for p in mod.parameters())
  m = fs.zoo.StackOverflowTransformer(vocab_size=50, embed_dim=e, hidden=h, heads=2,
                                      feedforward=f, num_layers=n)
  assert _count(m) == want


def test_forward_shape_and_causality():
  m = fs.zoo.StackOverflowTransformer(vocab_size=30, embed_dim=8, hidden=8, heads=2,
                                      feedforward=16, num_layers=1)
  x = jnp.arange(10, dtype=jnp.int32).reshape(1, 10) % 30 + 1
  p = m.init(jax.random.key(0), x)
  y = m.apply(p, x)
  assert y.shape == (1, 10, 34)
  # Changing the last token leaves earlier positions' logits unchanged (causal mask).
  y2 = m.apply(p, x.at[0, -1].set(5))
  assert jnp.allclose(y[0, :-1], y2[0, :-1], atol=1e-5)
  assert not jnp.allclose(y[0, -1], y2[0, -1])
