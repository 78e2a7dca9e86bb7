"""The automatic chunk size against the best of a sweep: same work, interleaved, one process.

``benchmarks.run --chunk-sizes ...`` times each chunk size once, in sequence, each from the
state the previous block left (so the configurations draw different cohorts and a load change
hits one of them). This builds one ``fs.Simulation`` per chunk size on the same population,
compiles each, then times ``--rounds`` rounds of each from the same fresh state (the same
cohorts, so the same examples: only the chunk layout differs), ``--repeats`` times in
alternating order, and reports the median seconds of each. The automatic setting
(``chunk_size=None``) is always one of them; where it resolves to a chunk size that the sweep
also runs, the two rows are the same program and their difference is the noise of the sitting.
``--measured`` adds the measured chunk (``chunk_size="auto"``, :mod:`fedjax_sim.autotune`: each
candidate compiled and timed at ``init``, without the disk cache); its row records the
candidates' times and the seconds the tuning took.

  PYTHONPATH=. python -m benchmarks.chunk_check --workloads dense --cohorts 1000 \\
      --chunk-sizes 1 4 16 --rounds 3 --repeats 5 --out rows.jsonl

Issue 22's target: every workload's automatic setting >= 0.95x its best measured chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks.peers.common import host_cpu
from benchmarks.workloads import WORKLOADS


def parse_args(argv=None) -> argparse.Namespace:
  """The command line (cohorts must be ones the workloads define)."""
  ap = argparse.ArgumentParser(prog="python -m benchmarks.chunk_check",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", nargs="+", required=True, choices=list(WORKLOADS))
  ap.add_argument("--cohorts", nargs="+", type=int, default=None,
                  help="default: each workload's own")
  ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[1, 2, 4, 8],
                  help="the sweep (the automatic setting is always added)")
  ap.add_argument("--rounds", type=int, default=2, help="rounds per timed block")
  ap.add_argument("--repeats", type=int, default=3, help="timed blocks per chunk size")
  ap.add_argument("--batch-size", type=int, default=None,
                  help="the local batch size (default: the workload's own)")
  ap.add_argument("--measured", action="store_true",
                  help='also run chunk_size="auto" (timed at init; its choice is timed here)')
  ap.add_argument("--num-clients", type=int, default=None, help="smoke tests only")
  ap.add_argument("--out", default=None, help="append JSON lines here")
  args = ap.parse_args(argv)
  if any(c < 1 for c in args.chunk_sizes):
    ap.error(f"--chunk-sizes must be >= 1 (the automatic setting is always run); got "
             f"{args.chunk_sizes}")
  if args.rounds < 1 or args.repeats < 1:
    ap.error("--rounds and --repeats must be >= 1")
  if args.batch_size is not None and args.batch_size < 1:
    ap.error(f"--batch-size must be >= 1; got {args.batch_size}")
  if args.cohorts is not None and args.num_clients is None:
    for w in args.workloads:
      bad = [c for c in args.cohorts if c not in WORKLOADS[w].cohorts]
      if bad:
        ap.error(f"cohort(s) {bad} not defined for workload {w!r}; valid: {WORKLOADS[w].cohorts}")
  return args


def check(name: str, cohort: int, chunks: list[int], rounds: int, repeats: int,
          num_clients: int | None = None, measured: bool = False,
          batch_size: int | None = None) -> list[dict]:
  """Rows (one per chunk setting) of one workload and cohort; see the module docstring."""
  w = WORKLOADS[name]
  x, y, ids = w.data(num_clients or w.num_clients)
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  del x, y, ids
  module = w.module()
  x1 = np.ones((1, *pop.features["x"].shape[1:]), pop.features["x"].dtype)
  params = module.init(jax.random.key(0), x1)["params"]
  batch_size = batch_size or w.batch_size
  algo = fs.algorithms.fedavg(w.loss_fn(module), client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.sgd(1.0), batch_size=batch_size,
                              local_epochs=1)
  settings = [("automatic", None)] + [(c, c) for c in chunks if c <= cohort]
  if measured:  # fresh timings: no disk cache
    settings.insert(1, ("measured", fs.autotune.AutoChunk(cache_dir="off")))
  sims, compile_s, tuning = {}, {}, {}
  for label, request in settings:
    sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=request)
    if label == "measured":
      t = time.perf_counter()
      sim.init(params, jax.random.key(0))  # the tuning
      tuning = {"tuning_s": time.perf_counter() - t,
                "tuning": sim.plan.performance.tuning.as_dict()}
    t = time.perf_counter()
    state, _ = sim.run(sim.init(params, jax.random.key(0)), rounds, block_size=rounds)
    jax.block_until_ready(state.params)
    compile_s[label] = time.perf_counter() - t
    sims[label] = sim
  seconds = {label: [] for label in sims}
  work = {}
  order = list(sims)
  for rep in range(repeats):  # alternating order: a drift in load hits every setting alike
    for label in (order if rep % 2 == 0 else order[::-1]):
      sim = sims[label]
      state = sim.init(params, jax.random.key(0))  # the same cohorts for every setting
      jax.block_until_ready(state.params)
      t = time.perf_counter()
      state, m = sim.run(state, rounds, block_size=rounds)
      jax.block_until_ready(state.params)
      seconds[label].append(time.perf_counter() - t)
      work[label] = (float(np.sum(m["examples"])), float(np.sum(m["step_slots"])))
  examples = {work[label][0] for label in work}
  if len(examples) != 1:  # the settings must have done the same work to compare times
    raise RuntimeError(f"{name} cohort {cohort}: the settings trained different examples "
                       f"{sorted(examples)}; their times are not comparable")
  med = {label: statistics.median(s) for label, s in seconds.items()}
  best = min(med, key=med.get)
  auto_chunk = sims["automatic"].chunk_size
  load = os.getloadavg()[0]
  rows = []
  for label, sim in sims.items():
    rows.append({
        "bench": "chunk_check", "workload": name, "cohort": cohort, "setting": label,
        "chunk_size": sim.chunk_size, "rounds": rounds, "repeats": repeats,
        "seconds": seconds[label], "median_s": med[label],
        "examples_per_s": work[label][0] / med[label],
        "padding_waste": work[label][1] * batch_size / work[label][0],
        "batch_size": batch_size,
        "compile_plus_first_block_s": compile_s[label],
        "vs_best": med[best] / med[label], "best_setting": best,
        "automatic_chunk": auto_chunk, "load_avg_1min": load, "jax": jax.__version__,
        "cpu": host_cpu(),
        "time": time.time(), **(tuning if label == "measured" else {})})
  return rows


def main(argv=None) -> None:
  args = parse_args(argv)
  print(f"# jax {jax.__version__}, {jax.devices()[0].platform}; load {os.getloadavg()[0]:.2f}")
  print("| workload | cohort | setting | chunk | median s | examples/s | padding | vs best |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.workloads:
    for cohort in args.cohorts or WORKLOADS[name].default_cohorts:
      for r in check(name, cohort, args.chunk_sizes, args.rounds, args.repeats,
                     args.num_clients, args.measured, args.batch_size):
        print(f"| {name} | {cohort} | {r['setting']} | {r['chunk_size']} | {r['median_s']:.3f} "
              f"| {r['examples_per_s']:.0f} | {r['padding_waste']:.3f} | {r['vs_best']:.2f} |",
              flush=True)
        if args.out:
          with open(args.out, "a") as fh:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
