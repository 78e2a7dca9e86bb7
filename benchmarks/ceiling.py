"""The FLOP/s ceiling of each workload's own local step on this machine, next to the GEMM peak.

The engine's achieved FLOP/s is bounded by how fast XLA runs ONE local SGD step of the model at
the workload's batch size (the batch size is fixed by the workload: 20 for EMNIST, 10 for CIFAR
and the population). This measures that step alone, with everything else removed: one
cache-resident batch, ``--steps`` steps in a ``lax.scan`` (no data gathering, no shuffling, no
per-client work, no aggregation), and reports its GFLOP/s against a 2048^2 f32 GEMM measured in
the same process. Where the engine's figure is close to this ceiling, the engine is not what
limits it: the small per-step matrix products are.

  PYTHONPATH=. python -m benchmarks.ceiling [--workloads logistic dense cnn cifar population]

``--conv-variants`` also times the EMNIST CNN's second convolution (3x3x32x64 on 26x26x32,
forward + both gradients, in a ``lax.scan``) written five ways: ``fs.zoo``'s CPU conv
(``canonical``), plain ``lax.conv_general_dilated`` (``lax``), im2col by nine shifted slices and
one dot (``slices``), nine dots summed (``sumdots``) and ``lax.conv_general_dilated_patches`` +
dot (``patches``); its torch counterpart is ``benchmarks/peers/cnn_step_torch.py --layers``.
``--zoo-variants`` times the convolutional workloads' step (``cnn``, ``cifar``, ``cifar-small``)
with ``fs.zoo``'s CPU choices switched off and on, interleaved: the bias gradient as a GEMV
(``fs.zoo.add_channel_bias``) and the im2col forward of shallow convolutions
(``fs.zoo.PATCHES_MAX_DEPTH``).
``--engine`` times the engine's own round (``fs.Simulation``, FedAvg, chunk 1, cohort 10) on
the workload and reports milliseconds per step slot beside the step-only ceiling, interleaved
in one process: the engine's overhead over the bare step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.peers.common import host_cpu
from benchmarks.workloads import WORKLOADS, flops_per_example, gemm_gflops

SHAPES = {"logistic": (28, 28, 1), "dense": (28, 28, 1), "cnn": (28, 28, 1),
          "cifar": (32, 32, 3), "population": (60,)}
CLASSES = {"logistic": 62, "dense": 62, "cnn": 62, "cifar": 10, "population": 10}


def step_ceiling(name: str, steps: int, repeats: int, batch: int | None = None) -> dict:
  """Times ``steps`` SGD steps of workload ``name``'s model on one resident batch, trained as
  the engine trains it (the workload's loss: dropout on where the model has it)."""
  run, params, bsz, fpe = _ceiling_program(name, steps, batch)
  jax.block_until_ready(run(params))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(params))
    best = min(best, time.perf_counter() - t)
  return {"workload": name, "batch": bsz, "steps": steps,
          "examples_per_s": steps * bsz / best, "gflops": fpe * steps * bsz / best / 1e9}


def _ceiling_program(name: str, steps: int, batch: int | None = None):
  """``(run, params, batch size, FLOPs per example)``: ``run(params)`` is the jitted scan of
  ``steps`` SGD steps (compiled once, at its first call)."""
  w = WORKLOADS[name]
  bsz = batch or w.batch_size
  module = w.module()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((bsz, *SHAPES[name]), np.float32))
  y = jnp.asarray(rng.integers(0, CLASSES[name], bsz), jnp.int32)
  params = module.init(jax.random.key(0), x[:1])["params"]
  fpe = flops_per_example(w, module, params, x[:1])
  loss_fn = w.loss_fn(module)  # train=True where the model has dropout, as the engine runs it
  batch = {"x": x, "y": y, fs.types.MASK_KEY: jnp.ones((bsz,), jnp.float32)}
  grad = jax.grad(lambda p, k: loss_fn(p, batch, k)[0])
  opt = optax.sgd(0.1)

  @jax.jit
  def run(p):
    def body(carry, i):
      p, s = carry  # a fresh key each step, as the engine's trainer: models with dropout draw
      # new masks every step (a loop-invariant key would let XLA hoist the masks out)
      u, s = opt.update(grad(p, jax.random.fold_in(jax.random.key(0), i)), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (p, opt.init(p)), jnp.arange(steps))[0][0]

  return run, params, bsz, fpe


