"""Chunks of one client: run the client unbatched vs ``jax.vmap`` over a size-1 axis (A/B).

On CPU the automatic chunk is one client for the convolutional models here (and was for all
four before light dense models got the padding rule, ``fs.memory.cpu_vmap_chunk``). A vmap
over one client still batches every op (batched GEMMs, grouped convolutions with a size-1
group), which XLA:CPU compiles differently. This times both, interleaved in one process, on the
same workloads and checks that they end at the same parameters.

  PYTHONPATH=. python -m benchmarks.chunk1 [--workloads logistic dense cnn cifar] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.workloads import WORKLOADS


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workloads", nargs="+", default=["logistic", "dense", "cnn", "cifar"],
                  choices=[k for k in WORKLOADS if k != "population"])
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  print(f"# 1-min load average {os.getloadavg()[0]:.2f}")
  print("| workload | cohort | rounds/s, vmap over 1 | rounds/s, unbatched | ratio "
        "| max param difference |")
  print("|---|---|---|---|---|---|")
  pops = {}
  for name in args.workloads:
    w = WORKLOADS[name]
    if w.data not in pops:
      pops.clear()
      x, y, ids = w.data(w.num_clients)
      pops[w.data] = fs.Population.from_arrays({"x": x, "y": y}, ids)
      del x, y, ids
    pop = pops[w.data]
    module = w.module()
    params = module.init(jax.random.key(0), pop.features["x"][:1])["params"]
    loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module, **w.train_kwargs))
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1),
                                server_optimizer=optax.sgd(1.0), batch_size=w.batch_size,
                                local_epochs=1)
    cohort = min(args.cohort, pop.num_clients)
    best, final = {}, {}
    for _ in range(args.repeats):
      for unbatched in (False, True):
        sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=1,
                            unbatched_single_client=unbatched)
        state, r = sim.benchmark(sim.init(params, jax.random.key(0)), args.rounds)
        best[unbatched] = max(best.get(unbatched, 0.0), r["rounds_per_s"])
        final[unbatched] = state.params
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(final[False]), jax.tree.leaves(final[True]), strict=True))
    print(f"| {name} | {cohort} | {best[False]:.3g} | {best[True]:.3g} "
          f"| {best[True] / best[False]:.2f}× | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
