"""The CPU convolution path (canonical-layout gradients) computes what the plain path computes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs


def _close(a, b, tol):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 0), (1, 3))])
def test_conv_gradients_match_lax(padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 9, 8, 2)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 2, 2, 5)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")

  def f(impl):
    def loss(x, k):
      y = fs.zoo.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn, impl=impl)
      return jnp.sum(jnp.sin(y))
    return jax.value_and_grad(loss, argnums=(0, 1))(x, k)

  _close(f("canonical"), f("lax"), 1e-5)


def test_unsupported_convs_fall_back():
  x = jnp.ones((2, 8, 8, 3))
  k = jnp.ones((3, 3, 3, 4))
  y = fs.zoo.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  impl="canonical")
  assert y.shape == (2, 4, 4, 4)
  with pytest.raises(ValueError, match="impl"):
    fs.zoo.conv_general_dilated(x, k, (1, 1), "SAME", impl="fast")


@pytest.mark.parametrize("model,shape", [(fs.zoo.EmnistCNN, (28, 28, 1)),
                                         (fs.zoo.CifarCNN, (32, 32, 3))])
@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_local_training_same_params_on_both_paths(model, shape):
  """The engine's local trainer (while_loop over minibatches) ends at the same parameters."""
  rng = np.random.default_rng(1)
  n = 30
  feats = {"x": jnp.asarray(rng.random((n, *shape)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
  params = model(conv_impl="lax").init(jax.random.key(0), feats["x"][:1])["params"]
  out = {}
  for impl in ("lax", "canonical"):
    loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model(conv_impl=impl)))
    train = fs.client.make_local_trainer(loss_fn, optax.sgd(0.1), batch_size=10, local_epochs=1)
    data = fs.ClientData(feats, jnp.int32(0), jnp.int32(n), n)
    out[impl] = jax.jit(lambda p, d, train=train: train(p, d, jax.random.key(2)))(params, data)
  assert int(out["lax"].num_steps) == 3
  _close(out["canonical"].params, out["lax"].params, 1e-5)


def test_auto_is_canonical_on_cpu_and_params_unchanged():
  m = fs.zoo.EmnistCNN()
  x = jnp.ones((1, 28, 28, 1))
  p = m.init(jax.random.key(0), x)["params"]
  p_lax = fs.zoo.EmnistCNN(conv_impl="lax").init(jax.random.key(0), x)["params"]
  assert jax.tree.structure(p) == jax.tree.structure(p_lax)
  _close(p, p_lax, 0)
  assert m.apply({"params": p}, x).shape == (1, 62)
  # "auto" really takes the CPU path here (the params above would match either way).
  jaxpr = lambda mod: str(jax.make_jaxpr(lambda q: mod.apply({"params": q}, x))(p))
  assert "custom_vjp_call" in jaxpr(m)
  assert "custom_vjp_call" not in jaxpr(fs.zoo.EmnistCNN(conv_impl="lax"))


def test_conv_clone_and_mixed_dilation_types():
  c = fs.zoo.Conv(4, (3, 3), impl="canonical").clone(impl="lax")
  assert c.conv_general_dilated.keywords == {"impl": "lax"}
  x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
  out = fs.zoo.conv_general_dilated(x, w, (1, 1), "VALID", [1, 1], (1, 1),
                                    ("NHWC", "HWIO", "NHWC"), impl="canonical")
  np.testing.assert_allclose(out, jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2)])
def test_max_pool_gradients_match_reduce_window_with_ties(shape):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  x = x.at[:, :4, :4, :].set(0.5).at[0, 0, 1, 0].set(2.0)  # ties among equal maxima

  def f(impl):
    return jax.value_and_grad(
        lambda x: jnp.sum(jnp.sin(3 * fs.zoo.max_pool(jax.nn.relu(x), (2, 2), impl=impl)))
    )(x)

  _close(f("canonical"), f("lax"), 1e-6)


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_single_client_chunks_run_unbatched_with_same_results():
  """chunk_size=1 runs the client without vmap (unbatched_single_client=True): same params."""
  rng = np.random.default_rng(0)
  x = rng.random((60, 8, 8, 2), np.float32)
  y = rng.integers(0, 5, 60).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(5), 12))
  model = fs.zoo.CifarCNN(5)
  params = model.init(jax.random.key(0), x[:1])["params"]
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(model)),
                              client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                              batch_size=5, local_epochs=1)
  out = {}
  for flag in (False, True):
    sim = fs.Simulation(algo, pop, cohort_size=3, chunk_size=1, unbatched_single_client=flag)
    state, metrics = sim.round(sim.init(params, jax.random.key(0)))
    out[flag] = (state.params, metrics["clients"], metrics["client_steps"])
  _close(out[True], out[False], 1e-5)


