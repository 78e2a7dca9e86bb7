"""One client per host device on CPU, and the XLA:CPU flags: the engine end to end, interleaved.

Each measurement is a fresh process (the device count and XLA flags are fixed when jax starts
its CPU backend), configured through ``fs.host_cpu``'s environment switches:

  * ``devices=1``: ``FEDJAX_SIM_HOST_DEVICES=1`` (one CPU device; the engine vmaps chunks);
  * ``devices=N``: ``FEDJAX_SIM_HOST_DEVICES=N`` (N host devices; each scans its share of every
    chunk inside a ``shard_map``, one client per device at chunk N, ``per_device_scan``);
  * ``flags=default`` / ``flags=fast``: ``FEDJAX_SIM_XLA_FLAGS=0`` / ``1``.

Modes run interleaved (A-B-C-D, ``--repeats`` times) on the fixed workloads of
``benchmarks.run`` (``cifar-pfl`` is pfl-research's ``simple_cnn`` on the CIFAR-shaped data; a
smaller population than the fixed one by default, which leaves a round's work unchanged).
Client-updates/s per run, with the 1-min load average, go to
``benchmarks/results/<machine>/host_devices.jsonl``.

Usage (the issue 22 figures in docs/benchmarks.md):
  python -m benchmarks.host_devices --workloads cifar cnn dense --modes 1dev-fast Ndev-fast \
      --repeats 3 --num-clients 200 --target-seconds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"1dev-default": ("1", "0"), "1dev-fast": ("1", "1"), "Ndev-default": ("N", "0"),
         "Ndev-fast": ("N", "1")}
COHORTS = {"cnn": 10, "cifar": 50, "cifar-pfl": 50, "dense": 100, "logistic": 100}


def child(workload: str, cohort: int, num_clients: int, target_seconds: float) -> dict:
  """Runs in the configured process: the engine's client-updates/s on one workload."""
  import jax
  import optax

  import fedjax_sim as fs
  from benchmarks import workloads

  w = workloads.WORKLOADS["cifar" if workload == "cifar-pfl" else workload]
  module = fs.zoo.EmnistCNN(10) if workload == "cifar-pfl" else w.module()
  train_kwargs = {"train": True} if workload == "cifar-pfl" else w.train_kwargs
  x, y, ids = w.data(num_clients)
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  params = module.init(jax.random.key(0), x[:1])["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module, **train_kwargs))
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.sgd(1.0), batch_size=w.batch_size,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=cohort)
  state = sim.init(params, jax.random.key(0))
  state, quick = sim.benchmark(state, 1)
  rounds = max(1, min(200, int(target_seconds / max(quick["seconds"], 1e-4))))
  state, r = sim.benchmark(state, rounds)
  workloads.check_finite(state.params, workload)
  return {"client_updates_per_s": cohort * r["rounds_per_s"], "rounds": rounds,
          "chunk_size": sim.chunk_size,
          "mesh_devices": 1 if sim.mesh is None else fs.sharding.mesh_size(sim.mesh),
          "per_device_scan": bool(getattr(sim.plan, "per_device_scan", False)),
          "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compile_plus_first_s": quick["first_block_seconds"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", nargs="+", default=list(COHORTS), choices=list(COHORTS))
  ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--num-clients", type=int, default=400)
  ap.add_argument("--target-seconds", type=float, default=6.0)
  ap.add_argument("--devices", type=int, default=os.cpu_count())
  ap.add_argument("--out", default=None)
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, COHORTS[args.child], args.num_clients,
                           args.target_seconds)))
    return
  out = args.out or os.path.join(HERE, "results", f"cpu-{os.cpu_count()}core",
                                 "host_devices.jsonl")
  rows = []
  for workload in args.workloads:
    for rep in range(args.repeats):
      for mode in args.modes:
        devices, flags = MODES[mode]
        env = dict(os.environ, FEDJAX_SIM_HOST_DEVICES=devices.replace("N", str(args.devices)),
                   FEDJAX_SIM_XLA_FLAGS=flags,
                   PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                  ""))
        env.pop("XLA_FLAGS", None)
        load0 = os.getloadavg()[0]
        res = subprocess.run([sys.executable, "-m", "benchmarks.host_devices", "--child",
                              workload, "--num-clients", str(args.num_clients),
                              "--target-seconds", str(args.target_seconds)],
                             capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        row = {"workload": workload, "cohort": COHORTS[workload], "mode": mode, "repeat": rep,
               "load_avg_1min_before": load0, "load_avg_1min": os.getloadavg()[0],
               "num_clients": args.num_clients, "time": time.time(),
               "command": "python -m benchmarks.host_devices " + " ".join(
                   sys.argv[1:] if argv is None else argv)}
        if res.returncode or not lines:
          row["error"] = res.stderr[-1500:]
        else:
          row.update(json.loads(lines[-1]))
        rows.append(row)
        with open(out, "a") as f:
          f.write(json.dumps(row) + "\n")
        print(json.dumps({k: str(row.get(k))[-300:] for k in ("workload", "mode", "repeat",
                                                   "client_updates_per_s", "chunk_size",
                                                   "mesh_devices", "load_avg_1min", "error")}),
              flush=True)
  print("\n| workload | cohort | " + " | ".join(args.modes) + " |")
  print("|---|---|" + "---|" * len(args.modes))
  for workload in args.workloads:
    cells = []
    for mode in args.modes:
      v = [r["client_updates_per_s"] for r in rows
           if r["workload"] == workload and r["mode"] == mode and "error" not in r]
      cells.append("/".join(f"{x:.0f}" for x in v) or "failed")
    print(f"| {workload} | {COHORTS[workload]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
