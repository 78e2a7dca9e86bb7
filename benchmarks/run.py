"""Cross-device throughput on the fixed EMNIST-shaped workloads (../shared/bench/WORKLOADS.md).

For each (model, cohort) it runs, in this one process on this one machine:
  * fedjax_sim: the fused round (cohort vmapped in size-sorted chunks, rounds inside lax.scan);
  * sequential: the SAME one-client update jitted once and called client by client from Python,
    summing deltas on device (the FedJAX / Flower execution model), as the in-process baseline;
and reports rounds/s, client-updates/s, examples/s, padding waste (example slots computed / real
examples), compile time, peak RSS, achieved GFLOP/s and its fraction of a dense-GEMM peak
measured in the same run.

Usage:
  python -m benchmarks.run                                   # logistic + dense, cohorts 100 1000
  python -m benchmarks.run --models dense --cohorts 100 --chunk-sizes 4 8 16 32
Results are appended as JSON lines to benchmarks/results/<machine>/results.jsonl and a markdown
table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs


def emnist_shaped(num_clients=3400, seed=0):
  """The fixed synthetic workload: lognormal client sizes, 28x28x1 inputs, 62 classes."""
  rng = np.random.default_rng(seed=seed)
  mu = math.log(100) - 0.6**2 / 2
  sizes = np.clip(np.round(rng.lognormal(mu, 0.6, num_clients)), 5, 2000).astype(np.int64)
  total = int(sizes.sum())
  x = rng.random((total, 28, 28, 1), np.float32)
  y = rng.integers(0, 62, total, np.int32)
  ids = np.repeat(np.arange(num_clients), sizes)
  return x, y, ids


class Logistic(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(62)(x.reshape(x.shape[0], -1))


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(200)(x))
    x = nn.relu(nn.Dense(200)(x))
    return nn.Dense(62)(x)


MODELS = {"logistic": Logistic, "dense": Dense}


def gemm_gflops(n=2048, repeats=5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def sequential_baseline(algo, pop, params, cohort, rounds, seed=0):
  """One jitted client update per client, a Python loop over the cohort (FedJAX's model)."""
  update = jax.jit(
      lambda p, off, n, key: algo.client_update(
          p, fs.ClientData(pop.features, off, n, pop.max_examples), (), key
      )
  )
  add = jax.jit(lambda acc, d, w: jax.tree.map(lambda a, b: a + w * b, acc, d))
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  sizes = np.asarray(pop.num_examples)
  offsets = np.asarray(pop.offsets)

  def one_round(r, params):
    ids = rng.choice(pop.num_clients, cohort, replace=False)
    acc = jax.tree.map(jnp.zeros_like, params)
    total = 0.0
    for cid in ids:
      out = update(params, offsets[cid], sizes[cid], jax.random.fold_in(key, int(cid)))
      acc = add(acc, out.delta, out.weight)
      total += float(sizes[cid])
    params = jax.tree.map(lambda p, a: p - a / total, params, acc)
    jax.block_until_ready(params)
    return params, sizes[ids].sum()

  t = time.perf_counter()
  params, _ = one_round(0, params)  # compile
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  examples = 0
  for r in range(rounds):
    params, n = one_round(r + 1, params)
    examples += n
  seconds = time.perf_counter() - t
  return {"seconds": seconds, "rounds_per_s": rounds / seconds, "examples": float(examples),
          "first_block_seconds": compile_s}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", nargs="+", default=["logistic", "dense"], choices=list(MODELS))
  ap.add_argument("--cohorts", nargs="+", type=int, default=[100, 1000])
  ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[0], help="0 = automatic")
  ap.add_argument("--dp", action="store_true", help="also run DP-FedAvg (clip 1, z 1)")
  ap.add_argument("--no-sequential", action="store_true")
  ap.add_argument("--seq-rounds", type=int, default=0, help="0: 2 rounds, 1 at cohort >= 1000")
  ap.add_argument("--target-seconds", type=float, default=8.0)
  ap.add_argument("--machine", default=None)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  machine = args.machine or f"{jax.devices()[0].platform}-{os.cpu_count()}core"
  out_dir = os.path.join(os.path.dirname(__file__), "results", machine)
  os.makedirs(out_dir, exist_ok=True)
  out = args.out or os.path.join(out_dir, "results.jsonl")

  x, y, ids = emnist_shaped()
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  del x, y
  peak = gemm_gflops()
  print(f"# {machine}: jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"GEMM peak {peak:.0f} GFLOP/s (2048^2 f32, measured now); {pop}", flush=True)
  rows = []
  for model_name in args.models:
    module = MODELS[model_name]()
    params = module.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module))
    for cohort in args.cohorts:
      for dp in [False, True] if args.dp else [False]:
        agg = fs.aggregators.dp_mean(1.0, 1.0) if dp else None
        algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1),
                                    server_optimizer=optax.sgd(1.0), batch_size=20,
                                    local_epochs=1, aggregator=agg)
        seq = None
        for chunk in args.chunk_sizes:
          sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=chunk or None)
          state = sim.init(params, jax.random.key(0))
          # Size the timed block to ~target seconds using one round's time.
          state, quick = sim.benchmark(state, 1)
          rounds = max(1, min(200, int(args.target_seconds / max(quick["seconds"], 1e-4))))
          state, r = sim.benchmark(state, rounds)
          flops = 6 * num_params * r["examples"]
          row = {
              "engine": "fedjax_sim", "model": model_name, "cohort": cohort, "dp": dp,
              "chunk_size": sim.chunk_size, "rounds": rounds,
              "rounds_per_s": r["rounds_per_s"],
              "client_updates_per_s": cohort * r["rounds_per_s"],
              "examples_per_s": r["examples"] / r["seconds"],
              "padding_waste": r["step_slots"] * 20 / r["examples"],
              "compile_plus_first_block_s": quick["first_block_seconds"],
              "gflops": flops / r["seconds"] / 1e9, "gemm_peak_gflops": peak,
              "peak_rss_mb": peak_rss_mb(), "params": num_params,
              "jax": jax.__version__, "machine": machine, "time": time.time(),
          }
          row["fraction_of_peak"] = row["gflops"] / peak
          if not args.no_sequential and seq is None and not dp:
            seq_rounds = args.seq_rounds or (1 if cohort >= 1000 else 2)
            s = sequential_baseline(algo, pop, params, cohort, seq_rounds)
            seq = {"rounds_per_s": s["rounds_per_s"],
                   "client_updates_per_s": cohort * s["rounds_per_s"],
                   "examples_per_s": s["examples"] / s["seconds"]}
          if seq is not None:
            row["sequential_client_updates_per_s"] = seq["client_updates_per_s"]
            row["speedup_vs_sequential"] = row["client_updates_per_s"] / seq["client_updates_per_s"]
          rows.append(row)
          with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
          print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in row.items()}), flush=True)
  print()
  print("| model | cohort | DP | chunk | rounds/s | client-updates/s | examples/s | padding waste "
        "| GFLOP/s (% of GEMM peak) | sequential client-updates/s | speed-up |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    seq = r.get("sequential_client_updates_per_s")
    print(f"| {r['model']} | {r['cohort']} | {'yes' if r['dp'] else 'no'} | {r['chunk_size']} "
          f"| {r['rounds_per_s']:.3g} | {r['client_updates_per_s']:.0f} "
          f"| {r['examples_per_s']:.0f} | {r['padding_waste']:.2f} "
          f"| {r['gflops']:.0f} ({100 * r['fraction_of_peak']:.0f}%) "
          f"| {'' if seq is None else format(seq, '.0f')} "
          f"| {'' if seq is None else format(r['speedup_vs_sequential'], '.1f') + 'x'} |")
  print(f"\nplatform: {platform.platform()}, python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}")


if __name__ == "__main__":
  main()