@pytest.mark.parametrize("batched", ["both", "x_only", "k_only", "nested"])
def test_conv_under_vmap_matches_plain_vmap(batched):
  """The canonical conv's custom_vmap rule (a loop over clients) equals plain vmap of lax's conv:
  values and both gradients, per-client kernels, partly batched and nested vmaps."""
  rng = np.random.default_rng(1)
  dn = ("NHWC", "HWIO", "NHWC")
  x = jnp.asarray(rng.normal(size=(2, 3, 2, 7, 6, 2)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 3, 3, 2, 2, 4)), jnp.float32)

  def f(impl):
    def loss(x, k):
      y = fs.zoo.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, impl=impl)
      return jnp.sum(jnp.sin(y))
    g = jax.value_and_grad(loss, argnums=(0, 1))
    if batched == "both":
      return jax.vmap(g)(x[0], k[0])
    if batched == "x_only":
      return jax.vmap(g, in_axes=(0, None))(x[0], k[0, 0])
    if batched == "k_only":
      return jax.vmap(g, in_axes=(None, 0))(x[0, 0], k[0])
    return jax.vmap(jax.vmap(g))(x, k)

  _close(f("canonical"), f("lax"), 1e-4)


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 0), (1, 3)), [[1, 1], [0, 2]]])
def test_conv_module_matches_flax_conv_with_its_bias_path(padding):
  """fs.zoo.Conv's CPU call (its own params + add_channel_bias) = nn.Conv: same parameter
  tree and initial values, same outputs and gradients."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 9, 8, 3)), jnp.float32)
  ours, flax_conv = fs.zoo.Conv(5, (3, 2), padding=padding), nn.Conv(5, (3, 2), padding=padding)
  assert fs.zoo.canonical_conv_call(ours, x)
  p, p_flax = ours.init(jax.random.key(1), x), flax_conv.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(p, p_flax)
  p = jax.tree.map(lambda v: v + 0.3, p)  # a nonzero bias
  jaxpr = str(jax.make_jaxpr(lambda q: ours.apply(q, x))(p))
  assert jaxpr.count("custom_vjp_call") == 2  # the convolution and the bias

  def f(module):
    return jax.value_and_grad(lambda q: jnp.sum(jnp.sin(module.apply(q, x))))(p)

  _close(f(ours), f(flax_conv), 1e-5)


@pytest.mark.parametrize("kwargs,shape", [
    ({"strides": 2}, (2, 9, 8, 3)),
    ({"kernel_dilation": 2}, (2, 9, 8, 3)),
    ({"feature_group_count": 3}, (2, 9, 8, 3)),
    ({"padding": "CIRCULAR"}, (2, 9, 8, 3)),
    ({"padding": 1}, (2, 9, 8, 3)),
    ({"use_bias": False}, (2, 9, 8, 3)),
    ({"impl": "lax"}, (2, 9, 8, 3)),
    ({}, (9, 8, 3)),  # no batch axis
    ({}, (2, 2, 9, 8, 3)),  # two batch axes
])
def test_conv_module_falls_back_to_flax_call(kwargs, shape):
  """Anything but a plain NHWC 2-D conv is nn.Conv's own call (same params, same results)."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=shape), jnp.float32)
  ours = fs.zoo.Conv(6, (3, 3), **kwargs)
  flax_conv = nn.Conv(6, (3, 3), **{k: v for k, v in kwargs.items() if k != "impl"})
  assert not fs.zoo.canonical_conv_call(ours, x)
  p = ours.init(jax.random.key(2), x)
  chex.assert_trees_all_equal(p, flax_conv.init(jax.random.key(2), x))
  _close(ours.apply(p, x), flax_conv.apply(p, x), 1e-5)


