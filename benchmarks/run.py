"""Cross-device throughput on the fixed workloads of ../shared/bench/WORKLOADS.md.

Workloads: ``logistic``, ``dense``, ``cnn`` (EMNIST-shaped synthetic data, 3400 clients with
lognormal sizes, batch 20, cohorts 10/100/1000; ``dense`` also 10^4 with ``--num-clients``
>= 10^4); ``cifar`` (pfl-research's CIFAR-10 setup: 1000 users x 50 images 32x32x3, cohort 50,
batch 10, pfl's own benchmark model ``simple_cnn``: conv32-conv64 valid, max-pool, dropout 0.25,
dense128, dropout 0.5, dense10, 1,626,442 parameters); ``cifar-small`` (the same data with the
smaller ``fs.zoo.CifarCNN``, 545,098 parameters); ``population`` (10^6 clients x 10 examples of
60 features, logistic regression, DP-FedAvg clip 1 z 1, cohort 10^4).
All: FedAvg, 1 local epoch, client SGD 0.1, server SGD 1.0.

For each (workload, cohort) it runs, in this one process on this one machine:
  * fedjax_sim: the fused round (cohort vmapped in size-sorted chunks, rounds inside lax.scan);
  * sequential: the SAME one-client update jitted once and called client by client from Python,
    summing deltas on device (the FedJAX / Flower execution model), as the in-process baseline;
and reports rounds/s, client-updates/s, examples/s, padding waste (example slots computed / real
examples), compile time, peak RSS, achieved GFLOP/s and its fraction of a dense-GEMM peak
measured in the same run.

Usage:
  python -m benchmarks.run                               # logistic + dense, cohorts 10 100 1000
  python -m benchmarks.run --workloads cnn cifar population
  python -m benchmarks.run --workloads dense --cohorts 100 --chunk-sizes 4 8 16 32
  python -m benchmarks.run --workloads cifar --rounds 1500     # a fixed timed block of rounds
Unknown workloads or cohorts a workload does not define are refused (exit 2, with the valid
ones); a run whose parameters become non-finite exits non-zero and records nothing. Results are
appended as JSON lines to benchmarks/results/<machine>/results.jsonl (with the 1-min load
average) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from benchmarks import side_by_side
from benchmarks.peers.common import host_cpu
from benchmarks.workloads import (  # noqa: F401 - re-exported for scripts that used run's names
  MODELS,
  WORKLOADS,
  BenchmarkError,
  Dense,
  Logistic,
  Workload,
  check_finite,
  cifar_shaped,
  emnist_shaped,
  flops_per_example,
  gemm_gflops,
  xla_flops,
)
from fedjax_sim import launch


def parse_args(argv=None) -> argparse.Namespace:
  """Parses and validates the command line; unknown workloads/cohorts are refused."""
  ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", "--models", dest="workloads", nargs="+",
                  default=["logistic", "dense"], metavar="WORKLOAD",
                  help=f"one or more of {', '.join(WORKLOADS)}")
  ap.add_argument("--cohorts", nargs="+", type=int, default=None,
                  help="cohort sizes (default: each workload's own); each must be one the "
                       "workload defines: " + "; ".join(
                           f"{k}: {', '.join(map(str, w.cohorts))}" for k, w in WORKLOADS.items()))
  ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[0],
                  help="0 = automatic (model), -1 = measured (chunk_size='auto')")
  ap.add_argument("--autotune-budget-seconds", type=float, default=60.0,
                  help="with --chunk-sizes -1: the tuning's time budget (AutoChunk(budget_s=))")
  ap.add_argument("--dp", action="store_true", help="also run DP-FedAvg (clip 1, z 1)")
  ap.add_argument("--precision", nargs="+", default=["f32"], choices=["f32", "bf16"],
                  help="client compute precision(s) (fedavg(precision=...)): f32 (default), "
                       "bf16 (bfloat16 compute on float32 master params); each row records its "
                       "own and its fraction of the GEMM peak measured at that precision")
  ap.add_argument("--no-sequential", action="store_true")
  ap.add_argument("--seq-rounds", type=int, default=0, help="0: 2 rounds, 1 at cohort >= 1000")
  ap.add_argument("--target-seconds", type=float, default=8.0)
  ap.add_argument("--rounds", type=int, default=0,
                  help="time exactly this many rounds in one block (0: sized to "
                       "--target-seconds, at most 200)")
  ap.add_argument("--max-seconds", type=float, default=0.0,
                  help="with --rounds: stop timing after the block that passes this many "
                       "seconds (0: no limit); the rows record the rounds actually timed")
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--num-clients", type=int, default=None,
                  help="override the population size (smoke tests; not a fixed workload); "
                       "then any cohort up to it is accepted")
  ap.add_argument("--peer-python", default=None,
                  help="the python of a virtualenv with FedJAX 0.0.17 (see benchmarks/peers/"
                       "README.md): also run FedJAX on the same workload in this run and report "
                       "the measured ratio (logistic, dense, cnn)")
  ap.add_argument("--peer-script", default=PEER_SCRIPT, help=argparse.SUPPRESS)
  ap.add_argument("--peers", nargs="+", default=None, choices=["fedjax", "pfl", "flwr"],
                  help="run fedjax_sim and these peers interleaved, --repeats times, each in "
                       "its own process and virtualenv (benchmarks/side_by_side.py; build the "
                       "venvs with `bash benchmarks/peers/setup.sh`)")
  ap.add_argument("--repeats", type=int, default=2, help="with --peers: A-B-C repetitions")
  ap.add_argument("--peer-venvs", default=os.environ.get("PEER_VENVS", "/work/venvs"),
                  help="with --peers: the folder holding <peer>/bin/python")
  ap.add_argument("--peer-rounds", type=int, default=50, help="with --peers: timed rounds (max)")
  ap.add_argument("--peer-scripts", nargs="+", default=[], help=argparse.SUPPRESS)
  ap.add_argument("--peer-settings", nargs="+", default=[], metavar="LABEL",
                  help="with --peers: try only these settings (e.g. num_cpus=1 "
                       "torch_threads=2) of the peers they belong to; others try all theirs")
  ap.add_argument("--peer-max-seconds", type=float, default=60.0,
                  help="timed seconds per FedJAX run")
  ap.add_argument("--processes", type=int, default=1,
                  help="run fedjax_sim as this many local processes of one JAX run (python -m "
                       "fedjax_sim.launch: one pinned to each core, every cohort split across "
                       "them); the rows record it. No sequential baseline then")
  ap.add_argument("--ours-settings", nargs="+", default=["default"], metavar="SETTING",
                  help="with --peers: fedjax_sim's settings to try, each every repeat: "
                       "'default' and/or 'processes=N' (see --processes); it is compared at its "
                       "best, as the peers are")
  ap.add_argument("--machine", default=None)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  if args.processes < 1:
    ap.error(f"--processes must be >= 1; got {args.processes}")
  for setting in args.ours_settings:
    try:
      side_by_side.ours_argv(setting)
    except ValueError as e:
      ap.error(f"--ours-settings: {e}")
  if args.processes > 1 and (args.peers is not None or args.peer_python is not None):
    ap.error("--processes is fedjax_sim's own setting; with --peers pass --ours-settings "
             f"processes={args.processes} (and 'default' to try both)")
  if args.peers is not None:
    if args.peer_python is not None:
      ap.error("--peers runs FedJAX from <--peer-venvs>/fedjax; drop --peer-python")
    if args.repeats < 1:
      ap.error(f"--repeats must be >= 1; got {args.repeats}")
    known = {label for p in args.peers for label, _ in side_by_side.PEERS[p].settings}
    unknown = sorted(set(args.peer_settings) - known)
    if unknown:
      ap.error(f"--peer-settings {', '.join(unknown)}: not a setting of {', '.join(args.peers)}; "
               f"valid: {', '.join(sorted(known))}")
    bad = [s for s in args.peer_scripts if "=" not in s]
    if bad:
      ap.error(f"--peer-scripts takes NAME=PATH; got {bad}")
  args.peer_scripts = dict(s.split("=", 1) for s in args.peer_scripts)
  if args.peer_python is not None:
    if not (os.path.isfile(args.peer_python) and os.access(args.peer_python, os.X_OK)):
      ap.error(f"--peer-python {args.peer_python!r} is not an executable file; pass the python "
               "of the FedJAX virtualenv (benchmarks/peers/README.md)")
    no_peer = [w for w in args.workloads if w not in PEER_MODELS]
    if no_peer:
      ap.error(f"the FedJAX peer runs only {', '.join(PEER_MODELS)}; drop {', '.join(no_peer)} "
               "or run them without --peer-python")
  unknown = [w for w in args.workloads if w not in WORKLOADS]
  if unknown:
    ap.error(f"unknown workload(s) {', '.join(map(repr, unknown))}; valid workloads: "
             f"{', '.join(WORKLOADS)}")
  if args.cohorts is not None and args.num_clients is None:  # --num-clients: any cohort
    for w in args.workloads:
      bad = [c for c in args.cohorts if c not in WORKLOADS[w].cohorts]
      if bad:
        ap.error(f"cohort(s) {', '.join(map(str, bad))} not defined for workload {w!r}; valid "
                 f"cohorts for {w}: {', '.join(map(str, WORKLOADS[w].cohorts))}")
  if any(c < -1 for c in args.chunk_sizes):
    ap.error(f"--chunk-sizes must be >= -1 (0 = automatic, -1 = measured); got "
             f"{args.chunk_sizes}")
  if args.cohorts is not None and any(c < 1 for c in args.cohorts):
    ap.error(f"--cohorts must be >= 1; got {args.cohorts}")
  if args.autotune_budget_seconds <= 0:
    ap.error(f"--autotune-budget-seconds must be > 0; got {args.autotune_budget_seconds}")
  if args.rounds < 0:
    ap.error(f"--rounds must be >= 0 (0 = sized to --target-seconds); got {args.rounds}")
  if args.max_seconds < 0 or (args.max_seconds and not args.rounds):
    ap.error(f"--max-seconds must be >= 0 and needs --rounds; got {args.max_seconds}")
  if args.num_clients is not None and args.num_clients < 1:
    ap.error(f"--num-clients must be >= 1; got {args.num_clients}")
  return args


#: The GEMM each --precision's row is compared with (its fraction_of_peak).
PRECISION_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers",
                           "fedjax_fedavg.py")
PEER_MODELS = ("logistic", "dense", "cnn")


def run_peer(args, model: str, cohort: int, num_clients: int) -> dict:
  """Runs the FedJAX peer (its own virtualenv) on the same workload; its JSON result line."""
  cmd = [args.peer_python, args.peer_script, "--model", model, "--cohort", str(cohort),
         "--num_clients", str(num_clients), "--batch_size", "20",
         "--client_lr", str(args.client_lr), "--server_lr", str(args.server_lr),
         "--rounds", "50", "--max_seconds", str(args.peer_max_seconds)]
  if cohort >= 1000:
    cmd += ["--warmup_cohort", "10"]  # FedJAX compiles per batch shape, not per cohort
  res = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
  if res.returncode != 0 or not lines:
    raise BenchmarkError(f"benchmark error: the FedJAX peer failed ({' '.join(cmd)}):\n"
                         f"{res.stderr[-2000:]}")
  peer = json.loads(lines[-1])
  if not peer.get("params_finite", False):
    raise BenchmarkError(f"benchmark error: the FedJAX peer produced non-finite parameters on "
                         f"{model} cohort {cohort}; no ratio is recorded.")
  return peer


def sequential_baseline(algo, pop, params, cohort, rounds, seed=0):
  """One jitted client update per client, a Python loop over the cohort (FedJAX's model)."""
  # The features are an argument, not a closure: a captured array becomes a compile-time constant
  # (3 GB for the dense workload at 10^4 clients, which then never finished compiling on a GPU).
  update = jax.jit(
      lambda p, feats, off, n, key: algo.client_update(
          p, fs.ClientData(feats, off, n, pop.max_examples), (), key
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
      out = update(params, pop.features, offsets[cid], sizes[cid],
                   jax.random.fold_in(key, int(cid)))
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


def main(argv=None):
  args = parse_args(argv)
  if args.peers is not None:
    status = side_by_side.main(args)
    if status:
      raise BenchmarkError(status)
    return
  if args.processes > 1 and not launch.launched():  # start them; each runs this main()
    argv = list(sys.argv[1:] if argv is None else argv)
    status = launch.launch([sys.executable, "-m", "benchmarks.run", *argv], args.processes)
    if status:
      raise BenchmarkError(f"benchmark error: fedjax_sim as {args.processes} processes failed "
                           f"(exit {status}; the launcher's message above names the process)")
    return
  fs.sharding.initialize()  # joins the launcher's processes; nothing otherwise
  if jax.process_count() != args.processes:
    raise BenchmarkError(f"benchmark error: --processes {args.processes} but this run has "
                         f"{jax.process_count()} processes")
  lead = jax.process_index() == 0  # every process runs the rounds; process 0 records them
  if args.processes > 1:
    args.no_sequential = True  # the sequential loop is a one-process baseline
  machine = args.machine or f"{jax.devices()[0].platform}-{os.cpu_count()}core"
  out = args.out
  if out is None and lead:  # only the default location is created (tests pass --out)
    out_dir = os.path.join(os.path.dirname(__file__), "results", machine)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "results.jsonl")

  for p in args.precision:  # refused before any compile, naming the flag
    try:
      fs.precision.check_precision(p)
    except ValueError as e:
      raise BenchmarkError(f"--precision {p}: {e}") from None
  peaks = {p: gemm_gflops(dtype=PRECISION_DTYPES[p]) for p in args.precision}
  if jax.process_count() > 1:  # each process measured its own cores at once: the sum is ours
    from jax.experimental import multihost_utils

    peaks = {p: float(np.sum(multihost_utils.process_allgather(np.float32(v))))
             for p, v in peaks.items()}
  say = print if lead else (lambda *a, **k: None)
  say(f"# {machine}: jax {jax.__version__}, {jax.devices()[0].device_kind}, "
      f"{jax.process_count()} process(es), GEMM peak "
      + ", ".join(f"{v:.0f} GFLOP/s {p}" for p, v in peaks.items())
      + f" (2048^2, measured now; default matmul precision); 1-min load average "
      f"{os.getloadavg()[0]:.2f}", flush=True)
  rows = []
  pops = {}
  for name in args.workloads:
    w = WORKLOADS[name]
    num_clients = args.num_clients or w.num_clients
    key = (w.data, num_clients)
    if key not in pops:
      pops.clear()  # one population in memory at a time
      x, y, ids = w.data(num_clients)
      pops[key] = fs.Population.from_arrays({"x": x, "y": y}, ids)
      del x, y, ids
      say(f"# {pops[key]}", flush=True)
    pop = pops[key]
    module = w.module()
    x1 = jnp.ones((1, *pop.features["x"].shape[1:]), pop.features["x"].dtype)
    params = module.init(jax.random.key(0), x1)["params"]
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    fpe = flops_per_example(w, module, params, x1)
    xla_fpe = xla_flops(module, params, x1)  # backend-dependent; recorded for comparison
    loss_fn = w.loss_fn(module)
    cohorts = args.cohorts or w.default_cohorts
    peers = {}  # cohort -> the FedJAX peer's result, measured in this run
    for cohort in cohorts:
      if cohort > pop.num_clients:
        raise BenchmarkError(f"benchmark error: cohort {cohort} exceeds the {pop.num_clients} "
                             f"clients of workload {name!r}; pass --num-clients >= {cohort}")
      dps = [True] if w.dp_only else ([False, True] if args.dp else [False])
      for dp, precision in itertools.product(dps, args.precision):
        agg = fs.aggregators.dp_mean(1.0, 1.0) if dp else None
        algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(args.client_lr),
                                    server_optimizer=optax.sgd(args.server_lr),
                                    batch_size=w.batch_size, local_epochs=1, aggregator=agg,
                                    precision=precision)
        peak = peaks[precision]
        seq = None
        for chunk in args.chunk_sizes:
          request = {0: None, -1: fs.autotune.AutoChunk(budget_s=args.autotune_budget_seconds)
                     }.get(chunk, chunk)
          sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=request)
          t_init = time.perf_counter()
          state = sim.init(params, jax.random.key(0))
          t_init = time.perf_counter() - t_init  # with chunk_size="auto": the tuning
          # Size the timed block to ~target seconds using one round's time; a slow round that
          # already took half the target is itself the (steady-state, post-compile) figure.
          state, quick = sim.benchmark(state, 1)
          check_finite(state.params, f"{name} cohort {cohort}", quick["nonfinite_rounds"])
          rounds = max(1, min(200, int(args.target_seconds / max(quick["seconds"], 1e-4))))
          if args.rounds:  # blocks of <= 100 rounds (one compile), all timed together
            block = min(args.rounds, 100)
            state, m = sim.run(state, block, block_size=block,  # compiles the block; untimed
                               on_nonfinite="ignore")  # counted below: no figure then
            skipped = float(np.sum(m["nonfinite"]))
            jax.block_until_ready(state.params)
            rounds, examples, slots = 0, 0.0, 0.0
            t = time.perf_counter()
            while rounds < args.rounds:
              n = min(block, args.rounds - rounds)
              state, m = sim.run(state, n, block_size=block, on_nonfinite="ignore")
              skipped += float(np.sum(m["nonfinite"]))
              rounds += n
              examples += float(np.sum(m["examples"]))
              slots += float(np.sum(m["step_slots"]))
              if args.max_seconds and time.perf_counter() - t >= args.max_seconds:
                break  # recorded as the rounds actually timed
            jax.block_until_ready(state.params)
            seconds = time.perf_counter() - t
            check_finite(state.params, f"{name} cohort {cohort}", skipped)
            r = {"seconds": seconds, "rounds_per_s": rounds / seconds, "examples": examples,
                 "step_slots": slots}
          elif quick["seconds"] * 2 >= args.target_seconds:
            rounds, r = 1, quick
          else:
            state, r = sim.benchmark(state, rounds)
            check_finite(state.params, f"{name} cohort {cohort}", r["nonfinite_rounds"])
          flops = fpe * r["examples"]
          row = {
              "engine": "fedjax_sim", "model": name, "cohort": cohort, "dp": dp,
              "precision": precision,
              "chunk_size": sim.chunk_size, "rounds": rounds,
              "chunk_request": {0: "automatic", -1: "auto"}.get(chunk, chunk),
              "init_s": t_init,
              "rounds_per_s": r["rounds_per_s"],
              "client_updates_per_s": cohort * r["rounds_per_s"],
              "examples_per_s": r["examples"] / r["seconds"],
              "padding_waste": r["step_slots"] * w.batch_size / r["examples"],
              "compile_plus_first_block_s": quick["first_block_seconds"],
              "compile_s_estimate": max(quick["first_block_seconds"] - quick["seconds"], 0.0),
              "gflops": flops / r["seconds"] / 1e9, "gemm_peak_gflops": peak,
              "flops_per_example": fpe, "flops_counting": "jaxpr forward x3",
              "xla_flops_per_example": None if xla_fpe is None else 3.0 * xla_fpe,
              "num_clients": pop.num_clients,
              "peak_rss_mb": peak_rss_mb(), "params": num_params,
              "load_avg_1min": os.getloadavg()[0],
              "jax": jax.__version__, "machine": machine, "cpu": host_cpu(),
              "processes": jax.process_count(), "devices": len(jax.devices()),
              "time": time.time(),
              "device_kind": jax.devices()[0].device_kind,
          }
          row["fraction_of_peak"] = row["gflops"] / peak
          if sim.plan.performance.tuning is not None:
            row["chunk_tuning"] = sim.plan.performance.tuning.as_dict()
          if not args.no_sequential and seq is None and (not dp or w.dp_only):
            seq_rounds = args.seq_rounds or (1 if cohort >= 1000 else 2)
            s = sequential_baseline(algo, pop, params, cohort, seq_rounds)
            seq = {"rounds_per_s": s["rounds_per_s"],
                   "client_updates_per_s": cohort * s["rounds_per_s"],
                   "examples_per_s": s["examples"] / s["seconds"]}
          if (args.peer_python is not None and not dp and precision == "f32"
              and cohort not in peers):
            peers[cohort] = run_peer(args, name, cohort, pop.num_clients)
            with open(out, "a") as f:
              f.write(json.dumps({**peers[cohort], "engine": "fedjax", "time": time.time(),
                                  "machine": machine}) + "\n")
          if cohort in peers:
            row["fedjax_client_updates_per_s"] = peers[cohort]["client_updates_per_s"]
            row["speedup_vs_fedjax"] = (row["client_updates_per_s"]
                                        / peers[cohort]["client_updates_per_s"])
            row["speedup_vs_fedjax_rounds"] = (row["rounds_per_s"]
                                               / peers[cohort]["rounds_per_s"])
          if seq is not None:
            row["sequential_client_updates_per_s"] = seq["client_updates_per_s"]
            row["speedup_vs_sequential"] = row["client_updates_per_s"] / seq["client_updates_per_s"]
          rows.append(row)
          if lead:
            with open(out, "a") as f:
              f.write(json.dumps(row) + "\n")
          say(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in row.items()}), flush=True)
          del state, sim
  if not lead:
    return
  print()
  print("| workload | cohort | DP | precision | chunk | rounds/s | client-updates/s | examples/s "
        "| padding waste | GFLOP/s (% of GEMM peak) | sequential client-updates/s | speed-up |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    seq = r.get("sequential_client_updates_per_s")
    print(f"| {r['model']} | {r['cohort']} | {'yes' if r['dp'] else 'no'} | {r['precision']} "
          f"| {r['chunk_size']} "
          f"| {r['rounds_per_s']:.3g} | {r['client_updates_per_s']:.0f} "
          f"| {r['examples_per_s']:.0f} | {r['padding_waste']:.2f} "
          f"| {r['gflops']:.0f} ({100 * r['fraction_of_peak']:.0f}%) "
          f"| {'' if seq is None else format(seq, '.0f')} "
          f"| {'' if seq is None else format(r['speedup_vs_sequential'], '.1f') + 'x'} |"
          + ("" if "speedup_vs_fedjax" not in r else
             f" FedJAX (measured now): {r['fedjax_client_updates_per_s']:.0f}, "
             f"{r['speedup_vs_fedjax']:.2f}x |"))
  print(f"\nplatform: {platform.platform()}, python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}")


if __name__ == "__main__":
  main()