def cnn_layers(steps: int, repeats: int, batch: int = 20) -> list[dict]:
  """Per-layer time of the EMNIST CNN's training step (forward + backward), each layer alone.

  A measured breakdown (a profile by ablation): each layer's forward and the gradients the
  training step needs of it (kernel and bias; the input too except for the first layer) run
  ``steps`` times in a ``lax.scan`` on one batch, with the CPU convolution path of the engine.
  """
  rng = np.random.default_rng(0)
  conv = functools.partial(fs.zoo.conv_general_dilated, window_strides=(1, 1), padding="VALID",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def arr(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.1)

  def pool(h, impl="auto"):
    return fs.zoo.max_pool(h, (2, 2), impl=impl)

  b = batch
  layers = {  # name: (f(params, x) -> out, params, x, argnums, forward FLOPs per example)
      "conv1 3x3x1x32": (lambda k, x: jax.nn.relu(conv(x, k)), arr(3, 3, 1, 32),
                         arr(b, 28, 28, 1), (0,), 2 * 26 * 26 * 9 * 32),
      "conv2 3x3x32x64": (lambda k, x: jax.nn.relu(conv(x, k)), arr(3, 3, 32, 64),
                          arr(b, 26, 26, 32), (0, 1), 2 * 24 * 24 * 288 * 64),
      "maxpool 2x2 (engine CPU path)": (lambda k, x: pool(x) * k, jnp.ones(()),
                                        arr(b, 24, 24, 64), (0, 1), 24 * 24 * 64),
      "maxpool 2x2 (lax.reduce_window)": (lambda k, x: pool(x, "lax") * k, jnp.ones(()),
                                          arr(b, 24, 24, 64), (0, 1), 24 * 24 * 64),
      "dense 9216x128": (lambda w, x: jax.nn.relu(x @ w), arr(9216, 128), arr(b, 9216), (0, 1),
                         2 * 9216 * 128),
      "dense 128x62": (lambda w, x: x @ w, arr(128, 62), arr(b, 128), (0, 1), 2 * 128 * 62),
  }
  rows = []
  for name, (f, p, x, argnums, fwd) in layers.items():
    def loss(p, x, f=f):
      return jnp.sum(jnp.sin(f(p, x)))
    g = jax.grad(loss, argnums=argnums)

    @jax.jit
    def run(p, x, g=g):
      def body(c, _):
        p, x = c
        grads = g(p, x)
        p = p - 1e-3 * grads[0]
        if len(grads) > 1:
          x = x - 1e-3 * grads[1]
        return (p, x), None
      return jax.lax.scan(body, (p, x), None, length=steps)[0]

    jax.block_until_ready(run(p, x))
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(run(p, x))
      best = min(best, time.perf_counter() - t)
    flops = 3 * fwd * b if len(argnums) > 1 else 2 * fwd * b
    rows.append({"layer": name, "ms_per_step": 1e3 * best / steps,
                 "gflops": flops * steps / best / 1e9, "bench": "cnn_layers", "batch": b})
  return rows


def _conv2_variants() -> dict:
  """The EMNIST CNN's conv2 (VALID, stride 1, NHWC/HWIO) written five ways (same values)."""
  nhwc = ("NHWC", "HWIO", "NHWC")

  def windows(x, kh, kw):
    h2, w2 = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return [x[:, i:i + h2, j:j + w2, :] for i in range(kh) for j in range(kw)]

  def slices(x, k):
    kh, kw, c, o = k.shape
    p = jnp.concatenate(windows(x, kh, kw), axis=-1)
    return (p.reshape(-1, kh * kw * c) @ k.reshape(-1, o)).reshape(*p.shape[:3], o)

  def sumdots(x, k):
    kh, kw = k.shape[:2]
    taps = [k[i, j] for i in range(kh) for j in range(kw)]
    return sum(jnp.einsum("bhwc,co->bhwo", w, t) for w, t in zip(windows(x, kh, kw), taps))

  def patches(x, k):
    kh, kw, c, o = k.shape  # the patches' feature order is (c, kh, kw)
    p = jax.lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "VALID",
                                             dimension_numbers=nhwc)
    return p @ k.transpose(2, 0, 1, 3).reshape(c * kh * kw, o)

  return {
      "canonical": lambda x, k: fs.zoo.conv_general_dilated(x, k, (1, 1), "VALID",
                                                            dimension_numbers=nhwc),
      "lax": lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                       dimension_numbers=nhwc),
      "slices": slices, "sumdots": sumdots, "patches": patches,
  }