def test_add_channel_bias_gradient_under_vmap_and_in_bfloat16():
  rng = np.random.default_rng(6)
  y = jnp.asarray(rng.normal(size=(4, 3, 5, 7)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)

  def grads(add):
    loss = lambda y, b: jnp.sum(jnp.sin(add(y, b)))
    return jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)))(y, b)  # a bias per client

  _close(grads(fs.zoo.add_channel_bias), grads(lambda y, b: y + b), 1e-5)
  yb, bb = y[0].astype(jnp.bfloat16), b[0].astype(jnp.bfloat16)
  g = jax.grad(lambda b: jnp.sum(fs.zoo.add_channel_bias(yb, b)).astype(jnp.float32))(bb)
  assert g.dtype == jnp.bfloat16 and g.shape == (7,)
  np.testing.assert_allclose(np.asarray(g, np.float32), 15.0)
  # Mixed dtypes: each gradient in its own input's dtype (a float32 y, a bfloat16 bias).
  gy, gb = jax.grad(lambda y, b: jnp.sum(fs.zoo.add_channel_bias(y, b)), argnums=(0, 1))(y[0], bb)
  assert gy.dtype == jnp.float32 and gb.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="bias must have shape"):
    fs.zoo.add_channel_bias(y, b)  # [4, 7] bias: not one vector
  with pytest.raises(ValueError, match="bias must have shape"):
    jax.grad(lambda b: jnp.sum(fs.zoo.add_channel_bias(y[0], b)))(b[0, :3])


@pytest.mark.parametrize("shape,kernel", [((3, 10, 9, 3), (3, 3, 3, 4)),  # im2col forward
                                          ((2, 7, 7, 1), (2, 3, 1, 5)),
                                          ((2, 8, 8, 4), (3, 3, 4, 6))])  # depth 36: XLA's
def test_small_depth_forward_matches_lax_conv(shape, kernel):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  depth = kernel[0] * kernel[1] * kernel[2]
  jaxpr = str(jax.make_jaxpr(fs.zoo._fwd_conv)(x, k))
  assert ("conv_general_dilated" in jaxpr) == (depth > fs.zoo.PATCHES_MAX_DEPTH)

  def f(impl):
    return jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fs.zoo.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=dn, impl=impl))), argnums=(0, 1))(x, k)

  _close(f("canonical"), f("lax"), 1e-5)
  vm = jax.vmap(lambda x, k: fs.zoo.conv_general_dilated(x, k, (1, 1), "VALID",
                                                         dimension_numbers=dn))
  xs, ks = jnp.stack([x, 2 * x]), jnp.stack([k, -k])
  _close(vm(xs, ks), jax.vmap(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=dn))(xs, ks), 1e-5)


def test_conv_module_canonical_call_accepts_lists_and_unit_strides():
  x = jnp.ones((2, 6, 6, 3))
  call = fs.zoo.canonical_conv_call
  assert call(fs.zoo.Conv(4, [3, 3], strides=[1, 1], input_dilation=1,
                          kernel_dilation=(1, 1)), x)
  assert not call(fs.zoo.Conv(4, (3, 3), strides=(1, 2)), x)
  assert not call(fs.zoo.Conv(4, (3, 3), padding=np.array([[1, 1], [1, 1]])), x)


def test_conv_module_in_bfloat16_matches_flax_conv():
  """dtype=bfloat16 (computation) with float32 params: the same promotion as nn.Conv's."""
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 7, 7, 3)), jnp.float32)
  ours = fs.zoo.Conv(4, (3, 3), padding="VALID", dtype=jnp.bfloat16)
  flax_conv = nn.Conv(4, (3, 3), padding="VALID", dtype=jnp.bfloat16)
  assert fs.zoo.canonical_conv_call(ours, x)
  p = ours.init(jax.random.key(3), x)
  chex.assert_trees_all_equal(p, flax_conv.init(jax.random.key(3), x))
  a, b = ours.apply(p, x), flax_conv.apply(p, x)
  assert a.dtype == b.dtype == jnp.bfloat16
  _close(a.astype(jnp.float32), b.astype(jnp.float32), 5e-2)
  g = jax.grad(lambda q: jnp.sum(ours.apply(q, x).astype(jnp.float32)))(p)
  g_flax = jax.grad(lambda q: jnp.sum(flax_conv.apply(q, x).astype(jnp.float32)))(p)
  chex.assert_trees_all_equal_dtypes(g, g_flax)
  _close(g, g_flax, 5e-2)
