"""Asynchronous FedBuff at scale: 10^4 clients in flight vs the synchronous engine, same model.

Workload: the EMNIST-shaped logistic model of ``benchmarks.run`` (28x28x1 -> Dense(62), 48,670
parameters) on a population of ``--clients`` clients holding ``--examples`` examples each
(``x ~ U[0, 1)``, ``y ~ U{0..61}``, ``np.random.default_rng(0)``), FedAvg with 1 local epoch of
batch ``--batch`` (client SGD 0.1, server SGD 1.0). Synchronous: ``fs.Simulation`` with cohort
``--buffer``; asynchronous: ``fs.AsyncSimulation`` with ``concurrency=--concurrency``,
``buffer_size=--buffer``, lognormal device speeds (σ=1), polynomial staleness (a=0.5), default
``max_staleness`` (4 ceil(C/K)). Both use chunk ``--chunk``. Timed: blocks of ``--steps`` rounds /
server steps after a compile run, interleaved sync/async ``--repeats`` times; the async figure
includes the host's clock (the schedule is computed inside ``run``). Client-updates/s counts the
clients whose updates were applied.

  python -m benchmarks.async_scale   # appends to benchmarks/results/cpu-2core/async_scale.jsonl

``--ring-ab``: the cost of per-client start versions alone. C = K = 1000 with equal durations
(every update has staleness 0, the same work either way), ``max_staleness=0`` (one broadcast
model, as the synchronous round) vs ``max_staleness=1`` (a ring of 2: every client of a chunk
trains from its own gathered copy), interleaved 3 times, printed (not written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--clients", type=int, default=10_500)
  ap.add_argument("--examples", type=int, default=8)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--concurrency", type=int, default=10_000)
  ap.add_argument("--buffer", type=int, nargs="+", default=[1000, 100])
  ap.add_argument("--chunk", type=int, default=100)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--ring-ab", action="store_true")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu-2core",
                                                "async_scale.jsonl"))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import fedjax_sim as fs
  from benchmarks.run import Logistic

  rng = np.random.default_rng(0)
  n = args.clients * args.examples
  x = rng.random((n, 28, 28, 1), np.float32)
  y = rng.integers(0, 62, n).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(args.clients),
                                                              args.examples))
  model = Logistic()
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(model)),
                              client_optimizer=optax.sgd(0.1), batch_size=args.batch,
                              local_epochs=1)
  speeds = rng.lognormal(0.0, 1.0, args.clients)
  if args.ring_ab:
    sims = {ms: fs.AsyncSimulation(algo, pop, concurrency=1000, buffer_size=1000,
                                   chunk_size=args.chunk, max_staleness=ms,
                                   block_size=args.steps) for ms in (0, 1)}
    states = {ms: s.run(s.init(params, jax.random.key(1)), args.steps)[0]
              for ms, s in sims.items()}
    res = {0: [], 1: []}
    for _ in range(args.repeats):
      for ms, s in sims.items():
        t0 = time.perf_counter()
        states[ms], m = s.run(states[ms], args.steps)
        jax.block_until_ready(states[ms].server.params)
        res[ms].append(float(np.sum(m["clients"])) / (time.perf_counter() - t0))
    print(json.dumps({"benchmark": "async_ring_ab", "broadcast_client_updates_per_s": res[0],
                      "per_client_versions_client_updates_per_s": res[1],
                      "load_avg_1m": os.getloadavg()[0]}))
    return
  rows = []
  for k in args.buffer:
    sync = fs.Simulation(algo, pop, cohort_size=k, chunk_size=args.chunk)
    s_state = sync.init(params, jax.random.key(1))
    asim = fs.AsyncSimulation(
        algo, pop, concurrency=args.concurrency, buffer_size=k, chunk_size=args.chunk,
        timing=fs.asynchronous.Timing(steps_per_second=speeds, local_steps=2),
        staleness=fs.asynchronous.polynomial(0.5), block_size=args.steps)
    t0 = time.perf_counter()
    a_state = asim.init(params, jax.random.key(1))
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    a_state, _ = asim.run(a_state, args.steps)  # compile + first block
    first_s = time.perf_counter() - t0
    mem = asim.memory(a_state)
    for rep in range(args.repeats):
      s_state, fig = sync.benchmark(s_state, args.steps)
      sync_cu = fig["clients"] / fig["seconds"]
      t0 = time.perf_counter()
      a_state, m = asim.run(a_state, args.steps)
      jax.block_until_ready(a_state.server.params)
      secs = time.perf_counter() - t0
      async_cu = float(np.sum(m["clients"])) / secs
      row = {
          "benchmark": "async_scale", "model": "logistic", "params": 48670,
          "clients": args.clients, "examples_per_client": args.examples,
          "concurrency": args.concurrency, "buffer": k, "chunk": args.chunk,
          "steps": args.steps, "repeat": rep,
          "sync_client_updates_per_s": sync_cu, "async_client_updates_per_s": async_cu,
          "async_over_sync": async_cu / sync_cu,
          "async_in_flight_mean": float(np.mean(m["in_flight"])),
          "async_staleness_mean": float(np.mean(m["staleness_mean"])),
          "async_dropped_stale": float(np.sum(m["dropped_stale"])),
          "async_init_s": init_s, "async_compile_plus_first_block_s": first_s,
          "max_staleness": asim.max_staleness, **{f"async_{k_}": v for k_, v in mem.items()},
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "load_avg_1m": os.getloadavg()[0], "jax": jax.__version__, "machine": "cpu-2core",
          "time": time.time(),
      }
      print(json.dumps(row), flush=True)
      rows.append(row)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "a") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
