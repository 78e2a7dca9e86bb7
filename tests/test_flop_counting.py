"""benchmarks.workloads.count_flops: every operation counted, the same on every backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from benchmarks import ceiling, workloads


def _params(module, x1):
  return module.init(jax.random.key(0), x1)["params"]


def test_cifar_counts_match_the_analytic_figure():
  # measured-2026-12.md: pfl's simple_cnn on 32x32x3 is 101.6 MFLOP per training example
  # (3 x forward). By hand: conv 2*(30*30*32*27 + 28*28*64*288) = 30.46 M, dense
  # 2*(12544*128 + 128*10) = 3.21 M; bias/ReLU/pool add ~0.2 M. Tolerance 1%.
  w = workloads.WORKLOADS["cifar"]
  module = w.module()
  x1 = jnp.ones((1, 32, 32, 3))
  fpe = workloads.flops_per_example(w, module, _params(module, x1), x1)
  assert fpe == pytest.approx(101.6e6, rel=0.01)
  counts = workloads.forward_flops(module, _params(module, x1), x1)
  conv1, conv2 = 2 * 30 * 30 * 32 * 27, 2 * 28 * 28 * 64 * 288
  dense = 2 * (12544 * 128 + 128 * 10)
  # On CPU the first conv (depth 27 <= fs.zoo.PATCHES_MAX_DEPTH) runs as im2col + a dot, so
  # its FLOPs are the dot's; the total is the same either way.
  assert counts["conv"] == pytest.approx(conv2)
  assert counts["matmul"] == pytest.approx(dense + conv1)
  with ceiling.zoo_choices(bias=True, im2col=False):
    lax_counts = workloads.forward_flops(module, _params(module, x1), x1)
  assert lax_counts["conv"] == pytest.approx(conv1 + conv2)
  assert lax_counts["matmul"] == pytest.approx(dense)


def test_matmul_and_scan_are_counted_per_iteration():
  a, b = jnp.ones((4, 3)), jnp.ones((3, 5))
  assert workloads.count_flops(lambda a, b: a @ b, a, b)["matmul"] == 2 * 4 * 3 * 5

  def looped(a, b):
    return jax.lax.scan(lambda c, _: (c, a @ b), 0.0, None, length=7)[1]

  assert workloads.count_flops(looped, a, b)["matmul"] == 7 * 2 * 4 * 3 * 5


@pytest.mark.slow  # (~2 s) test_matmul_and_scan_are_counted_per_iteration stays
def test_lstm_counts_every_time_step():
  # XLA:CPU's cost analysis counts a while-loop body once; the jaxpr count multiplies by T.
  m = fs.zoo.ShakespeareLSTM(hidden=16)
  x1 = jnp.ones((1, 80), jnp.int32)
  counts = workloads.forward_flops(m, _params(m, x1), x1)
  gates = 2 * 4 * 16 * (8 + 16) + 2 * 4 * 16 * (16 + 16)  # two layers, per step
  assert counts["matmul"] == pytest.approx(80 * (gates + 2 * 16 * 90))
  assert counts["elementwise"] > 80 * 2 * 16 * 5  # gate nonlinearities and products


def test_lm_workloads_shapes_and_sizes():
  x, y, ids = workloads.stackoverflow_shaped(40)
  assert x.shape[1] == 20 and x.dtype == np.int32 and (x[:, 0] == 1).all()
  np.testing.assert_array_equal(x[:, 1:][y[:, :-1] > 2], y[:, :-1][y[:, :-1] > 2])  # shifted
  sizes = np.bincount(ids)
  assert sizes.min() >= 1 and sizes.max() <= 256
  assert workloads.WORKLOADS["stackoverflow"].loss == "sequence"
