"""Per-client convolutions under ``vmap`` on this backend: which kernel wins, measured.

Each client holds its own weights (``fs.zoo.EmnistCNN`` shapes: conv32-conv64 valid 3x3, 2x2 max
pool, dense128, dense(classes); dropout off so every option computes the same function) and takes
one SGD step on its own batch. ``C`` clients, one jitted function, timed back to back in one
process (best of ``--repeats``):

  ``scan_canonical``  ``lax.scan`` over clients (chunk 1), ``fs.zoo`` canonical conv (the engine's
                      CPU path today);
  ``scan_lax``        ``lax.scan`` over clients, plain ``lax.conv_general_dilated``;
  ``vmap_lax``        ``vmap`` over clients, plain conv: JAX's batching rule makes the forward a
                      ``feature_group_count=C`` grouped conv and the kernel gradient a
                      ``batch_group_count`` conv;
  ``vmap_canonical``  ``vmap`` of ``fs.zoo``'s canonical conv (custom VJP; grouped under vmap before
                      88f2d5f, since then with ``fs.zoo.map_on_vmap``'s loop rule);
  ``vmap_patches``    ``vmap`` of conv-as-patches (``lax.conv_general_dilated_patches``) + dot:
                      under vmap a batched dot per layer, gradients by autodiff;
  ``vmap_loopconv``   ``vmap`` of a conv whose ``jax.custom_batching.custom_vmap`` rule runs the
                      canonical conv (and its two gradient convs) in a ``lax.map`` over clients;
                      the rest of the model (dense layers, pooling) stays batched. Since
                      88f2d5f this is ``fs.zoo``'s own canonical conv (the same computation as
                      ``vmap_canonical``; kept so older rows stay comparable).

Rows (one per workload x option) go to ``--out`` as JSON lines with the load average.

  PYTHONPATH=. python -m benchmarks.client_kernels [--clients 10] [--repeats 3] \
      [--out benchmarks/results/cpu-2core/client_kernels.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fedjax_sim as fs

_DN = ("NHWC", "HWIO", "NHWC")

WORKLOADS = {  # name: (input HWC, batch size, classes) as in benchmarks/run.py
    "cnn": ((28, 28, 1), 20, 62),
    "cifar": ((32, 32, 3), 10, 10),
}


def patches_conv(lhs, rhs, window_strides, padding, **kw):
  """A stride-1 NHWC/HWIO convolution as patches x matmul (patch features ordered (I, H, W))."""
  del window_strides, kw
  kh, kw_, i, o = rhs.shape
  patches = lax.conv_general_dilated_patches(lhs, (kh, kw_), (1, 1), padding,
                                             dimension_numbers=_DN)
  return patches @ jnp.transpose(rhs, (2, 0, 1, 3)).reshape(i * kh * kw_, o)


class Cnn(nn.Module):
  conv: str
  classes: int

  @nn.compact
  def __call__(self, x):
    if self.conv == "patches":
      conv = functools.partial(nn.Conv, conv_general_dilated=patches_conv)
    elif self.conv == "loopconv":  # since 88f2d5f the zoo's canonical conv carries this rule
      conv = functools.partial(fs.zoo.Conv, impl="canonical")
    else:
      conv = functools.partial(fs.zoo.Conv, impl=self.conv)
    x = nn.relu(conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(conv(64, (3, 3), padding="VALID")(x))
    x = fs.zoo.max_pool(x, (2, 2), strides=(2, 2),
                        impl="canonical" if self.conv != "lax" else "lax")
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes)(x)


OPTIONS = {  # name: (conv, batching)
    "scan_canonical": ("canonical", "scan"),
    "scan_lax": ("lax", "scan"),
    "vmap_lax": ("lax", "vmap"),
    "vmap_canonical": ("canonical", "vmap"),
    "vmap_patches": ("patches", "vmap"),
    "vmap_loopconv": ("loopconv", "vmap"),
}


def build(name, conv, batching, clients, workload):
  hwc, bsz, classes = WORKLOADS[workload]
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.random((clients, bsz, *hwc), np.float32))
  ys = jnp.asarray(rng.integers(0, classes, (clients, bsz)), jnp.int32)
  module = Cnn(conv, classes)
  p0 = module.init(jax.random.key(0), xs[0])["params"]
  params = jax.tree.map(lambda a: jnp.broadcast_to(a, (clients, *a.shape)) + 0.0, p0)

  def step(p, x, y):
    def loss(p):
      logits = module.apply({"params": p}, x)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p))

  if batching == "vmap":
    fn = jax.jit(jax.vmap(step))
  else:
    fn = jax.jit(lambda p, x, y: lax.scan(lambda c, a: (c, step(*a)), 0, (p, x, y))[1])
  return fn, (params, xs, ys)


def flops_per_client(workload):
  (h, w, c), bsz, classes = WORKLOADS[workload]
  h1, w1 = h - 2, w - 2
  h2, w2 = h1 - 2, w1 - 2
  fwd = 2 * (h1 * w1 * 9 * c * 32 + h2 * w2 * 9 * 32 * 64 + (h2 // 2) * (w2 // 2) * 64 * 128
             + 128 * classes)
  return 3 * fwd * bsz


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
  ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
  ap.add_argument("--clients", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--iters", type=int, default=3, help="calls per timing")
  ap.add_argument("--out", default=None, help="append JSON lines here")
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  for wl in args.workloads:
    fns, ref = {}, None
    for name in args.options:
      conv, batching = OPTIONS[name]
      fn, inputs = build(name, conv, batching, args.clients, wl)
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*inputs))
      compile_s = time.perf_counter() - t0
      if ref is None:
        ref = out
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree.leaves(out), jax.tree.leaves(ref), strict=True))
      fns[name] = (fn, inputs, compile_s, diff)
    best = {}
    for _ in range(args.repeats):  # interleaved
      for name, (fn, inputs, _, _) in fns.items():
        t0 = time.perf_counter()
        for _ in range(args.iters):
          out = fn(*inputs)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / args.iters
        best[name] = min(best.get(name, np.inf), dt)
    base = best.get("scan_canonical")
    for name, dt in best.items():
      row = {"bench": "client_kernels", "workload": wl, "option": name, "backend": backend,
             "clients": args.clients, "client_steps_per_s": args.clients / dt,
             "gflops": args.clients * flops_per_client(wl) / dt / 1e9,
             "vs_scan_canonical": (base / dt) if base else None,
             "compile_s": fns[name][2], "max_param_diff_vs_first": fns[name][3],
             "load_avg_1min": os.getloadavg()[0], "jax": jax.__version__,
             "zoo_conv_vmap_rule": hasattr(fs.zoo, "map_on_vmap"),
             "time": time.time()}
      print(json.dumps(row), flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