def conv_variants(steps: int, repeats: int, batch: int = 20) -> list[dict]:
  """ms per training step of the EMNIST CNN's conv2 (forward + kernel and input gradients),
  each formulation in a ``lax.scan`` of ``steps``, interleaved ``repeats`` times (best kept)."""
  rng = np.random.default_rng(0)
  k0 = jnp.asarray(rng.standard_normal((3, 3, 32, 64), np.float32) * 0.1)
  x0 = jnp.asarray(rng.standard_normal((batch, 26, 26, 32), np.float32) * 0.1)
  variants = _conv2_variants()
  ref = variants["canonical"](x0, k0)
  runs, diffs = {}, {}
  for name, f in variants.items():
    diffs[name] = float(jnp.max(jnp.abs(f(x0, k0) - ref)))
    g = jax.grad(lambda k, x, f=f: jnp.sum(jnp.sin(jax.nn.relu(f(x, k)))), argnums=(0, 1))

    @jax.jit
    def run(k, x, g=g):
      def body(c, _):
        k, x = c
        gk, gx = g(k, x)
        return (k - 1e-3 * gk, x - 1e-3 * gx), None
      return jax.lax.scan(body, (k, x), None, length=steps)[0]

    jax.block_until_ready(run(k0, x0))
    runs[name] = run
  best = dict.fromkeys(runs, float("inf"))
  for _ in range(repeats):  # interleaved: a load change hits every formulation alike
    for name, run in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(run(k0, x0))
      best[name] = min(best[name], time.perf_counter() - t)
  flops = 3 * 2 * batch * 24 * 24 * 288 * 64
  return [{"conv2": name, "ms_per_step": 1e3 * best[name] / steps,
           "gflops": flops * steps / best[name] / 1e9, "max_abs_diff": diffs[name],
           "bench": "conv_variants", "batch": batch} for name in runs]


def engine_vs_ceiling(name: str, steps: int, repeats: int, cohort: int = 10) -> dict:
  """ms per step slot of the engine's round (FedAvg, 1 epoch, chunk 1) and of the step-only
  ceiling, interleaved ``repeats`` times in this process (best of each)."""
  w = WORKLOADS[name]
  module = w.module()
  x, y, ids = w.data(w.num_clients)
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  params = module.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
  algo = fs.algorithms.fedavg(w.loss_fn(module), client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.sgd(1.0), batch_size=w.batch_size,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=1)
  state = sim.init(params, jax.random.key(0))
  state, _ = sim.run(state, 2, block_size=2)  # compiles the block
  run, p0, _, _ = _ceiling_program(name, steps)
  jax.block_until_ready(run(p0))  # compiled once, here
  engine, ceiling = float("inf"), float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = sim.run(state, 2, block_size=2)
    jax.block_until_ready(state.params)
    engine = min(engine, (time.perf_counter() - t) / float(np.sum(m["step_slots"])))
    t = time.perf_counter()
    jax.block_until_ready(run(p0))
    ceiling = min(ceiling, (time.perf_counter() - t) / steps)
  return {"workload": name, "cohort": cohort, "chunk_size": 1, "bench": "engine_vs_ceiling",
          "engine_ms_per_step_slot": 1e3 * engine, "ceiling_ms_per_step": 1e3 * ceiling,
          "ratio": engine / ceiling}


