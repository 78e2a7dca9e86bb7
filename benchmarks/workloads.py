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
import optax

import fedjax_sim as fs
from benchmarks.peers.common import (  # noqa: F401 - the workloads' data
  cifar_shaped,
  emnist_shaped,
  shakespeare_shaped,
  stackoverflow_shaped,
)
from fedjax_sim.flops import count_flops  # the jaxpr counter (the CPU chunk rule uses it too)


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
    dense_flops: kept for old callers; FLOPs are always counted by :func:`count_flops`.
    num_clients: the population size.
    loss: ``"classifier"`` (``fs.models.classifier_loss``) or ``"sequence"``
      (``fs.models.sequence_loss``, pad id 0: next-token prediction).
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
  loss: str = "classifier"

  def loss_fn(self, module):
    """The workload's training loss for ``module`` (dropout on where the model has it)."""
    apply = fs.models.linen_apply(module, **self.train_kwargs)
    if self.loss == "sequence":
      return fs.models.sequence_loss(apply)
    return fs.models.classifier_loss(apply)


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
    # FedJAX's Stack Overflow next-word LSTM (fs.zoo.StackOverflowLSTM, 4,050,748 parameters) on
    # 20-token sentences; client sizes as Stack Overflow's (benchmarks/peers/common.py: LM_DATA),
    # 3400 of its 342,477 clients (the per-round work depends on the size distribution, not on
    # the population); batch 16 and cohort 50 as Reddi et al. 2021.
    "stackoverflow": Workload(stackoverflow_shaped, fs.zoo.StackOverflowLSTM, 16, (10, 50),
                              (50,), dense_flops=False, loss="sequence"),
    # pfl-research's Stack Overflow transformer (fs.zoo.StackOverflowTransformer, 1,962,912
    # parameters; apple/pfl-research benchmarks/lm/configs/baseline.yaml) on the same 20-token
    # sentences; pfl's local batch 16 and cohort 400 (50 as the smaller row).
    "stackoverflow-transformer": Workload(stackoverflow_shaped, fs.zoo.StackOverflowTransformer,
                                          16, (50, 400), (400,), train_kwargs={"train": True},
                                          dense_flops=False, loss="sequence"),
    # FedJAX/TFF's Shakespeare character LSTM (fs.zoo.ShakespeareLSTM, 820,522 parameters) on
    # 80-character snippets, its 715 clients; batch 4 and cohort 10 as Reddi et al. 2021.
    "shakespeare": Workload(shakespeare_shaped, fs.zoo.ShakespeareLSTM, 4, (10, 50), (10,),
                            dense_flops=False, num_clients=715, loss="sequence"),
}


#: Training FLOPs = this many times the forward FLOPs (the backward pass costs about twice the
#: forward: one product for the input gradient and one for the weight gradient per layer).
TRAIN_FLOPS_PER_FORWARD = 3.0


def forward_flops(module, params, x1) -> dict:
  """:func:`count_flops` of the module's forward pass on ``x1`` (one example)."""
  return count_flops(lambda p, x: module.apply({"params": p}, x), params, x1)


def xla_flops(module, params, x1) -> float | None:
  """The ``flops`` of XLA's cost analysis of the compiled forward pass on ``x1`` (or None).

  Backend-dependent: on GPU the figure misses convolutions lowered to cuDNN custom calls (9.75
  instead of 101.6 MFLOP per ``cifar`` training example in the H100 run), so it is recorded
  for comparison only; :func:`flops_per_example` counts the jaxpr.
  """
  try:
    analysis = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(
        params, x1).compile().cost_analysis()
  except Exception:  # noqa: BLE001 - some backends have no cost analysis
    return None
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def flops_per_example(workload: Workload, module, params, x1) -> float:
  """Training FLOPs per example: 3 x the forward FLOPs counted by :func:`count_flops`.

  Every workload on every backend the same way (the ``dense_flops`` attribute no longer
  changes it; ``6 x params`` undercounts sequence models by the sequence length).
  """
  del workload
  return TRAIN_FLOPS_PER_FORWARD * forward_flops(module, params, x1)["total"] / x1.shape[0]


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


def gemm_gflops(n=2048, repeats=5, dtype=jnp.float32) -> float:
  """The best of ``repeats`` timed ``n x n`` matmuls in ``dtype`` (jax's default matmul
  precision), in GFLOP/s: the peak a run's ``fraction_of_peak`` divides by."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def interleaved_aggregator_seconds(aggregators: dict, loss_fn, population, params, *,
                                   cohort: int, rounds: int, repeats: int) -> dict[str, list]:
  """Seconds per round of FedAvg under each aggregator, timed interleaved (arm by arm, block
  by block) so that load drifts hit every arm alike; the compile round is excluded.

  Returns:
    ``{name: [seconds per round of each repeat's block]}`` for ``aggregators`` ``{name: agg}``.
  """
  sims = {}
  for name, agg in aggregators.items():
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=20,
                                local_epochs=1, aggregator=agg)
    sim = fs.Simulation(algo, population, cohort_size=cohort)
    state, _ = sim.benchmark(sim.init(params, jax.random.key(0)), rounds)  # compile
    sims[name] = (sim, state)
  times = {name: [] for name in sims}
  for _ in range(repeats):
    for name, (sim, state) in sims.items():
      state, r = sim.benchmark(state, rounds)
      sims[name] = (sim, state)
      times[name].append(r["seconds"] / rounds)
  return times
