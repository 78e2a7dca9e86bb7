"""benchmarks/ceiling.py: the step ceiling trains as the engine does, and its conv2 variants
compute the same convolution (the figures in docs/benchmarks.md rest on both)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from benchmarks import ceiling
from benchmarks.workloads import WORKLOADS


def _oracle_steps(name, steps, batch, *, train):
  """Plain Python loop of SGD(0.1) steps with the workload's loss, key ``fold_in(key(0), i)``
  at step i: the engine's trainer derives a fresh key per step the same way."""
  w = WORKLOADS[name]
  module = w.module()
  rng = np.random.default_rng(0)  # the ceiling's own batch, drawn in the same order
  x = jnp.asarray(rng.random((batch, *ceiling.SHAPES[name]), np.float32))
  y = jnp.asarray(rng.integers(0, ceiling.CLASSES[name], batch), jnp.int32)
  params = module.init(jax.random.key(0), x[:1])["params"]
  data = {"x": x, "y": y, fs.types.MASK_KEY: jnp.ones((batch,), jnp.float32)}
  if train:
    loss_fn = w.loss_fn(module)
  else:
    loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module, train=False))
  for i in range(steps):
    g = jax.grad(lambda p, k: loss_fn(p, data, k)[0])(params, jax.random.fold_in(
        jax.random.key(0), i))
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
  return params


@pytest.mark.slow  # compiles the EMNIST CNN twice (~5 s)
def test_ceiling_trains_with_dropout_and_a_fresh_key_per_step():
  run, params, bsz, fpe = ceiling._ceiling_program("cnn", steps=2, batch=2)
  assert bsz == 2 and fpe > 0
  got = run(params)
  chex.assert_trees_all_close(got, _oracle_steps("cnn", 2, 2, train=True), rtol=1e-5, atol=1e-6)
  # The check can fail: the model without dropout (the old ceiling) ends elsewhere, and so
  # would a ceiling with another optimizer than the oracle's plain SGD(0.1).
  off = _oracle_steps("cnn", 2, 2, train=False)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got),
                                                             jax.tree.leaves(off)))
  assert diff > 1e-4


@pytest.mark.parametrize("shape", [(2, 7, 6, 3), (1, 5, 5, 4)])
def test_conv2_variants_compute_the_same_convolution(shape):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 5), np.float32))
  want = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)
  variants = ceiling._conv2_variants()
  assert set(variants) == {"canonical", "lax", "slices", "sumdots", "patches"}
  for name, f in variants.items():
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(want), rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_every_choice_has_an_input_shape():
  # --workloads offers only workloads whose input shape the ceiling knows
  assert set(ceiling.CEILING_WORKLOADS) <= set(ceiling.SHAPES) & set(ceiling.CLASSES)
  assert set(ceiling.CEILING_WORKLOADS) <= set(WORKLOADS)
  with pytest.raises(SystemExit):
    ceiling.parse_args(["--workloads", "stackoverflow"])
  assert ceiling.parse_args(["--workloads", "cnn"]).workloads == ["cnn"]


# -- benchmarks/chunk_check.py ----------------------------------------------------------------

def test_chunk_check_refuses_bad_arguments():
  from benchmarks import chunk_check
  for argv in (["--workloads", "dense", "--chunk-sizes", "0"],
               ["--workloads", "dense", "--rounds", "0"],
               ["--workloads", "dense", "--cohorts", "7"],
               ["--workloads", "dense", "--batch-size", "0"],
               ["--workloads", "nope"]):
    with pytest.raises(SystemExit):
      chunk_check.parse_args(argv)


@pytest.mark.slow  # compiles three simulations (~15 s of CPU)
def test_chunk_check_times_the_same_work_for_every_setting():
  from benchmarks import chunk_check
  rows = chunk_check.check("logistic", 6, [1, 3, 8], rounds=1, repeats=2, num_clients=24)
  by = {r["setting"]: r for r in rows}
  assert set(by) == {"automatic", 1, 3}  # chunk 8 > cohort 6 is left out
  assert by[3]["chunk_size"] == 3 and by[1]["chunk_size"] == 1
  assert by["automatic"]["chunk_size"] == by["automatic"]["automatic_chunk"]
  assert all(len(r["seconds"]) == 2 for r in rows)
  best = min(rows, key=lambda r: r["median_s"])
  assert best["vs_best"] == 1.0 and all(r["best_setting"] == best["setting"] for r in rows)
  assert all(0 < r["vs_best"] <= 1.0 for r in rows)
  # the same cohorts for every setting: examples/s times seconds is the same example count
  counts = {round(r["examples_per_s"] * r["median_s"], 3) for r in rows}
  assert len(counts) == 1
  assert all(r["padding_waste"] >= 1.0 for r in rows)


@pytest.mark.slow  # tunes, then compiles and times three simulations
def test_chunk_check_times_the_measured_chunk_on_the_same_work():
  from benchmarks import chunk_check
  rows = chunk_check.check("logistic", 6, [1, 2], rounds=1, repeats=1, num_clients=24,
                           measured=True, batch_size=4)
  by = {r["setting"]: r for r in rows}
  assert set(by) == {"automatic", "measured", 1, 2}
  tuning = by["measured"]["tuning"]
  assert by["measured"]["chunk_size"] == tuning["choice"] in tuning["candidates"]
  assert not tuning["from_cache"] and by["measured"]["tuning_s"] > 0
  assert all(r["batch_size"] == 4 for r in rows)
  assert len({round(r["examples_per_s"] * r["median_s"], 3) for r in rows}) == 1


def test_zoo_choices_switch_the_cpu_path_off_and_restore_it():
  """The A/B of --zoo-variants really compares the two paths (and leaves the library as it was)."""
  x = jnp.ones((2, 6, 6, 3))
  conv = fs.zoo.Conv(4, (3, 3), padding="VALID")
  p = conv.init(jax.random.key(0), x)

  def jaxpr():
    return str(jax.make_jaxpr(lambda q: conv.apply(q, x))(p))

  on = jaxpr()
  assert on.count("custom_vjp_call") == 2 and "dot_general" in on  # bias; im2col forward
  with ceiling.zoo_choices(bias=False, im2col=False):
    off = jaxpr()
  assert off.count("custom_vjp_call") == 1 and "dot_general" not in off
  with ceiling.zoo_choices(bias=True, im2col=False):
    assert jaxpr().count("custom_vjp_call") == 2
  assert jaxpr() == on
  assert set(ceiling.ZOO_VARIANTS) == {"neither", "bias", "im2col", "both"}
