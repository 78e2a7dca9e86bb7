"""Overhead of BandMF correlated noise over DP-FedAvg's independent noise, dense workload, cohort
1000: interleaved A/B(/C) blocks in one process, the same sampler and model for every arm.

  python -m benchmarks.mf_overhead --cohort 1000 --bands 4 16 --repeats 3

Prints one JSON row per arm (seconds per round, medians of interleaved blocks) and the memory the
mechanism keeps in the server state: (b - 1) x params float32.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs
from benchmarks.workloads import MODELS, emnist_shaped, interleaved_aggregator_seconds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="dense", choices=list(MODELS))
  ap.add_argument("--cohort", type=int, default=1000)
  ap.add_argument("--bands", type=int, nargs="+", default=[4, 16])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--stage-only", action="store_true",
                  help="time only the noise stages (jitted, on the model's parameter shapes), "
                       "interleaved: the mechanism's own cost without the round around it")
  args = ap.parse_args()
  if args.stage_only:
    return stage_only(args)
  x, y, ids = emnist_shaped()
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  module = MODELS[args.model]()
  params = module.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module))
  arms = [("dp_fedavg", fs.aggregators.dp_mean(1.0, 1.0), 1)] + [
      (f"band_mf_{b}", fs.aggregators.band_mf_mean(1.0, 1.0, bands=b), b) for b in args.bands]
  times = interleaved_aggregator_seconds(
      {name: agg for name, agg, _ in arms}, loss_fn, pop, params, cohort=args.cohort,
      rounds=args.rounds, repeats=args.repeats)
  base = float(np.median(times["dp_fedavg"]))
  load = os.getloadavg()[0]
  for name, _, b in arms:
    t = float(np.median(times[name]))
    print(json.dumps({
        "benchmark": "mf_overhead", "model": args.model, "cohort": args.cohort, "arm": name,
        "bands": b, "s_per_round": round(t, 4), "overhead_vs_dp_fedavg": round(t / base - 1, 4),
        "mechanism_state_floats": (b - 1) * num_params,
        "mechanism_state_mib": round((b - 1) * num_params * 4 / 2**20, 2),
        "num_params": num_params, "per_block": [round(v, 4) for v in times[name]],
        "rounds_per_block": args.rounds, "repeats": args.repeats, "load_1min": round(load, 2),
    }), flush=True)


def stage_only(args):
  import time

  module = MODELS[args.model]()
  params = module.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  update = fs.WeightedUpdate(jax.tree.map(jnp.zeros_like, params), jnp.float32(1))
  stages = [("gaussian_noise", fs.aggregators.gaussian_noise(1.0, 1.0))] + [
      (f"banded_noise_{b}", fs.aggregators.banded_noise(fs.aggregators.band_mf_strategy(b),
                                                         1.0, 1.0)) for b in args.bands] + [
      ("tree_noise_1024", fs.aggregators.tree_noise(1.0, 1.0, 1024))]
  runs = {}
  for name, stage in stages:
    def many(state, key, stage=stage):
      def body(carry, i):
        u, st = carry
        out, st, _ = stage.aggregate(u, st, jax.random.fold_in(key, i), None)
        return (out, st), None
      (out, st), _ = jax.lax.scan(body, (update, state), jnp.arange(50))
      return out.delta, st
    fn = jax.jit(many)
    state = stage.init(params)
    jax.block_until_ready(fn(state, jax.random.key(0)))
    runs[name] = (fn, state)
  times = {name: [] for name in runs}
  for r in range(args.repeats):
    for name, (fn, state) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(state, jax.random.key(r)))
      times[name].append((time.perf_counter() - t) / 50)
  load = os.getloadavg()[0]
  for name, _ in stages:
    print(json.dumps({
        "benchmark": "mf_overhead_stage", "model": args.model, "stage": name,
        "ms_per_round": round(1e3 * float(np.median(times[name])), 3), "num_params": num_params,
        "per_repeat_ms": [round(1e3 * v, 3) for v in times[name]], "repeats": args.repeats,
        "load_1min": round(load, 2)}), flush=True)


if __name__ == "__main__":
  main()
