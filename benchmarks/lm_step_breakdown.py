"""Per-local-step time of the stackoverflow-transformer workload, piece by piece (CPU).

Variants, each one jitted SGD step (or the engine's local trainer over K identical steps,
divided by K), timed interleaved in one process (A/B/C... per repetition, medians):

  bare          value_and_grad of plain mean CE, no dropout (beside torch's step:
                benchmarks/peers/lm_step_torch.py in pfl's venv)
  drop_threefry + dropout (train=True) with a threefry key (JAX's default); the model's
                dropout layers are fs.zoo.Dropout (8/16 random bits per element; the
                attention weights' dropout is flax's, inside nn.MultiHeadDotProductAttention)
  drop_flax     the same with flax.linen.Dropout layers (a float32 uniform per element), as
                the zoo had before stop 33
  drop_rbg      + dropout with an rbg key (jax.random.key(0, impl="rbg"))
  seq_threefry  fs.models.sequence_loss (masking + argmax accuracy) with dropout, threefry
  seq_rbg       the same with an rbg key
  engine_threefry  fs client trainer (make_local_trainer, local_epochs=1, batch 16: epoch
                   permutation, data.batch gather, metric sums, while_loop), per step
  engine_rbg    the same trainer given an rbg client key
  engine_flax   engine_threefry with flax.linen.Dropout layers

  python -m benchmarks.lm_step_breakdown [--reps 7] [--steps 12] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.peers.common import host_cpu
from fedjax_sim.client import ClientData, make_local_trainer


@contextlib.contextmanager
def flax_dropout():
  """The zoo's models built and traced with ``flax.linen.Dropout`` in place of
  ``fs.zoo.Dropout`` (they look the name up when called)."""
  import flax.linen as nn

  from fedjax_sim import zoo
  ours = zoo.Dropout
  zoo.Dropout = nn.Dropout
  try:
    yield
  finally:
    zoo.Dropout = ours


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  bsz, seq, vocab, k = 16, 20, 10004, args.steps
  module = fs.zoo.StackOverflowTransformer()
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (bsz * k, seq + 1)).astype(np.int32)
  feats = {"x": jnp.asarray(tokens[:, :-1]), "y": jnp.asarray(tokens[:, 1:])}
  params = module.init(jax.random.key(0), feats["x"][:bsz])["params"]
  batch = {"x": feats["x"][:bsz], "y": feats["y"][:bsz], fs.MASK_KEY: jnp.ones(bsz)}
  opt = optax.sgd(0.1)

  def sgd_step(loss):
    @jax.jit
    def step(p, b, key):
      (val, _), g = jax.value_and_grad(loss, has_aux=True)(p, b, key)
      return jax.tree.map(lambda a, d: a - 0.1 * d, p, g), val
    return step

  def plain_ce(train):
    def loss(p, b, key):
      kw = {"rngs": {"dropout": key}} if train else {}
      logits = module.apply({"params": p}, b["x"], train=train, **kw)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), {}
    return loss

  seq_loss = fs.models.sequence_loss(fs.models.linen_apply(module, train=True))
  tf_key, rbg_key = jax.random.key(1), jax.random.key(1, impl="rbg")
  steps = {"bare": sgd_step(plain_ce(False)), "drop": sgd_step(plain_ce(True)),
           "seq": sgd_step(seq_loss)}
  trainer = jax.jit(make_local_trainer(seq_loss, opt, batch_size=bsz, local_epochs=1))
  data = ClientData(feats, jnp.int32(0), jnp.int32(bsz * k), bsz * k)

  variants = {
      "bare": (lambda: steps["bare"](params, batch, tf_key)[1], 1),
      "drop_threefry": (lambda: steps["drop"](params, batch, tf_key)[1], 1),
      "drop_rbg": (lambda: steps["drop"](params, batch, rbg_key)[1], 1),
      "seq_threefry": (lambda: steps["seq"](params, batch, tf_key)[1], 1),
      "seq_rbg": (lambda: steps["seq"](params, batch, rbg_key)[1], 1),
      "engine_threefry": (lambda: trainer(params, data, tf_key).metrics["loss"], k),
      "engine_rbg": (lambda: trainer(params, data, rbg_key).metrics["loss"], k),
  }
  flax_drop = sgd_step(plain_ce(True))
  flax_trainer = jax.jit(make_local_trainer(seq_loss, opt, batch_size=bsz, local_epochs=1))
  variants["drop_flax"] = (lambda: flax_drop(params, batch, tf_key)[1], 1)
  variants["engine_flax"] = (lambda: flax_trainer(params, data, tf_key).metrics["loss"], k)
  for name, (f, _) in variants.items():  # compile (the flax variants trace with its Dropout)
    with flax_dropout() if name.endswith("_flax") else contextlib.nullcontext():
      jax.block_until_ready(f())
    jax.block_until_ready(f())
  times = {name: [] for name in variants}
  load0 = os.getloadavg()[0]
  for _ in range(args.reps):
    for name, (f, n) in variants.items():
      inner = 1 if n > 1 else 5
      t = time.perf_counter()
      for _ in range(inner):
        jax.block_until_ready(f())
      times[name].append(1e3 * (time.perf_counter() - t) / (inner * n))
  load1 = os.getloadavg()[0]
  base = float(np.median(times["bare"]))
  rows = []
  stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
  for name, ts in times.items():
    med = float(np.median(ts))
    row = {"bench": "lm_step_breakdown", "variant": name, "ms_per_step": round(med, 2),
           "min_ms": round(float(np.min(ts)), 2), "vs_bare": round(med / base, 3),
           "reps": args.reps, "engine_steps": k, "load_before": round(load0, 2),
           "load_after": round(load1, 2), "jax": jax.__version__, "cpu": host_cpu(),
           "time": stamp}
    rows.append(row)
    print(f"{name:16s} {med:8.2f} ms/step  (min {np.min(ts):.2f})  x{med / base:.2f}")
  print(f"load {load0:.2f} -> {load1:.2f}")
  if args.out:
    with open(args.out, "a") as fh:
      for row in rows:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
