"""Throughput vs number of (forced) CPU devices on the ``clients`` mesh axis, and host-resident
or device-sharded vs device-resident population.

Each device count runs in a fresh process (``XLA_FLAGS=--xla_force_host_platform_device_count``
must be set before jax is imported). Workload: the EMNIST-shaped logistic model of
``benchmarks.run`` (48,670 parameters) on a 1,000-client population, cohort 64, automatic chunk
size, timed with ``Simulation.benchmark`` (a block of rounds after a compile run). Forced CPU
devices share the machine's cores, so on a 2-core CPU more than 2 devices cannot add compute:
the table shows the partitioning overhead there, not a speed-up an accelerator host would see.

  python -m benchmarks.scaling --devices 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(mode: str, rounds: int, cohort: int, num_clients: int) -> dict:
  import jax
  import jax.numpy as jnp

  import fedjax_sim as fs
  from benchmarks.workloads import Logistic, emnist_shaped

  x, y, ids = emnist_shaped(num_clients)
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  model = Logistic()
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model))
  import optax

  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=16,
                              local_epochs=1)
  mesh = None if mode == "no-mesh" else fs.sharding.clients_mesh()
  population_on = {"host": "host", "sharded": "sharded"}.get(mode, "device")
  sim = fs.Simulation(algo, pop, cohort_size=cohort, mesh=mesh, population_on=population_on)
  state = sim.init(params, jax.random.key(0))
  hlo = ""
  if population_on != "host":
    args = (state, sim.population, jnp.int32(rounds), jnp.bool_(False))
    hlo = fs.programs.block_program(sim.plan, rounds).lower(*args).compile().as_text()
  state, r = sim.benchmark(state, rounds)
  return {
      "mode": mode, "devices": len(jax.devices()), "cohort": cohort, "chunk": sim.chunk_size,
      "rounds": rounds, "seconds": r["seconds"], "first_block_seconds": r["first_block_seconds"],
      "client_updates_per_s": r["clients"] / r["seconds"],
      "examples_per_s": r["examples"] / r["seconds"],
      "all_reduce_ops": hlo.count("all-reduce("),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--cohort", type=int, default=64)
  ap.add_argument("--num-clients", type=int, default=1000)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(worker(args.worker, args.rounds, args.cohort, args.num_clients)))
    return
  runs = [(1, "no-mesh"), (1, "host")] + [(d, "mesh") for d in args.devices]
  runs.append((max(args.devices), "sharded"))
  rows = []
  for d, mode in runs:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--worker", mode, "--rounds",
         str(args.rounds), "--cohort", str(args.cohort), "--num-clients", str(args.num_clients)],
        env=env, capture_output=True, text=True, check=True, cwd=os.path.dirname(HERE),
    ).stdout
    row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f"\n| devices | placement | chunk | all-reduces in program | client-updates/s "
        f"(cohort {args.cohort}) | examples/s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    where = {"no-mesh": "no mesh", "host": "no mesh, population on host",
             "mesh": "clients mesh", "sharded": "clients mesh, examples sharded"}[r["mode"]]
    print(f"| {r['devices']} | {where} | {r['chunk']} | {r['all_reduce_ops']} | "
          f"{r['client_updates_per_s']:.0f} | {r['examples_per_s']:.0f} |")


if __name__ == "__main__":
  main()
