"""The GPU suite: issue 14's accelerator figures in one call (``benchmarks/gpu_suite.sh``'s driver).

Each step is a time-boxed subprocess (``python -m benchmarks.run ...`` for fedjax_sim and its
in-process sequential baseline, ``benchmarks/peers/pfl_fedavg.py`` for pfl-research); a step that
fails or runs out of time is recorded with its error and the suite goes on. Steps, in order:

  env           device, versions, nvidia-smi, the compute mode (``nvidia-smi -q``) and
                ``jax.devices()[0].memory_stats()``
  peaks         measured 8192^2 GEMM peaks: f32 (precision HIGHEST), TF32 (JAX's default
                precision, what f32 rows run at on H100/H200) and bf16
  cifar         pfl's CIFAR-10 setup (pfl's simple_cnn, cohort 50, batch 10), 1500 rounds timed
                (in blocks of 100; stopped after 75 s, recording the rounds done, if slower)
  pfl           pfl-research on the same workload on the same device, one process
  pfl_nproc     pfl with PFL_NPROC worker processes on the GPU (``python -m torch.distributed.run
                --nproc_per_node=N``, pfl's recommended 1-5 per GPU); skipped with the reason when
                the compute mode is Exclusive_Process; a failed start is an error row, no ratio
  cifar_after   fedjax_sim on CIFAR again, after the pfl rows (drift check)
  cnn           EMNIST-CNN, cohort 1000: chunk sweep 20, 50, 150, the automatic choice (0) and
                the measured one (-1, chunk_size="auto"); the summary gives auto / best fixed
  stackoverflow FedJAX's Stack Overflow LSTM next-word model, cohort 50
  stackoverflow_transformer  pfl-research's Stack Overflow transformer
                (``fs.zoo.StackOverflowTransformer``), pfl's cohort 400 and batch 16
  shakespeare   FedJAX/TFF's Shakespeare character LSTM, cohort 10
  precision     the EMNIST CNN at cohort 1000, chunk 50, ``precision="f32"`` and ``"bf16"``
                (``fedavg(precision=)``: bf16 compute on f32 master params), each against the
                GEMM peak at its own precision
  population    10^6 clients x 10 examples, cohort 10^4, DP-FedAvg (clip 1, z 1)  [--steps]
  dense         EMNIST dense MLP, cohort 10^4 (population 10^4 clients)           [--steps]

A plain run does every step but the last two (``DEFAULT_STEPS``): their time boxes add up to the
default budget. ``population`` and ``dense`` run when named, e.g. ``--steps env population
dense`` in a second call.

Every fedjax_sim row records FLOPs counted from the jaxpr (``fedjax_sim.flops.count_flops``:
convolutions, matmuls, LSTM gates; training = 3 x forward), XLA's own cost-analysis figure beside
it, and the summary gives each row's fraction of the default-precision GEMM peak measured in the
same run. Every fedjax_sim step but cifar_after also runs the in-process sequential baseline.
The pfl steps are recorded as skipped ('pfl not installed') when ``--pfl-python`` cannot import
pfl and torch. The whole suite is held to ``--budget-seconds`` (500 s): a step's time box is cut
to what is left and steps with under 10 s left are skipped (recorded as such).

Results: one JSON line per figure (each with its ``step``) in ``--out``, a per-step log beside
it (``<out>.log``), and a markdown table printed at the end and written to ``<out>.md``.
``--dry-run`` runs the same steps on CPU with tiny sizes (the smoke test of tests/).

WHEELS: the GPU image (Python 3.12, jax, torch, flax, optax, chex, scipy, attrs, absl-py, mpmath,
wrapt preinstalled; no network) lacks pfl and dp-accounting. From the repository root, once:
  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pfl==0.6.0 dp-accounting==0.5.1 prv-accountant==0.2.0 multiprocess==0.70.19 \
    dill==0.4.1 dm-tree==0.1.10
(about 0.9 MB); the device call carries ``.whl`` and gpu_suite.sh installs it into /tmp/site.

On the lent device (its tool copies the working tree, ``carry`` brings the ignored ``.whl``):
  run(command="bash benchmarks/gpu_suite.sh && mkdir -p $OUT/gpu-h200 && cp $OUT/gpu_results* \
      $OUT/gpu-h200/", carry=[".whl"], timeout_s=600)
then copy the files back into ``benchmarks/results/gpu-<kind>/`` (kind: h100, h200).

Usage (from the repository root):
  bash benchmarks/gpu_suite.sh                   # on the GPU machine; writes $OUT/gpu_results.jsonl
  python -m benchmarks.gpu_suite --dry-run --out /tmp/gpu_dry.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PFL_SCRIPT = os.path.join(ROOT, "benchmarks", "peers", "pfl_fedavg.py")
STEPS = ("env", "peaks", "cifar", "pfl", "pfl_nproc", "cifar_after", "cnn", "stackoverflow",
         "stackoverflow_transformer", "shakespeare", "precision", "population", "dense")
#: What a plain run does: its time boxes (``plan``) add up to the default budget. ``population``
#: and ``dense`` (no issue-22 target; in the first H100 run population took 100 s and dense hit
#: its 100 s time box) run when named in ``--steps``, e.g. in a second call.
DEFAULT_STEPS = STEPS[:-2]
#: The default ``--budget-seconds``: one device call is at most 600 s, and the wheels' install and
#: the interpreter starts come out of it.
BUDGET_S = 500.0
#: pfl worker processes per GPU for the ``pfl_nproc`` step (pfl's docs: 1-5 per GPU is best).
PFL_NPROC = 4
#: How to make the pfl steps runnable (named in their error rows).
PFL_SETUP = ("carry pfl's wheels in .whl/ (the WHEELS recipe in benchmarks/gpu_suite.py) and run "
             "`bash benchmarks/gpu_suite.sh`; on a networked machine `bash benchmarks/peers/"
             "setup.sh pfl`; pfl_nproc also needs torch.distributed (torchrun) and a compute "
             "mode that lets N processes share the GPU")

ENV_CODE = r"""
import json, os, platform, subprocess
row = {"python": platform.python_version(), "platform": platform.platform(),
       "cpu_count": os.cpu_count()}
