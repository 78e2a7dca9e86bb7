"""precision= policy: dtypes of compute, gradients, deltas, clipping and DP noise (no compiles)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs


def _loss():
  return fs.models.classifier_loss(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"])


def _params():
  return {"w": jnp.ones((4, 3), jnp.float32) * 0.1, "v": jnp.ones((3, 2), jnp.float32)}


def _pop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 4)).astype(np.float32)
  y = rng.integers(0, 2, 24).astype(np.int32)
  return fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(6), 4))


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def test_bad_precisions_are_clear_errors():
  with pytest.raises(ValueError, match="loss scaling"):
    fs.precision.check_precision("f16")
  with pytest.raises(ValueError, match="expected one of"):
    fs.precision.check_precision("int8")
  old = types.SimpleNamespace(compute_capability="7.0", device_kind="Tesla V100")
  with pytest.raises(ValueError, match="no bfloat16"):
    fs.precision.check_precision("bf16", backend="gpu", devices=[old])
  new = types.SimpleNamespace(compute_capability="9.0", device_kind="H100")
  assert fs.precision.check_precision("bfloat16", backend="gpu", devices=[new]) == "bf16"
  with pytest.raises(ValueError, match="precision"):
    fs.algorithms.fedavg(_loss(), client_optimizer=optax.sgd(0.1), batch_size=2,
                         local_epochs=1, precision="f16")


def test_f32_is_identity_and_bf16_computes_in_bf16_with_f32_grads():
  loss = _loss()
  assert fs.precision.with_precision(loss, "f32") is loss
  low = fs.precision.with_precision(loss, "bf16")
  batch = {"x": jnp.ones((2, 4)), "y": jnp.array([0, 1]), fs.MASK_KEY: jnp.ones(2)}
  f = lambda p: low(p, batch, jax.random.key(0))[0]
  jaxpr = jax.make_jaxpr(jax.grad(f))(_params())
  dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert dots and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)
  g = jax.eval_shape(jax.grad(f), _params())
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(g))
  assert jax.eval_shape(f, _params()).dtype == jnp.float32


def test_dp_round_clips_and_noises_in_f32_with_bf16_clients():
  pop = _pop()
  agg = fs.aggregators.dp_mean(1.0, 1.0, denominator=4)
  algo = fs.algorithms.fedavg(_loss(), client_optimizer=optax.sgd(0.1), batch_size=2,
                              local_epochs=1, aggregator=agg, precision="bf16")
  data = fs.ClientData(pop.features, pop.offsets[0], pop.num_examples[0], pop.max_examples)
  out = jax.eval_shape(lambda p: algo.client_update(p, data, (), jax.random.key(1)), _params())
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out.delta))
  sim = fs.Simulation(algo, pop, cohort_size=4, chunk_size=2)
  state = sim.init(_params(), jax.random.key(0))
  step = lambda s, p: fs.core.round_step(sim.plan, s, p)
  eqns = list(_eqns(jax.make_jaxpr(step)(state, sim.population).jaxpr))
  dtypes = lambda name: {str(v.aval.dtype) for e in eqns if e.primitive.name == name
                         for v in e.outvars}
  assert "bfloat16" in dtypes("dot_general")  # the clients do compute in bf16
  assert dtypes("sqrt") == {"float32"}  # clip norms
  assert dtypes("erf_inv") == {"float32"}  # Gaussian noise
  assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
