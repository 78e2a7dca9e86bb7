"""DP overhead on the dense workload: DP-FedAvg vs FedAvg, interleaved A/B in one process.

  python -m benchmarks.dp_overhead --cohort 1000 --repeats 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs
from benchmarks.workloads import MODELS, emnist_shaped, interleaved_aggregator_seconds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="dense", choices=list(MODELS))
  ap.add_argument("--cohort", type=int, default=1000)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  x, y, ids = emnist_shaped()
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  module = MODELS[args.model]()
  params = module.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module))
  times = interleaved_aggregator_seconds(
      {"fedavg": None, "dp_fedavg": fs.aggregators.dp_mean(1.0, 1.0)}, loss_fn, pop, params,
      cohort=args.cohort, rounds=args.rounds, repeats=args.repeats)
  base, dp = np.median(times["fedavg"]), np.median(times["dp_fedavg"])
  print(f"{args.model} cohort {args.cohort}: FedAvg {base:.3f} s/round, DP-FedAvg {dp:.3f} "
        f"s/round (medians of {args.repeats} interleaved blocks of {args.rounds} rounds): DP "
        f"adds {100 * (dp / base - 1):+.1f}% (per-block s/round: {times})")


if __name__ == "__main__":
  main()
