"""Stragglers: the cohort sorted by client size vs by the local steps clients run (A/B).

With a system model the round sorts the cohort by the steps each client will actually run
(``fs.core.slot_steps``: planned steps x the straggler's work fraction, capped by the deadline)
before chunking; ``Algorithm.planned_steps=None`` gives the size order of earlier engines. Both
compute the same rounds (up to float summation order, checked here); this times them,
interleaved in one process, and records the padding the chunk schedule paid for (``step_slots``
/ ``client_steps`` of the timed block: 1.0 means no padding).

  PYTHONPATH=. python -m benchmarks.step_order [--workload dense] [--cohort 100] [--chunk 10]
      [--straggler-prob 0.9] [--rounds 20] [--repeats 3]
      [--out benchmarks/results/cpu-2core/step_order.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.workloads import WORKLOADS


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", default="dense", choices=["logistic", "dense", "cnn"])
  ap.add_argument("--cohort", type=int, default=100)
  ap.add_argument("--chunk", type=int, default=10)
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--straggler-prob", type=float, default=0.9)
  ap.add_argument("--min-fraction", type=float, default=0.1)
  ap.add_argument("--rounds", type=int, default=20, help="rounds per timed block")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None, help="append one JSON row per order and repeat")
  args = ap.parse_args()
  w = WORKLOADS[args.workload]
  x, y, ids = w.data(w.num_clients)
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  del x, y, ids
  module = w.module()
  params = module.init(jax.random.key(0), pop.features["x"][:1])["params"]
  steps_algo = fs.algorithms.fedavg(w.loss_fn(module), client_optimizer=optax.sgd(0.05),
                                    batch_size=w.batch_size, local_epochs=args.epochs)
  orders = {"size": steps_algo._replace(planned_steps=None), "steps": steps_algo}
  system = fs.systems.SystemModel(straggler_prob=args.straggler_prob,
                                  straggler_min_fraction=args.min_fraction)
  print(f"# {args.workload}, cohort {args.cohort}, chunk {args.chunk}, straggler_prob "
        f"{args.straggler_prob}, 1-min load {os.getloadavg()[0]:.2f}")
  print("| order | client updates/s | padding (step slots / steps) | load |")
  print("|---|---|---|---|")
  final = {}
  for repeat in range(args.repeats):
    for order, algo in orders.items():
      sim = fs.Simulation(algo, pop, cohort_size=args.cohort, chunk_size=args.chunk,
                          system=system)
      state, fig = sim.benchmark(sim.init(params, jax.random.key(0)), args.rounds)
      final[order] = state.params
      row = {
          "engine": "fedjax_sim", "benchmark": "step_order", "model": args.workload,
          "order": order, "cohort": args.cohort, "chunk_size": args.chunk,
          "local_epochs": args.epochs, "straggler_prob": args.straggler_prob,
          "straggler_min_fraction": args.min_fraction, "rounds": args.rounds, "repeat": repeat,
          "rounds_per_s": fig["rounds_per_s"],
          "client_updates_per_s": fig["clients"] / fig["seconds"],
          "padding_factor": fig["step_slots"] / max(fig["client_steps"], 1.0),
          "client_steps": fig["client_steps"], "step_slots": fig["step_slots"],
          "compile_plus_first_block_s": fig["first_block_seconds"],
          "load_avg_1min": os.getloadavg()[0], "jax": jax.__version__,
          "machine": "cpu-2core", "time": time.time(),
      }
      print(f"| {order} | {row['client_updates_per_s']:.1f} | {row['padding_factor']:.3f} "
            f"| {row['load_avg_1min']:.2f} |", flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(final["size"]), jax.tree.leaves(final["steps"]), strict=True))
  print(f"# max |params(size order) - params(step order)| after {2 * args.rounds} rounds: "
        f"{diff:.1e}")


if __name__ == "__main__":
  main()