try:
  from benchmarks.peers.common import host_cpu
  row["cpu"] = host_cpu()
except Exception as e:  # recorded, not fatal
  row["cpu"] = "unavailable: " + repr(e)
try:
  import jax, jaxlib
  row.update(jax=jax.__version__, jaxlib=jaxlib.__version__, jax_backend=jax.default_backend(),
             jax_devices=[d.device_kind for d in jax.devices()])
except Exception as e:  # recorded, not fatal: the steps say what fails
  row["jax_error"] = repr(e)
try:
  import torch
  row.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available(),
             torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
except Exception as e:
  row["torch_error"] = repr(e)
for mod in ("flax", "optax", "pfl", "dp_accounting"):
  try:
    row[mod] = __import__(mod).__version__ if hasattr(__import__(mod), "__version__") else "yes"
  except Exception as e:
    row[mod] = "not installed: " + repr(e)
try:
  row["memory_stats"] = jax.devices()[0].memory_stats()
except Exception as e:
  row["memory_stats"] = "unavailable: " + repr(e)
try:
  q = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20).stdout
  modes = [ln.split(":", 1)[1].strip() for ln in q.splitlines() if "Compute Mode" in ln]
  row["compute_mode"] = modes[0] if modes else "not reported"
  row["mig_mode"] = [ln.strip() for ln in q.splitlines() if "Current" in ln and "MIG" in q][:1]
except Exception as e:
  row["compute_mode"] = "unavailable: " + repr(e)
