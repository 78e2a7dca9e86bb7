"""What both pfl peers share (``pfl_fedavg.py``: CIFAR-10, ``pfl_lm.py``: the Stack Overflow
transformer): importing torch and pfl with a clear error, the per-user ``FederatedDataset``, and
one timed run of pfl's ``FederatedAveraging`` whose JSON row ``benchmarks/side_by_side.py`` reads.

``--workers N`` runs pfl's own multi-process simulation (docs: "Fast distributed simulations";
``PFL_WORKER_ADDRESSES`` / ``PFL_WORKER_RANK``, ``torch.distributed`` over gloo on CPU): the
process started by the harness becomes worker 0 and starts workers 1..N-1 (the same script and
flags); pfl gives each worker its share of every cohort. Worker 0 prints the one row: its clock,
and the examples all workers trained (each reports its own share).

Runs in the pfl virtualenv (``bash benchmarks/peers/setup.sh pfl``); only pfl's public API.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (host_cpu)

SETUP = "build the pfl virtualenv: bash benchmarks/peers/setup.sh pfl"


def parse_args(description: str, argv=None, *, cohort: int, num_clients: int, batch_size: int,
               extra=None):
  """The flags both peers take (device, threads, rounds, warm-up, time limit, cohort, clients,
  batch, learning rates, seed), plus ``extra(ap)``'s, checked: a bad value is an argparse error
  naming the flag.

  Returns:
    the parsed ``argparse.Namespace``.
  """
  import argparse

  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--rounds", type=int, default=20, help="timed rounds (at most)")
  ap.add_argument("--warmup-rounds", type=int, default=2)
  ap.add_argument("--max-seconds", type=float, default=0.0,
                  help="stop the timed block after this many seconds (0: no limit)")
  ap.add_argument("--cohort", type=int, default=cohort)
  ap.add_argument("--num-clients", type=int, default=num_clients)
  ap.add_argument("--batch-size", type=int, default=batch_size)
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workers", type=int, default=1,
                  help="pfl worker processes (its native multi-process simulation), each "
                       "training its share of every cohort with --torch-threads threads")
  positive = ["rounds", "cohort", "num_clients", "batch_size", "workers"]
  if extra is not None:
    positive += extra(ap)
  args = ap.parse_args(argv)
  for name in positive:
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  if args.warmup_rounds < 1:
    ap.error(f"--warmup-rounds must be >= 1 (compile/allocate outside the timed block); got "
             f"{args.warmup_rounds}")
  if args.cohort > args.num_clients:
    ap.error(f"--cohort {args.cohort} exceeds --num-clients {args.num_clients}")
  if args.torch_threads < 0:
    ap.error(f"--torch-threads must be >= 0 (0: torch's default); got {args.torch_threads}")
  return args


def start(args):
  """Imports torch (placing pfl on ``args.device``), sets threads and seeds.

  Returns:
    ``(torch, device)``.
  """
  args.worker_procs = spawn_workers(args)
  os.environ["PFL_PYTORCH_DEVICE"] = args.device  # pfl reads it when it places models and data
  try:
    import pfl.model.pytorch  # noqa: F401
    import torch
  except ImportError as e:
    raise SystemExit(f"pfl peer: torch or pfl is not installed in {sys.executable} ({e}); "
                     f"{SETUP}") from e
  if args.device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("pfl peer: --device cuda but torch sees no CUDA device "
                     f"(torch {torch.__version__}); use --device cpu")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)  # noqa: NPY002 (pfl's samplers draw from the global numpy RNG)
  return torch, torch.device(args.device)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def spawn_workers(args) -> list:
  """With ``--workers N > 1`` in the process the harness started: starts workers 1..N-1 (this
  script with the same flags) and makes this process worker 0 of pfl's multi-process simulation
  (``PFL_WORKER_ADDRESSES`` on 127.0.0.1; worker 0's address is the rendezvous).

  Returns:
    ``[(Popen, output path), ...]`` of the started workers; ``[]`` in a started worker, under
    torchrun, or with one worker.
  """
  if args.workers == 1 or "PFL_WORKER_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
    return []
  os.environ["PFL_WORKER_ADDRESSES"] = ",".join(
      f"127.0.0.1:{_free_port()}" for _ in range(args.workers))
  procs = []
  for rank in range(1, args.workers):
    fd, path = tempfile.mkstemp(prefix=f"pfl_worker{rank}_", suffix=".log")
    with os.fdopen(fd, "w") as out:
      procs.append((subprocess.Popen(
          [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]],
          env={**os.environ, "PFL_WORKER_RANK": str(rank)}, stdout=out,
          stderr=subprocess.STDOUT), path))
  os.environ["PFL_WORKER_RANK"] = "0"
  # If this process dies before collect_workers (an exception), no worker is left behind.
  atexit.register(lambda: [p.kill() for p, _ in procs if p.poll() is None])
  return procs


def combine_workers(row: dict, worker_rows: list[dict]) -> dict:
  """Worker 0's row with the other workers' shares of the timed examples added in.

  pfl's workers run the same rounds in lockstep (every round ends in an all-reduce), so worker
  0's clock times them all and the examples trained are the sum of every worker's share.

  Returns:
    the row, its ``examples_per_s`` counting every worker's examples, ``workers`` set.

  Example:
    >>> combine_workers({"examples_timed": 30, "seconds": 2.0}, [{"examples_timed": 50}])
    {'examples_timed': 80, 'seconds': 2.0, 'examples_per_s': 40.0, 'workers': 2}
  """
  total = row["examples_timed"] + sum(r["examples_timed"] for r in worker_rows)
  return {**row, "examples_timed": total, "examples_per_s": total / row["seconds"],
          "workers": 1 + len(worker_rows)}


def collect_workers(procs: list, timeout: float = 600.0) -> list[dict]:
  """Waits for the started workers and reads each one's row (its last JSON line).

  Returns:
    the workers' rows; a worker that failed is a ``SystemExit`` with the end of its output.
  """
  rows = []
  for proc, path in procs:
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      code = "killed after a time-out"
    with open(path) as f:
      text = f.read()
    os.unlink(path)
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if code != 0 or not lines:
      raise SystemExit(f"pfl peer: worker process exited with {code}:\n{text[-2000:]}")
    rows.append(json.loads(lines[-1]))
  return rows


def federated(users: dict):
  """pfl's in-memory ``FederatedDataset`` of ``users[u] = (inputs, targets)``, users sampled at
  random.

  Returns:
    the ``FederatedDataset``; its ``examples_drawn`` (a one-item list) counts the examples of
    the users drawn so far, so that a run reports the work it timed (client sizes vary).
  """
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler

  drawn = [0]  # examples of the users pfl has drawn so far (read by train_and_time)

  def make(u):
    drawn[0] += len(users[u][1])
    return Dataset(raw_data=list(users[u]), user_id=u)

  dataset = FederatedDataset(make, get_user_sampler("random", list(users)))
  dataset.examples_drawn = drawn
  return dataset


def train_and_time(args, torch, net, train, model_name: str) -> dict:
  """Runs pfl's FedAvg (central SGD ``args.server_lr``, local SGD ``args.client_lr``, 1 local
  epoch, batch ``args.batch_size``, ``WeightByUser``, no evaluation): ``args.warmup_rounds``
  untimed, then up to ``args.rounds`` timed (stopped after ``args.max_seconds`` by a callback).
  Prints the row as one JSON line.

  Returns:
    the row.
  """
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.aggregate.weighting import WeightByUser
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.callback.base import TrainingProcessCallback
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
  from pfl.metrics import Metrics
  from pfl.model.pytorch import PyTorchModel

  num_params = sum(p.numel() for p in net.parameters())
  model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(list(net.parameters()), args.server_lr))
  backend = SimulatedBackend(training_data=train, val_data=None, postprocessors=[WeightByUser()])
  total_rounds = args.warmup_rounds + args.rounds
  sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

  class Timer(TrainingProcessCallback):
    """Starts the clock after the warm-up rounds; stops training after ``--max-seconds``."""

    def __init__(self):
      self.start = self.end = None
      self.timed = self.drawn0 = self.drawn1 = 0

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      sync()
      now = time.perf_counter()
      done = central_iteration + 1
      if done == args.warmup_rounds:
        self.start, self.drawn0 = now, drawn[0]
      elif done > args.warmup_rounds:
        self.end, self.timed, self.drawn1 = now, done - args.warmup_rounds, drawn[0]
      over = (self.start is not None and self.timed > 0 and args.max_seconds > 0
              and now - self.start >= args.max_seconds)
      if args.workers > 1:  # every worker must stop at the same round, or the rest wait forever
        flag = torch.tensor([float(over)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        over = bool(flag.item() > 0)
      return over, Metrics()

  # The cohort's users are drawn lazily, one round at a time (FederatedDataset.get_cohort), so
  # the count between the timer's marks is the timed rounds' examples.
  drawn = getattr(train, "examples_drawn", [0])
  timer = Timer()
  t0 = time.perf_counter()
  FederatedAveraging().run(
      algorithm_params=NNAlgorithmParams(central_num_iterations=total_rounds,
                                         evaluation_frequency=total_rounds + 1,
                                         train_cohort_size=args.cohort, val_cohort_size=0),
      backend=backend, model=model,
      model_train_params=NNTrainHyperParams(local_learning_rate=args.client_lr,
                                            local_num_epochs=1,
                                            local_batch_size=args.batch_size),
      model_eval_params=NNEvalHyperParams(local_batch_size=args.batch_size),
      callbacks=[timer], send_metrics_to_platform=False)
  wall = time.perf_counter() - t0
  if timer.timed < 1:
    raise SystemExit("pfl peer: no timed round completed")
  seconds = timer.end - timer.start
  flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in net.parameters()])
  row = {
      "engine": "pfl", "pfl": _version("pfl"), "torch": torch.__version__,
      "device": args.device, "device_name": (torch.cuda.get_device_name() if
                                             args.device == "cuda" else "cpu"),
      "torch_threads": torch.get_num_threads(), "model": model_name, "cohort": args.cohort,
      "num_clients": args.num_clients, "batch_size": args.batch_size, "params": num_params,
      "rounds": timer.timed, "warmup_rounds": args.warmup_rounds, "seconds": seconds,
      "rounds_per_s": timer.timed / seconds,
      "client_updates_per_s": timer.timed * args.cohort / seconds,
      # Examples the timed rounds trained on (1 local epoch): client sizes vary, so this is the
      # work-normalised figure; None when this process draws a share of the cohort (torchrun).
      # With --workers each worker counts its own share and worker 0 adds them up.
      "examples_timed": timer.drawn1 - timer.drawn0,
      "examples_per_s": ((timer.drawn1 - timer.drawn0) / seconds
                         if int(os.environ.get("WORLD_SIZE", "1")) == 1 else None),
      "workers": args.workers, "worker_rank": int(os.environ.get("PFL_WORKER_RANK", "0")),
      "warmup_plus_timed_wall_s": wall,
      "param_checksum": float(flat.sum()), "params_finite": bool(torch.isfinite(flat).all()),
      "load_avg_1min": os.getloadavg()[0], "time": time.time(), "cpu": common.host_cpu(),
  }
  if getattr(args, "worker_procs", None):
    row = combine_workers(row, collect_workers(args.worker_procs))
  print(json.dumps(row), flush=True)
  return row


def _version(dist: str) -> str:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version(dist)
  except PackageNotFoundError:
    return "unknown"