#: fs.zoo's two CPU-path choices, as ``(GEMV bias gradient, im2col forward of shallow convs)``.
ZOO_VARIANTS = {"neither": (False, False), "bias": (True, False), "im2col": (False, True),
                "both": (True, True)}


@contextlib.contextmanager
def zoo_choices(bias: bool, im2col: bool):
  """Switches fs.zoo's CPU choices off for an A/B inside this block (restored after).

  ``bias=False``: :class:`fs.zoo.Conv` takes ``nn.Conv``'s own call (flax's broadcast bias add);
  ``im2col=False``: every forward convolution is XLA's. A benchmark's patch of the library:
  programs must be traced inside the block (jit traces at the first call).
  """
  call, depth = fs.zoo.canonical_conv_call, fs.zoo.PATCHES_MAX_DEPTH
  try:
    if not bias:
      fs.zoo.canonical_conv_call = lambda conv, inputs: False
    if not im2col:
      fs.zoo.PATCHES_MAX_DEPTH = 0
    yield
  finally:
    fs.zoo.canonical_conv_call, fs.zoo.PATCHES_MAX_DEPTH = call, depth


def zoo_variants(names, steps: int, repeats: int) -> list[dict]:
  """ms per step-only step of each workload with fs.zoo's CPU choices off and on (every
  combination of :data:`ZOO_VARIANTS`), interleaved ``repeats`` times in this process."""
  runs = {}
  for name in names:
    for label, flags in ZOO_VARIANTS.items():
      with zoo_choices(*flags):
        run, params, _, _ = _ceiling_program(name, steps)
        jax.block_until_ready(run(params))  # traced and compiled with the choices
      runs[(name, label)] = (run, params)
  times = {k: [] for k in runs}
  for _ in range(repeats):  # interleaved: a load change hits every variant alike
    for k, (run, params) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(run(params))
      times[k].append(1e3 * (time.perf_counter() - t) / steps)
  rows = []
  for (name, label), ms in times.items():
    base = float(np.median(times[(name, "neither")]))
    rows.append({"bench": "zoo_variants", "workload": name, "variant": label,
                 "bias_gemv": ZOO_VARIANTS[label][0], "im2col": ZOO_VARIANTS[label][1],
                 "ms_per_step_median": float(np.median(ms)), "ms_per_step_min": float(min(ms)),
                 "speedup_vs_neither": base / float(np.median(ms)), "repeats": repeats,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")})
  return rows


#: The workloads whose one-batch step this measures: those with an input shape above (the
#: language models' step is timed by ``benchmarks.lm_step_breakdown``).
CEILING_WORKLOADS = tuple(k for k in WORKLOADS if k in SHAPES)


def parse_args(argv=None) -> argparse.Namespace:
  """The command line; a workload without a known input shape is refused by argparse."""
  ap = argparse.ArgumentParser(prog="python -m benchmarks.ceiling")
  ap.add_argument("--workloads", nargs="+", default=list(CEILING_WORKLOADS),
                  choices=list(CEILING_WORKLOADS))
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batches", nargs="+", type=int, default=[0],
                  help="batch sizes to try (0 = the workload's own)")
  ap.add_argument("--cnn-layers", action="store_true",
                  help="also time each EMNIST-CNN layer's training step alone")
  ap.add_argument("--conv-variants", action="store_true",
                  help="also time the EMNIST CNN's conv2 written five ways")
  ap.add_argument("--zoo-variants", action="store_true",
                  help="also time the convolutional workloads' step with fs.zoo's CPU choices "
                       "(GEMV bias gradient, im2col forward of shallow convs) off and on")
  ap.add_argument("--engine", action="store_true",
                  help="also time the engine's round per step slot beside the ceiling")
  ap.add_argument("--out", default=None, help="append JSON lines here")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  peak = gemm_gflops()
  load = os.getloadavg()[0]
  print(f"# GEMM peak {peak:.0f} GFLOP/s; 1-min load average {load:.2f}; jax {jax.__version__}")
  print("| workload | batch | step-only examples/s | step-only GFLOP/s | % of GEMM peak |")
  print("|---|---|---|---|---|")
  for name in args.workloads:
    for b in args.batches:
      r = step_ceiling(name, args.steps, args.repeats, b or None)
      r.update(gemm_peak_gflops=peak, load_avg_1min=load, bench="step_ceiling", cpu=host_cpu(),
               time=time.time())
      print(f"| {name} | {r['batch']} | {r['examples_per_s']:.0f} | {r['gflops']:.0f} "
            f"| {100 * r['gflops'] / peak:.0f}% |", flush=True)
      if args.out:
        with open(args.out, "a") as fh:
          fh.write(json.dumps(r) + "\n")
  if args.cnn_layers:
    print("\n| EMNIST-CNN layer (batch 20) | ms per step (fwd + bwd) | GFLOP/s | % of GEMM peak |")
    print("|---|---|---|---|")
    for r in cnn_layers(args.steps, args.repeats):
      r.update(gemm_peak_gflops=peak, load_avg_1min=load, cpu=host_cpu(), time=time.time())
      print(f"| {r['layer']} | {r['ms_per_step']:.2f} | {r['gflops']:.0f} "
            f"| {100 * r['gflops'] / peak:.0f}% |", flush=True)
      if args.out:
        with open(args.out, "a") as fh:
          fh.write(json.dumps(r) + "\n")
  extra = []
  if args.conv_variants:
    print("\n| EMNIST-CNN conv2 as (batch 20) | ms per step (fwd + bwd) | GFLOP/s | max abs diff |")
    print("|---|---|---|---|")
    for r in conv_variants(args.steps, args.repeats):
      print(f"| {r['conv2']} | {r['ms_per_step']:.2f} | {r['gflops']:.0f} "
            f"| {r['max_abs_diff']:.1e} |", flush=True)
      extra.append(r)
  if args.zoo_variants:
    print("\n| workload | fs.zoo CPU choices on | ms per step (median) | min | speedup |")
    print("|---|---|---|---|---|")
    conv = [n for n in args.workloads if n in ("cnn", "cifar", "cifar-small")]
    for r in zoo_variants(conv, args.steps, args.repeats):
      print(f"| {r['workload']} | {r['variant']} | {r['ms_per_step_median']:.2f} "
            f"| {r['ms_per_step_min']:.2f} | {r['speedup_vs_neither']:.3f} |", flush=True)
      extra.append(r)
  if args.engine:
    print("\n| workload | engine ms per step slot | ceiling ms per step | ratio |")
    print("|---|---|---|---|")
    for name in args.workloads:
      r = engine_vs_ceiling(name, args.steps, args.repeats)
      print(f"| {name} | {r['engine_ms_per_step_slot']:.2f} | {r['ceiling_ms_per_step']:.2f} "
            f"| {r['ratio']:.2f} |", flush=True)
      extra.append(r)
  for r in extra:
    r.update(gemm_peak_gflops=peak, load_avg_1min=load, jax=jax.__version__, cpu=host_cpu(),
             time=time.time())
    if args.out:
      with open(args.out, "a") as fh:
        fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