try:
  row["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
       "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
  row["nvidia_smi"] = "unavailable: " + repr(e)
print(json.dumps(row))
"""

PEAKS_CODE = r"""
import json, sys, time
import jax, jax.numpy as jnp
n = int(sys.argv[1])
for label, dtype, prec in (("f32", jnp.float32, "highest"), ("tf32_default", jnp.float32, None),
                           ("bf16", jnp.bfloat16, None)):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: jnp.matmul(a, a, precision=prec))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter(); f(a).block_until_ready(); best = min(best, time.perf_counter() - t)
  print(json.dumps({"engine": "gemm_peak", "precision": label, "n": n,
                    "gflops": 2 * n**3 / best / 1e9, "device_kind": jax.devices()[0].device_kind}))
"""

def compute_mode_forbids_nproc() -> str | None:
  """Why several processes cannot share the GPU (its compute mode), or None."""
  try:
    q = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20).stdout
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"nvidia-smi -q unavailable ({e!r}): the compute mode is unknown"
  for line in q.splitlines():
    if "Compute Mode" in line and "Exclusive_Process" in line:
      return ("the GPU's compute mode is Exclusive_Process (nvidia-smi -q): one process per "
              "GPU, so pfl cannot run several workers on it; not changed")
  return None


def plan(dry_run: bool, pfl_python: str) -> dict[str, dict]:
  """The steps: command, time box (s) and kind. Full sizes for the GPU, tiny ones for --dry-run."""
  run = [sys.executable, "-m", "benchmarks.run"]
  if dry_run:
    sizes = {
        "cifar": ["--workloads", "cifar", "--num-clients", "4", "--cohorts", "2", "--rounds", "2",
                  "--seq-rounds", "1"],
        "pfl": ["--device", "cpu", "--torch-threads", "1", "--num-clients", "4", "--cohort", "2",
                "--rounds", "1", "--warmup-rounds", "1"],
        "cnn": ["--workloads", "cnn", "--num-clients", "6", "--cohorts", "3",
                "--target-seconds", "0.1", "--seq-rounds", "1"],
        "population": ["--workloads", "population", "--num-clients", "200", "--cohorts", "50",
                       "--target-seconds", "0.1", "--seq-rounds", "1"],
        "dense": ["--workloads", "dense", "--num-clients", "20", "--cohorts", "20",
                  "--target-seconds", "0.1", "--seq-rounds", "1"],
        "cifar_after": ["--workloads", "cifar", "--num-clients", "4", "--cohorts", "2",
                        "--rounds", "2", "--no-sequential"],
        "stackoverflow": ["--workloads", "stackoverflow", "--num-clients", "2", "--cohorts", "1",
                          "--target-seconds", "0.1", "--no-sequential"],
        "stackoverflow_transformer": ["--workloads", "stackoverflow-transformer",
                                      "--num-clients", "2", "--cohorts", "1",
                                      "--target-seconds", "0.1", "--no-sequential"],
        "shakespeare": ["--workloads", "shakespeare", "--num-clients", "3", "--cohorts", "2",
                        "--target-seconds", "0.1", "--no-sequential"],
        "peaks": ["256"],
    }
    sizes["cnn"] += ["--chunk-sizes", "0", "-1", "1", "3"]
    sizes["precision"] = ["--workloads", "cnn", "--num-clients", "6", "--cohorts", "3",
                          "--chunk-sizes", "3", "--precision", "f32", "bf16",
                          "--target-seconds", "0.1", "--no-sequential"]
    boxes = {"env": 60, "peaks": 60, "cifar": 240, "pfl": 120, "pfl_nproc": 120,
             "cifar_after": 240, "cnn": 300, "stackoverflow": 300,
             "stackoverflow_transformer": 300, "shakespeare": 240,
             "precision": 240, "population": 120, "dense": 120}
    nproc = 2
  else:
    sizes = {
        "cifar": ["--workloads", "cifar", "--rounds", "1500", "--max-seconds", "40"],
        "pfl": ["--device", "cuda", "--rounds", "1500", "--warmup-rounds", "3",
                "--max-seconds", "30"],
        "cnn": ["--workloads", "cnn", "--cohorts", "1000"],
        "population": ["--workloads", "population", "--cohorts", "10000"],
        "dense": ["--workloads", "dense", "--num-clients", "10000", "--cohorts", "10000"],
        "cifar_after": ["--workloads", "cifar", "--rounds", "1500", "--max-seconds", "20",
                        "--no-sequential"],
        "stackoverflow": ["--workloads", "stackoverflow", "--cohorts", "50",
                          "--target-seconds", "5", "--seq-rounds", "1"],
        "stackoverflow_transformer": ["--workloads", "stackoverflow-transformer",
                                      "--cohorts", "400", "--target-seconds", "5",
                                      "--seq-rounds", "1"],
        "shakespeare": ["--workloads", "shakespeare", "--cohorts", "10",
                        "--target-seconds", "4", "--seq-rounds", "1"],
        "peaks": ["8192"],
    }
    # the chunk sweep on the EMNIST CNN: the model's automatic chunk (0), the measured one
    # (-1: chunk_size="auto", fs.autotune) and fixed chunks
    # (4 s timed per chunk, the tuning held to 30 s)
    sizes["cnn"] += ["--chunk-sizes", "0", "-1", "20", "50", "150", "--seq-rounds", "1",
                     "--target-seconds", "4", "--autotune-budget-seconds", "30"]
    sizes["precision"] = ["--workloads", "cnn", "--cohorts", "1000", "--chunk-sizes", "50",
                          "--precision", "f32", "bf16", "--target-seconds", "4",
                          "--no-sequential"]
    # Time boxes: DEFAULT_STEPS' add up to BUDGET_S - 30 s (interpreter starts, pfl's import
    # checks); a step's box is cut to what is left of --budget-seconds, and the last steps are
    # skipped when it is spent. The first H100 run took cifar 97 s (75 s timed), pfl 63 s,
    # cnn 74 s, population 100 s, dense > 100 s.
    boxes = {"env": 15, "peaks": 20, "cifar": 65, "pfl": 45, "pfl_nproc": 50, "cifar_after": 30,
             "cnn": 95, "stackoverflow": 35, "stackoverflow_transformer": 45, "shakespeare": 30,
             "precision": 40,
             "population": 110, "dense": 110}
    nproc = PFL_NPROC
  steps = {"env": {"cmd": [sys.executable, "-c", ENV_CODE], "kind": "env"}}
  for name in ("cifar", "cifar_after", "cnn", "stackoverflow", "stackoverflow_transformer",
               "shakespeare", "precision", "population", "dense"):
    steps[name] = {"cmd": run + sizes[name], "kind": "run"}
  steps["pfl"] = {"cmd": [pfl_python, PFL_SCRIPT] + sizes["pfl"], "kind": "pfl"}
  # pfl's recommended multi-process mode: N worker processes sharing the GPU
  # (docs/source/guides/simulation_distributed.rst: `torchrun --nproc_per_node=N`).
  steps["pfl_nproc"] = {"cmd": [pfl_python, "-m", "torch.distributed.run",
                                f"--nproc_per_node={nproc}", PFL_SCRIPT] + sizes["pfl"],
                        "kind": "pfl", "nproc": nproc}
  steps["peaks"] = {"cmd": [sys.executable, "-c", PEAKS_CODE] + sizes["peaks"], "kind": "code"}
  for name, s in steps.items():
    s["box"] = boxes[name]
  return {name: steps[name] for name in STEPS}


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--dry-run", action="store_true",
                  help="the same steps on CPU with tiny sizes (a smoke test, no figures)")
  ap.add_argument("--out", default=None,
                  help="JSON-lines results file (default: $OUT/gpu_results.jsonl where OUT is "
                       "set, else benchmarks/results/gpu_suite/gpu_results.jsonl; --dry-run: a "
                       "temporary folder)")
  ap.add_argument("--pfl-python", default=sys.executable,
                  help="the python that has pfl and torch (default: this one)")
  ap.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                  help=f"a subset of {', '.join(STEPS)} (always run in that order; default: "
                       f"all but {', '.join(s for s in STEPS if s not in DEFAULT_STEPS)}; "
                       "--dry-run: all)")
  ap.add_argument("--budget-seconds", type=float, default=None,
                  help=f"the whole suite's wall-clock budget (default {BUDGET_S:.0f} s; "
                       "--dry-run: 1500 s, "
                       "a loaded 2-core CPU is slow): a step's time box is cut to what is left; "
                       "steps with under 10 s left are skipped")
  args = ap.parse_args(argv)
  if args.steps is None:
    args.steps = list(STEPS if args.dry_run else DEFAULT_STEPS)
  bad = [s for s in args.steps if s not in STEPS]
  if bad:
    ap.error(f"unknown step(s) {', '.join(map(repr, bad))}; valid steps: {', '.join(STEPS)}")
  if args.budget_seconds is None:
    args.budget_seconds = 1500.0 if args.dry_run else BUDGET_S
  if args.budget_seconds <= 0:
    ap.error(f"--budget-seconds must be > 0; got {args.budget_seconds}")
  if args.out is None:
    if args.dry_run:
      args.out = os.path.join(tempfile.mkdtemp(prefix="gpu_suite_dry_"), "gpu_results.jsonl")
    elif os.environ.get("OUT"):
      args.out = os.path.join(os.environ["OUT"], "gpu_results.jsonl")
    else:
      args.out = os.path.join(ROOT, "benchmarks", "results", "gpu_suite", "gpu_results.jsonl")
  return args


def pfl_available(python: str) -> str | None:
  """None if ``python`` imports pfl and torch, else why not."""
  try:
    res = subprocess.run([python, "-c", "import pfl, torch"], capture_output=True, text=True,
                         timeout=120)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"pfl not installed: {python} cannot run ({e!r})"
  if res.returncode != 0:
    last = (res.stderr.strip().splitlines() or ["?"])[-1]
    return f"pfl not installed in {python} ({last}); carry its wheels (benchmarks/gpu_suite.sh)"
  return None


def run_step(name: str, step: dict, box: float, env: dict, log) -> tuple[list[dict], dict]:
  """Runs one step; returns its figures and its status row (never raises for a failed step)."""
  t0 = time.perf_counter()
  tmp = None
  cmd = list(step["cmd"])
  if step["kind"] == "run":
    fd, tmp = tempfile.mkstemp(suffix=".jsonl", prefix=f"gpu_suite_{name}_")
    os.close(fd)
    cmd += ["--out", tmp, "--machine", "gpu-suite"]
  log.write(f"\n===== step {name}: {' '.join(cmd)} (time box {box:.0f} s)\n")
  log.flush()
  status = {"step": name, "kind": "status", "cmd": " ".join(cmd), "time_box_s": box}
  rows: list[dict] = []
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=box, cwd=ROOT, env=env)
    out, err, rc = res.stdout, res.stderr, res.returncode
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    rc = None
  status["wall_s"] = time.perf_counter() - t0
  log.write(out + ("\n--- stderr\n" + err if err else "") + "\n")
  log.flush()
  if step["kind"] == "run":
    with open(tmp) as f:  # figures written before a later failure still count
      rows = [json.loads(line) for line in f if line.strip()]
    os.remove(tmp)
  else:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rows = rows if step["kind"] == "code" else rows[-1:]
  if rc is None:
    status.update(status="timeout", error=f"step exceeded its {box:.0f} s time box; "
                  f"last output: {(err or out)[-600:]}")
  elif rc != 0:
    status.update(status="failed", error=f"exit {rc}: {(err or out)[-1500:]}")
  elif not rows:
    status.update(status="failed", error=f"no result line; output: {(err or out)[-1500:]}")
  elif step["kind"] == "pfl" and not rows[-1].get("params_finite", False):
    status.update(status="failed", error="pfl produced non-finite parameters; no figure")
    rows = []
  else:
    status["status"] = "ok"
  if step["kind"] == "pfl" and status["status"] != "ok":
    rows = []  # a peer that did not run gives no figure and no ratio
    status["error"] += f" | setup: {PFL_SETUP}"
  for r in rows:
    r["step"] = name
  return rows, status


def table(rows: list[dict], statuses: list[dict], dry_run: bool = False) -> str:
  """The markdown summary: one line per figure, then notes (ratios, device, each step's status)."""
  lines = ["| step | engine | workload | cohort | DP | rounds | seconds | rounds/s "
           "| client-updates/s | compile+first block s | sequential client-updates/s "
           "| speed-up vs sequential |", "|---" * 12 + "|"]
  for r in rows:
    if r.get("engine") not in ("fedjax_sim", "pfl"):
      continue
    seconds = r.get("seconds", r["rounds"] / r["rounds_per_s"])
    seq = r.get("sequential_client_updates_per_s")
    lines.append(
        f"| {r['step']} | {r['engine']}{' (' + r['device'] + ')' if 'device' in r else ''}"
        f"{' ' + r['precision'] if r.get('precision', 'f32') != 'f32' else ''} "
        f"| {r['model']} | {r['cohort']} | {'yes' if r.get('dp') else 'no'} | {r['rounds']} "
        f"| {seconds:.2f} | {r['rounds_per_s']:.3g} | {r['client_updates_per_s']:.0f} "
        f"| {r.get('compile_plus_first_block_s', r.get('warmup_plus_timed_wall_s', 0)):.1f} "
        f"| {'' if seq is None else format(seq, '.0f')} "
        f"| {'' if seq is None else format(r['speedup_vs_sequential'], '.1f') + 'x'} |")
  ours = [r for r in rows if r.get("step") == "cifar" and r.get("engine") == "fedjax_sim"]
  after = [r for r in rows if r.get("step") == "cifar_after" and r.get("engine") == "fedjax_sim"]
  pfl_all = [r for r in rows if r.get("step") in ("pfl", "pfl_nproc")]
  pfl = sorted(pfl_all, key=lambda r: -r["client_updates_per_s"])[:1]  # pfl at its best
  notes = ["DRY RUN: tiny sizes on CPU, a smoke test; these are not figures"] if dry_run else []
  peaks = {r["precision"]: r["gflops"] for r in rows if r.get("engine") == "gemm_peak"}
  if peaks:
    notes.append("measured GEMM peaks (GFLOP/s, this run): " + ", ".join(
        f"{k} {v:.0f}" for k, v in peaks.items()))
  # JAX's default precision (TF32 on H100/H200) is what f32 rows ran at; bf16 rows against bf16
  ref = {"f32": ("tf32_default", "default-precision"), "bf16": ("bf16", "bf16")}
  for r in rows:
    label, what = ref[r.get("precision", "f32")] if r.get("engine") == "fedjax_sim" else ("", "")
    if peaks.get(label):
      notes.append(f"{r['step']} {r['model']} c{r['cohort']} chunk {r.get('chunk_size')} "
                   f"{r.get('precision', 'f32')}: {r['gflops']:.0f} GFLOP/s counted "
                   f"({r['flops_per_example'] / 1e6:.1f} MFLOP/example, "
                   f"{r.get('flops_counting', 'xla')}) = "
                   f"{100 * r['gflops'] / peaks[label]:.1f}% of the {what} GEMM peak")
  sweep = [r for r in rows if r.get("step") == "cnn" and r.get("engine") == "fedjax_sim"]
  tuned = [r for r in sweep if r.get("chunk_request") == "auto"]
  fixed = [r for r in sweep if isinstance(r.get("chunk_request"), int)]
  if tuned and fixed:
    best = max(fixed, key=lambda r: r["client_updates_per_s"])
    notes.append(f"cnn sweep: chunk_size='auto' chose {tuned[0]['chunk_size']} "
                 f"({tuned[0]['client_updates_per_s']:.0f} client-updates/s, tuning "
                 f"{tuned[0].get('init_s', 0):.1f} s) = "
                 f"{tuned[0]['client_updates_per_s'] / best['client_updates_per_s']:.2f}x the "
                 f"best fixed chunk {best['chunk_size']} "
                 f"({best['client_updates_per_s']:.0f}); target >= 0.9x")
  prec = {r.get("precision"): r for r in rows
          if r.get("step") == "precision" and r.get("engine") == "fedjax_sim"}
  if "f32" in prec and "bf16" in prec:
    f32, bf16 = prec["f32"], prec["bf16"]
    notes.append(f"precision rows: {f32['model']} c{f32['cohort']} chunk {f32['chunk_size']}: "
                 f"bf16 {bf16['client_updates_per_s']:.0f} vs f32 "
                 f"{f32['client_updates_per_s']:.0f} client-updates/s = "
                 f"{bf16['client_updates_per_s'] / f32['client_updates_per_s']:.2f}x")
  if ours:
    notes.append(f"fedjax_sim: pfl's 1500 rounds take {1500 / ours[0]['rounds_per_s']:.1f} s at "
                 f"the rate measured over {ours[0]['rounds']} timed rounds (compile excluded)")
  if ours and pfl:
    best = pfl[0]
    label = f"{best['step']}" + (f" ({best.get('nproc', 1)} processes)"
                                 if best["step"] == "pfl_nproc" else " (1 process)")
    for o, when in ((ours, "before"), (after, "after")):
      if o:
        notes.append(f"fedjax_sim ({when} the pfl rows) / pfl at its best measured process "
                     f"count, {label}, CIFAR, same device, this run: "
                     f"{o[0]['client_updates_per_s'] / best['client_updates_per_s']:.1f}x "
                     "client-updates/s")
  env = [r for r in rows if r.get("step") == "env"]
  if env:
    e = env[0]
    notes.append(f"device: {e.get('jax_devices', e.get('jax_error'))}; nvidia-smi: "
                 f"{e.get('nvidia_smi', '')}; python {e.get('python')}, jax {e.get('jax')}, "
                 f"torch {e.get('torch', e.get('torch_error'))}, pfl {e.get('pfl')}")
  for s in statuses:
    if s["status"] != "ok":
      notes.append(f"step {s['step']}: {s['status'].upper()} — {s.get('error', '')}"
                   .replace("\n", " ")[:700])
    else:
      notes.append(f"step {s['step']}: ok in {s['wall_s']:.0f} s (time box {s['time_box_s']:.0f})")
  return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env["PYTHONUNBUFFERED"] = "1"
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  steps = plan(args.dry_run, args.pfl_python)
  start = time.perf_counter()
  rows: list[dict] = []
  statuses: list[dict] = []
  print(f"# gpu_suite{' (dry run, CPU, tiny sizes)' if args.dry_run else ''}: steps "
        f"{', '.join(args.steps)}; results -> {args.out}", flush=True)
  with open(args.out + ".log", "a") as log, open(args.out, "a") as out:
    for name in STEPS:
      if name not in args.steps:
        continue
      left = args.budget_seconds - (time.perf_counter() - start)
      step = steps[name]
      why = None
      if left < 10:
        why = f"suite budget of {args.budget_seconds:.0f} s spent"
      elif step["kind"] == "pfl":
        why = pfl_available(args.pfl_python)
        if why is None and name == "pfl_nproc" and not args.dry_run:
          why = compute_mode_forbids_nproc()
      if why is not None:
        status = {"step": name, "kind": "status", "status": "skipped", "error": why,
                  "wall_s": 0.0, "time_box_s": 0.0}
        new = []
      else:
        new, status = run_step(name, step, min(step["box"], left), env, log)
        for r in new:
          if "nproc" in step:
            r["nproc"] = step["nproc"]
      status["dry_run"] = args.dry_run
      for r in new + [status]:
        r.setdefault("time", time.time())
        out.write(json.dumps(r) + "\n")
        out.flush()
      rows += new
      statuses.append(status)
      print(f"# step {name}: {status['status']} ({status['wall_s']:.1f} s)"
            + (f": {status['error'][:300]}" if status["status"] != "ok" else ""), flush=True)
  md = table(rows, statuses, args.dry_run)
  with open(args.out + ".md", "w") as f:
    f.write(md + "\n")
  print()
  print(md)
  print(f"\ntotal wall {time.perf_counter() - start:.0f} s; results {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
