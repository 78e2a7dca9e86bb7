"""The XLA:CPU convolution-gradient-in-a-loop trap, and the options around it, measured.

One client's EMNIST-CNN SGD steps (batch 20, lr 0.1, ``fs.zoo.EmnistCNN`` shapes, dropout off so
every option computes the same function), timed back to back in one process:

  loops:  ``separate``  one jitted step per Python call (FedJAX's execution model);
          ``unrolled``  ``lax.scan(..., unroll=True)``: no loop left (needs a static step count,
                        so the engine cannot use it: client step counts are traced);
          ``while``     ``lax.while_loop`` with a traced trip count (what the engine runs);
          ``while_uU``  the while body runs U steps (partial unrolling, masked tail);
          ``engine``    ``fs.client.make_local_trainer`` vmapped over a chunk of 1 client (the
                        round's exact client path, including batch gathering and shuffling).
  convs:  ``lax``        ``lax.conv_general_dilated`` (autodiff gradients);
          ``im2col``     ``lax.conv_general_dilated_patches`` then a matmul;
          ``canonical``  ``fs.zoo.conv_general_dilated(impl="canonical")``: the forward conv as
                         is, both gradients as canonical NHWC/HWIO convs (the engine's CPU path).

  PYTHONPATH=. python -m benchmarks.conv_loop [--steps 5] [--repeats 5] [--hlo-dir DIR]

Prints examples/s per option (best of ``--repeats``) and, with ``--hlo-dir``, writes the
optimized HLO of the ``while`` loops and a summary of their convolutions' ``dim_labels`` (the
profile evidence: the slow loop's kernel-gradient convs are non-canonical).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fedjax_sim as fs


def im2col_conv(lhs, rhs, window_strides, padding, **kw):
  """A stride-1 NHWC/HWIO convolution as patches x matmul (patch features ordered (I, H, W))."""
  del window_strides, kw
  kh, kw_, i, o = rhs.shape
  patches = lax.conv_general_dilated_patches(lhs, (kh, kw_), (1, 1), padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return patches @ jnp.transpose(rhs, (2, 0, 1, 3)).reshape(i * kh * kw_, o)


class Cnn(nn.Module):
  """``fs.zoo.EmnistCNN`` (dropout off) with a pluggable convolution."""

  conv: str = "lax"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.conv == "im2col":
      conv = functools.partial(nn.Conv, conv_general_dilated=im2col_conv)
    else:
      conv = functools.partial(fs.zoo.Conv, impl=self.conv)
    x = nn.relu(conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(62)(x)


def conv_labels(hlo: str) -> dict[str, int]:
  """Counts the convolutions of an optimized HLO module by (window, dim_labels)."""
  found = re.findall(r"convolution\(.*?window=\{([^}]*)\}, dim_labels=([^ ,\n]+)", hlo)
  return dict(collections.Counter(f"{w} {d}" for w, d in found))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5, help="local steps (5 x 20 = the mean client)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--hlo-dir", default=None)
  ap.add_argument("--out", default=None, help="append JSON lines here")
  args = ap.parse_args()
  steps, bsz = args.steps, 20
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.random((steps, bsz, 28, 28, 1), np.float32))
  ys = jnp.asarray(rng.integers(0, 62, (steps, bsz)), jnp.int32)
  n = jnp.int32(steps)  # traced trip count, as in the engine
  results = {}
  fns = {}
  for conv in ("lax", "im2col", "canonical"):
    module = Cnn(conv)
    params = module.init(jax.random.key(0), xs[0])["params"]

    def step(p, i, module=module):
      def loss(p):
        logits = module.apply({"params": p}, xs[i])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys[i]).mean()
      return jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p))

    jstep = jax.jit(step)

    def separate(p, jstep=jstep):
      for i in range(steps):
        p = jstep(p, i)
      return p

    def unrolled(p, step=step):
      return lax.scan(lambda p, i: (step(p, i), None), p, jnp.arange(steps), unroll=True)[0]

    def while_u(p, n, u, step=step):
      def body(c):
        i, p = c
        for j in range(u):
          q = step(p, jnp.minimum(i + j, steps - 1))
          p = jax.tree.map(lambda a, b, ok=(i + j < n): jnp.where(ok, a, b), q, p)
        return i + u, p
      return lax.while_loop(lambda c: c[0] < n, body, (0, p))[1]

    fns[f"separate/{conv}"] = (separate, (params,))
    fns[f"unrolled/{conv}"] = (jax.jit(unrolled), (params,))
    fns[f"while/{conv}"] = (jax.jit(functools.partial(while_u, u=1)), (params, n))
    if conv == "lax":
      for u in (2, 5):
        fns[f"while_u{u}/{conv}"] = (jax.jit(functools.partial(while_u, u=u)), (params, n))
    if conv != "im2col":
      loss_fn = fs.models.classifier_loss(fs.models.linen_apply(fs.zoo.EmnistCNN(conv_impl=conv)))
      train = fs.client.make_local_trainer(loss_fn, optax.sgd(0.1), batch_size=bsz,
                                           local_epochs=1)
      feats = {"x": xs.reshape(-1, 28, 28, 1), "y": ys.reshape(-1)}
      eparams = fs.zoo.EmnistCNN().init(jax.random.key(0), xs[0])["params"]

      def engine(p, feats, train=train):
        def one(off):
          data = fs.ClientData(feats, off, jnp.int32(steps * bsz), steps * bsz)
          return train(p, data, jax.random.key(1)).params
        return jax.vmap(one)(jnp.zeros((1,), jnp.int32))

      fns[f"engine/{conv}"] = (jax.jit(engine), (eparams, feats))
  for name, (f, a) in fns.items():
    t = time.perf_counter()
    jax.block_until_ready(f(*a))
    results[name] = {"compile_plus_first_s": time.perf_counter() - t, "best_s": float("inf")}
  for _ in range(args.repeats):  # interleaved: every option sees the same machine load
    for name, (f, a) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*a))
      results[name]["best_s"] = min(results[name]["best_s"], time.perf_counter() - t)
  load = os.getloadavg()[0]
  print(f"# one client, {steps} steps x batch {bsz}, EMNIST CNN; jax {jax.__version__} "
        f"{jax.default_backend()}; 1-min load average {load:.2f}")
  print("| loop | conv | examples/s | compile + first call (s) |")
  print("|---|---|---|---|")
  for name, r in results.items():
    loop, conv = name.split("/")
    r["examples_per_s"] = steps * bsz / r["best_s"]
    print(f"| {loop} | {conv} | {r['examples_per_s']:.0f} | {r['compile_plus_first_s']:.2f} |")
    if args.out:
      with open(args.out, "a") as fh:
        fh.write(json.dumps({"bench": "conv_loop", "loop": loop, "conv": conv, **r,
                             "steps": steps, "batch": bsz, "load_avg_1min": load,
                             "jax": jax.__version__, "time": time.time()}) + "\n")
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    for name in ("while/lax", "while/canonical", "unrolled/lax"):
      f, a = fns[name]
      hlo = f.lower(*a).compile().as_text()
      with open(os.path.join(args.hlo_dir, name.replace("/", "_") + ".hlo.txt"), "w") as fh:
        fh.write(hlo)
      print(f"{name}: convolutions {json.dumps(conv_labels(hlo))}")


if __name__ == "__main__":
  main()
