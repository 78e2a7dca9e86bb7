"""Device memory of the compiled round: XLA's figures vs the chunk-size estimate, and vs cohort.

For each model (``logistic`` 784->62, ``dense`` 784-200-200-62, ``cnn`` = ``fs.zoo.EmnistCNN``,
``cifar`` = ``fs.zoo.CifarCNN``), FedAvg with client SGD, batch 20 (cifar 10), it compiles the
round (``fs.memory.round_memory``; nothing is run) and reports:

  * XLA's temp bytes at chunk c and 2c (same cohort), hence XLA's bytes per client in flight,
    ``(temp(2c) - temp(c)) / c``, beside the estimate ``auto_chunk_size`` sizes chunks with
    (``8 x 4 x params + 4 x example_bytes x batch``) and their ratio;
  * temp bytes at cohort K1 and K2 (same chunk): the growth per cohort slot.

  python -m benchmarks.memory                                  # all four models
  python -m benchmarks.memory --models logistic dense --chunk 4 --cohorts 100 10000

Appends JSON lines to benchmarks/results/<machine>/memory.jsonl (with the 1-min load average)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.workloads import Dense, Logistic  # the workloads' own models

#: name -> (module factory, input shape, classes, batch size)
MODELS = {
    "logistic": (Logistic, (28, 28, 1), 62, 20),
    "dense": (Dense, (28, 28, 1), 62, 20),
    "cnn": (lambda: fs.zoo.EmnistCNN(62), (28, 28, 1), 62, 20),
    "cifar": (lambda: fs.zoo.CifarCNN(10), (32, 32, 3), 10, 10),
}


def build(name: str, num_clients: int, cohort: int, chunk: int, per_client: int):
  """A FedAvg simulation of ``name`` on ``num_clients`` random clients, after ``init``."""
  make, shape, classes, batch = MODELS[name]
  rng = np.random.default_rng(0)
  total = num_clients * per_client
  x = rng.random((total, *shape), np.float32)
  y = rng.integers(0, classes, total).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(num_clients), per_client))
  module = make()
  params = module.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module))
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=batch,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=chunk)
  state = sim.init(params, jax.random.key(0))
  return sim, state, params, batch, x[0].nbytes + y[0].nbytes


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--chunk", type=int, default=2, help="c: compiled at chunk c and 2c")
  ap.add_argument("--cohorts", type=int, nargs=2, default=[100, 10_000], metavar=("K1", "K2"))
  ap.add_argument("--num-clients", type=int, default=10_000)
  ap.add_argument("--examples-per-client", type=int, default=2)
  ap.add_argument("--machine", default=f"{jax.devices()[0].platform}-{os.cpu_count()}core")
  args = ap.parse_args(argv)
  k1, k2 = args.cohorts
  c = args.chunk
  if not (1 <= c and 2 * c <= k1 <= k2 <= args.num_clients):
    ap.error("need 1 <= chunk, 2 * chunk <= K1 <= K2 <= --num-clients")
  out_dir = os.path.join(os.path.dirname(__file__), "results", args.machine)
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name in args.models:
    t0 = time.perf_counter()
    temps = {}
    for cohort, chunk in ((k1, c), (k1, 2 * c), (k2, c)):
      sim, state, params, batch, example_bytes = build(
          name, args.num_clients, cohort, chunk, args.examples_per_client)
      temps[cohort, chunk] = fs.memory.round_memory(sim, state)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    estimate = 8 * 4 * num_params + 4 * example_bytes * batch  # as in auto_chunk_size
    per_client = (temps[k1, 2 * c].temp_bytes - temps[k1, c].temp_bytes) / c
    base = temps[k1, c]
    row = {
        "model": name, "params": num_params, "batch": batch, "chunk": c,
        "xla_temp_bytes_chunk_c": base.temp_bytes,
        "xla_temp_bytes_chunk_2c": temps[k1, 2 * c].temp_bytes,
        "xla_bytes_per_client": per_client,
        "estimate_bytes_per_client": estimate,
        "estimate_over_xla": estimate / per_client if per_client > 0 else float("nan"),
        "params_bytes": 4 * num_params,
        "argument_bytes": base.argument_bytes,
        "cohorts": [k1, k2],
        "xla_temp_bytes_cohort_k2": temps[k2, c].temp_bytes,
        "temp_growth_per_cohort_slot": (temps[k2, c].temp_bytes - base.temp_bytes) / (k2 - k1),
        "num_clients": args.num_clients,
        "compile_seconds": time.perf_counter() - t0,
        "load_avg_1min": os.getloadavg()[0],
        "jax": jax.__version__, "platform": jax.devices()[0].platform,
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, "memory.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
  print(f"\n| model | params | XLA bytes/client in flight | estimate | estimate / XLA | "
        f"temp @K={k1} | temp @K={k2} | growth per cohort slot |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['params']:,} | {r['xla_bytes_per_client']:,.0f} | "
          f"{r['estimate_bytes_per_client']:,} | {r['estimate_over_xla']:.2f} | "
          f"{r['xla_temp_bytes_chunk_c']:,} | {r['xla_temp_bytes_cohort_k2']:,} | "
          f"{r['temp_growth_per_cohort_slot']:.1f} B |")


if __name__ == "__main__":
  main()
