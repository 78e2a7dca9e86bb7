"""Per-client state for the whole population: round time vs population size at a fixed cohort.

SCAFFOLD keeps one params-shaped control variate per client on device. With a ~50k-parameter
model (logistic regression 784 -> 62: 48,670 parameters) and cohort 100, the round should cost
the same whatever the population, because only the cohort's states are gathered and scattered.

  python -m benchmarks.population_state --populations 1000 10000 30000 100000
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--populations", type=int, nargs="+", default=[1000, 10000, 30000, 100000])
  ap.add_argument("--cohort", type=int, default=100)
  ap.add_argument("--examples-per-client", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])
  params = {"w": jnp.zeros((784, 62)), "b": jnp.zeros(62)}
  rows = []
  for n in args.populations:
    rng = np.random.default_rng(0)
    m = n * args.examples_per_client
    x = rng.random((m, 784), np.float32)
    y = rng.integers(0, 62, m).astype(np.int32)
    pop = fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(n),
                                                                args.examples_per_client))
    del x, y
    algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=10,
                                  local_epochs=1)
    sim = fs.Simulation(algo, pop, cohort_size=args.cohort)
    state_gb = n * 48_670 * 4 / 2**30
    try:
      state = sim.init(params, jax.random.key(0))
    except ValueError as e:
      print(f"N={n}: refused before compiling: {e}", flush=True)
      rows.append({"population": n, "state_gib": state_gb, "refused": str(e)})
      continue
    t = time.perf_counter()
    state, r = sim.benchmark(state, args.rounds)
    row = {"population": n, "state_gib": round(state_gb, 2), "cohort": args.cohort,
           "seconds_per_round": r["seconds"] / args.rounds,
           "first_block_seconds": r["first_block_seconds"],
           "total_seconds": time.perf_counter() - t}
    rows.append(row)
    print(json.dumps(row), flush=True)
    del state, sim, pop
  print(f"\n| population | client state (GiB) | s/round (cohort {args.cohort}) |")
  print("|---|---|---|")
  for r in rows:
    if "refused" in r:
      print(f"| {r['population']} | {r['state_gib']:.1f} | refused: needs more memory |")
    else:
      print(f"| {r['population']} | {r['state_gib']:.2f} | {r['seconds_per_round']:.3f} |")


if __name__ == "__main__":
  main()
