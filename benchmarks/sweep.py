"""Sweep throughput: S simulations in one vmapped program (``fs.sweep``) vs S sequential runs.

Workload ("small runs"): a 100-client population (20 examples each, 20 features, 5 classes), a
linear model, FedAvg with a swept client learning rate and server learning rate, cohort 10,
``--rounds`` rounds, one seed per simulation. Both sides run back to back in this one process:

* sequential: for each of the S settings, ``fs.Simulation(...)``, ``init`` and ``run`` (each
  setting is a different program, since the learning rates are baked into its optax transforms,
  so each compiles);
* sweep: ``fs.sweep`` over the S settings (one program, compiled once).

Reported: end-to-end seconds (what a user waits for: compile + run) and steady-state seconds
(both compiled sides run again, alternated ``--repeats`` times, medians; the sequential side's
``init`` calls untimed).

  python -m benchmarks.sweep --simulations 8 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.sweep import compile_sweep


def workload(num_clients=100, per_client=20, dim=20, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  n = num_clients * per_client
  x = rng.normal(size=(n, dim)).astype(np.float32)
  w = rng.normal(size=(dim, classes))
  y = np.argmax(x @ w + rng.normal(size=(n, classes)), axis=1).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(num_clients), per_client))
  params = {"w": jnp.zeros((dim, classes)), "b": jnp.zeros(classes)}
  return pop, params


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--simulations", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=50)
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  pop, params = workload()
  loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])

  def build(lr, server_lr):
    return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr),
                                server_optimizer=optax.sgd(server_lr), batch_size=10,
                                local_epochs=1)

  s = args.simulations
  hyper = {"lr": np.geomspace(0.01, 0.5, s), "server_lr": np.linspace(0.5, 1.5, s)}
  seeds = list(range(s))

  # Sequential: one Simulation per setting (each compiles its own program).
  t0 = time.perf_counter()
  sims, finals = [], []
  for i in range(s):
    sim = fs.Simulation(build(hyper["lr"][i], hyper["server_lr"][i]), pop,
                        cohort_size=args.cohort)
    state, _ = sim.run(sim.init(params, jax.random.key(seeds[i])), args.rounds)
    jax.block_until_ready(state.params)
    sims.append(sim)
    finals.append(state)
  seq_end_to_end = time.perf_counter() - t0
  # Sweep: one program for all S.
  t0 = time.perf_counter()
  run = compile_sweep(build, pop, params, seeds=seeds, hyperparameters=hyper,
                      num_rounds=args.rounds, cohort_size=args.cohort)
  states, _ = run()
  jax.block_until_ready(states.params)
  sweep_end_to_end = time.perf_counter() - t0

  # Steady state: both compiled sides again, alternated --repeats times; medians reported.
  seq_times, sweep_times = [], []
  for _ in range(args.repeats):
    starts = [sim.init(params, jax.random.key(seeds[i])) for i, sim in enumerate(sims)]
    t0 = time.perf_counter()
    for sim, state in zip(sims, starts):  # compiled programs reused; init (host checks) untimed
      state, _ = sim.run(state, args.rounds)
      jax.block_until_ready(state.params)
    seq_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    states, _ = run()
    jax.block_until_ready(states.params)
    sweep_times.append(time.perf_counter() - t0)
  seq_steady, sweep_steady = float(np.median(seq_times)), float(np.median(sweep_times))

  max_diff = max(
      float(np.max(np.abs(np.asarray(a)[i] - np.asarray(b))))
      for i, st in enumerate(finals)
      for a, b in zip(jax.tree.leaves(states.params), jax.tree.leaves(st.params))
  )
  row = {
      "simulations": s, "rounds": args.rounds, "cohort": args.cohort,
      "sequential_end_to_end_s": seq_end_to_end, "sweep_end_to_end_s": sweep_end_to_end,
      "speedup_end_to_end": seq_end_to_end / sweep_end_to_end,
      "sequential_steady_s": seq_steady, "sweep_steady_s": sweep_steady,
      "sequential_steady_all_s": seq_times, "sweep_steady_all_s": sweep_times,
      "speedup_steady": seq_steady / sweep_steady,
      "max_param_diff_vs_sequential": max_diff,
  }
  print(json.dumps(row))
  print(f"\n| S={s}, {args.rounds} rounds, cohort {args.cohort} | {s} sequential runs | fs.sweep "
        "(one program) | speed-up |")
  print("|---|---|---|---|")
  print(f"| end to end (compile + run) | {seq_end_to_end:.2f} s | {sweep_end_to_end:.2f} s | "
        f"{row['speedup_end_to_end']:.1f}× |")
  print(f"| steady state (compiled) | {seq_steady:.3f} s | {sweep_steady:.3f} s | "
        f"{row['speedup_steady']:.1f}× |")


if __name__ == "__main__":
  main()
