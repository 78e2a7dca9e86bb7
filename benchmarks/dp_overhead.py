"""DP overhead on the dense workload: DP-FedAvg vs FedAvg, interleaved A/B in one process.

  python -m benchmarks.dp_overhead --cohort 1000 --repeats 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.workloads import MODELS, emnist_shaped


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
  sims = {}
  for name, agg in (("fedavg", None), ("dp_fedavg", fs.aggregators.dp_mean(1.0, 1.0))):
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=20,
                                local_epochs=1, aggregator=agg)
    sim = fs.Simulation(algo, pop, cohort_size=args.cohort)
    state = sim.init(params, jax.random.key(0))
    state, _ = sim.benchmark(state, args.rounds)  # compile
    sims[name] = (sim, state)
  times = {name: [] for name in sims}
  for _ in range(args.repeats):
    for name, (sim, state) in sims.items():
      state, r = sim.benchmark(state, args.rounds)
      sims[name] = (sim, state)
      times[name].append(r["seconds"] / args.rounds)
  base, dp = np.median(times["fedavg"]), np.median(times["dp_fedavg"])
  print(f"{args.model} cohort {args.cohort}: FedAvg {base:.3f} s/round, DP-FedAvg {dp:.3f} "
        f"s/round (medians of {args.repeats} interleaved blocks of {args.rounds} rounds): DP "
        f"adds {100 * (dp / base - 1):+.1f}% (per-block s/round: {times})")


if __name__ == "__main__":
  main()
