"""The FLOP/s ceiling of each workload's own local step on this machine, next to the GEMM peak.

The engine's achieved FLOP/s is bounded by how fast XLA runs ONE local SGD step of the model at
the workload's batch size (the batch size is fixed by the workload: 20 for EMNIST, 10 for CIFAR
and the population). This measures that step alone, with everything else removed: one
cache-resident batch, ``--steps`` steps in a ``lax.scan`` (no data gathering, no shuffling, no
per-client work, no aggregation), and reports its GFLOP/s against a 2048^2 f32 GEMM measured in
the same process. Where the engine's figure is close to this ceiling, the engine is not what
limits it: the small per-step matrix products are.

  PYTHONPATH=. python -m benchmarks.ceiling [--workloads logistic dense cnn cifar population]
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
from benchmarks.run import WORKLOADS, flops_per_example, gemm_gflops

SHAPES = {"logistic": (28, 28, 1), "dense": (28, 28, 1), "cnn": (28, 28, 1),
          "cifar": (32, 32, 3), "population": (60,)}
CLASSES = {"logistic": 62, "dense": 62, "cnn": 62, "cifar": 10, "population": 10}


def step_ceiling(name: str, steps: int, repeats: int, batch: int | None = None) -> dict:
  """Times ``steps`` SGD steps of workload ``name``'s model on one resident batch."""
  w = WORKLOADS[name]
  bsz = batch or w.batch_size
  module = w.module()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((bsz, *SHAPES[name]), np.float32))
  y = jnp.asarray(rng.integers(0, CLASSES[name], bsz), jnp.int32)
  params = module.init(jax.random.key(0), x[:1])["params"]
  fpe = flops_per_example(w, module, params, x[:1])
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(module))
  batch = {"x": x, "y": y, fs.types.MASK_KEY: jnp.ones((bsz,), jnp.float32)}
  grad = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0])
  opt = optax.sgd(0.1)

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      u, s = opt.update(grad(p), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0][0]

  jax.block_until_ready(run(params))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(params))
    best = min(best, time.perf_counter() - t)
  return {"workload": name, "batch": bsz, "steps": steps,
          "examples_per_s": steps * bsz / best, "gflops": fpe * steps * bsz / best / 1e9}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batches", nargs="+", type=int, default=[0],
                  help="batch sizes to try (0 = the workload's own)")
  ap.add_argument("--out", default=None, help="append JSON lines here")
  args = ap.parse_args()
  peak = gemm_gflops()
  load = os.getloadavg()[0]
  print(f"# GEMM peak {peak:.0f} GFLOP/s; 1-min load average {load:.2f}; jax {jax.__version__}")
  print("| workload | batch | step-only examples/s | step-only GFLOP/s | % of GEMM peak |")
  print("|---|---|---|---|---|")
  for name in args.workloads:
    for b in args.batches:
      r = step_ceiling(name, args.steps, args.repeats, b or None)
      r.update(gemm_peak_gflops=peak, load_avg_1min=load, bench="step_ceiling", time=time.time())
      print(f"| {name} | {r['batch']} | {r['examples_per_s']:.0f} | {r['gflops']:.0f} "
            f"| {100 * r['gflops'] / peak:.0f}% |", flush=True)
      if args.out:
        with open(args.out, "a") as fh:
          fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
