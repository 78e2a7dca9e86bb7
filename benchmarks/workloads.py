"""The fixed benchmark workloads of ../shared/bench/WORKLOADS.md: models, data, FLOP counting.

The library every benchmark imports (``benchmarks.run``, ``benchmarks.side_by_side``,
``benchmarks.gpu_suite`` and the single-purpose scripts); it imports nothing of ``benchmarks``
but ``benchmarks.peers.common`` (the NumPy-only data generators the peer scripts share), so the
scripts stay leaves. See ``benchmarks.run`` for what each workload is.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs
from benchmarks.peers.common import cifar_shaped, emnist_shaped  # noqa: F401 - the workloads' data


class Logistic(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(62)(x.reshape(x.shape[0], -1))


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(200)(x))
    x = nn.relu(nn.Dense(200)(x))
    return nn.Dense(62)(x)


MODELS = {"logistic": Logistic, "dense": Dense}


def synthetic_population(num_clients=10**6, per_client=10, dim=60, classes=10, seed=0):
  """LEAF Synthetic-style population: ``num_clients`` x 10 examples of 60 features, 10 classes."""
  rng = np.random.default_rng(seed=seed)
  total = num_clients * per_client
  x = rng.standard_normal((total, dim), np.float32)
  w = rng.standard_normal((dim, classes), np.float32)
  y = np.argmax(x @ w + rng.standard_normal((total, classes), np.float32), -1).astype(np.int32)
  return x, y, np.repeat(np.arange(num_clients), per_client)


def pfl_simple_cnn(num_classes: int = 10) -> nn.Module:
  """pfl-research's CIFAR-10 benchmark model ``simple_cnn`` (benchmarks/model/pytorch/cnn.py).

  conv32-conv64 (3x3, valid padding), 2x2 max-pool, dropout 0.25, dense128, dropout 0.5,
  dense(num_classes): on 32x32x3 inputs 1,626,442 parameters. That is exactly the layer stack of
  ``fs.zoo.EmnistCNN``, so it is that module (its CPU conv path included); only the initialisers
  differ (pfl: Glorot-uniform kernels), which does not change the work a round does.
  """
  return fs.zoo.EmnistCNN(num_classes)


class PopLogistic(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A fixed workload of ../shared/bench/WORKLOADS.md.

  Attributes:
    data: ``(num_clients) -> (x, y, client_ids)``.
    module: ``() -> flax module`` called as ``module(x)`` (dropout, if any, is on in training).
    train_kwargs: extra ``module.apply`` keyword arguments when training.
    batch_size: the local minibatch size.
    cohorts: the cohort sizes this workload defines.
    default_cohorts: what runs when ``--cohorts`` is not given.
    dp_only: the workload is defined with DP-FedAvg (clip 1, z 1) only.
    dense_flops: model FLOPs per example = 6 x params (dense layers); else 3 x the forward
      FLOPs from XLA's cost analysis (convolutions counted properly).
    num_clients: the population size.
  """

  data: Callable[..., tuple]
  module: Callable[[], nn.Module]
  batch_size: int
  cohorts: tuple[int, ...]
  default_cohorts: tuple[int, ...]
  train_kwargs: dict = dataclasses.field(default_factory=dict)
  dp_only: bool = False
  dense_flops: bool = True
  num_clients: int = 3400


WORKLOADS = {
    "logistic": Workload(emnist_shaped, Logistic, 20, (10, 100, 1000), (10, 100, 1000)),
    "dense": Workload(emnist_shaped, Dense, 20, (10, 100, 1000, 10**4), (10, 100, 1000)),
    "cnn": Workload(emnist_shaped, lambda: fs.zoo.EmnistCNN(62), 20, (10, 100, 1000), (10, 100),
                    train_kwargs={"train": True}, dense_flops=False),
    "cifar": Workload(cifar_shaped, pfl_simple_cnn, 10, (50,), (50,),
                      train_kwargs={"train": True}, dense_flops=False, num_clients=1000),
    "population": Workload(synthetic_population, PopLogistic, 10, (100, 1000, 10**4), (10**4,),
                           dp_only=True, num_clients=10**6),
    "cifar-small": Workload(cifar_shaped, lambda: fs.zoo.CifarCNN(10), 10, (50,), (50,),
                            dense_flops=False, num_clients=1000),
}


def flops_per_example(workload: Workload, module, params, x1) -> float:
  """Training FLOPs per example (see :class:`Workload`)."""
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  if workload.dense_flops:
    return 6.0 * num_params
  cost = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x1).compile()
  analysis = cost.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return 3.0 * float(analysis["flops"]) / x1.shape[0]


class BenchmarkError(SystemExit):
  """A run that must not produce a figure (exits non-zero with the message)."""


def check_finite(params, what: str, nonfinite_rounds: float = 0.0) -> None:
  """Fails loudly if ``params`` holds a non-finite value, or if the engine skipped rounds whose
  server step would have made them non-finite (``on_nonfinite``): a diverged run has no figure."""
  bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
         if not bool(np.all(np.isfinite(np.asarray(leaf))))]
  if bad:
    raise BenchmarkError(f"benchmark error: {what} produced non-finite parameters in "
                         f"{', '.join(bad)}; no figure is recorded.")
  if nonfinite_rounds:
    raise BenchmarkError(f"benchmark error: {what} produced non-finite parameters in "
                         f"{int(nonfinite_rounds)} rounds (the engine skipped those server "
                         "steps); no figure is recorded.")


def gemm_gflops(n=2048, repeats=5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9
