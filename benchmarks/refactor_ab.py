"""A/B: the engine at two commits, interleaved in one sitting (same machine, same load).

Runs ``Simulation.benchmark`` on the EMNIST-shaped logistic and dense workloads of
``benchmarks.workloads`` at cohorts 10 and 100, alternating between two checkouts (each imported in
its own subprocess), and prints each side's best rounds/s and the ratio new / old. Used to check
that moving the round into ``fedjax_sim.core`` / ``fedjax_sim.programs`` cost no speed.

  python -m benchmarks.refactor_ab --old /path/to/old/checkout --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax, optax, numpy as np
import fedjax_sim as fs
try:
  from benchmarks.workloads import Dense, Logistic, emnist_shaped
except ImportError:  # a checkout from before benchmarks/workloads.py
  from benchmarks.run import Dense, Logistic, emnist_shaped
model, cohort, rounds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x, y, ids = emnist_shaped(num_clients=400)
pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
module = {"logistic": Logistic, "dense": Dense}[model]()
params = module.init(jax.random.key(0), pop.features["x"][:1])["params"]
loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module))
algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), batch_size=20,
                            local_epochs=1)
sim = fs.Simulation(algo, pop, cohort_size=cohort)
state, r = sim.benchmark(sim.init(params, jax.random.key(0)), rounds)
print(json.dumps({"rounds_per_s": r["rounds_per_s"], "compile_s": r["first_block_seconds"],
                  "file": fs.__file__}))
"""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--old", required=True, help="checkout of the baseline commit")
  p.add_argument("--new", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=20)
  args = p.parse_args(argv)
  rows = []
  for model in ("logistic", "dense"):
    for cohort in (10, 100):
      best = {}
      for _ in range(args.repeats):
        for side in ("old", "new"):
          root = getattr(args, side)
          out = subprocess.run(
              [sys.executable, "-c", CHILD, root, model, str(cohort), str(args.rounds)],
              capture_output=True, text=True, check=True, cwd=root,
              env={**os.environ, "PYTHONPATH": root})
          r = json.loads(out.stdout.strip().splitlines()[-1])
          assert r["file"].startswith(root), r["file"]
          best[side] = max(best.get(side, 0.0), r["rounds_per_s"])
      row = {"model": model, "cohort": cohort, "old_rounds_per_s": best["old"],
             "new_rounds_per_s": best["new"], "ratio": best["new"] / best["old"],
             "load": os.getloadavg()[0]}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


if __name__ == "__main__":
  main()
