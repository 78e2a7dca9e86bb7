"""pfl-research (Apple's ``pfl``) FedAvg on pfl's CIFAR-10 setup, the peer of ``benchmarks.run``.

Runs in its own virtualenv (``python3 -m venv V && V/bin/pip install pfl torch``; see
benchmarks/peers/README.md) and uses only pfl's public API: an in-memory ``FederatedDataset`` of
per-user ``Dataset`` slices, a ``PyTorchModel`` of pfl's own CIFAR-10 benchmark model
``simple_cnn`` (pfl-research benchmarks/model/pytorch/cnn.py: conv32-conv64 valid, max-pool,
dropout 0.25, dense128, dropout 0.5, dense10; 1,626,442 parameters), ``FederatedAveraging`` on a
``SimulatedBackend`` with central SGD lr 1.0, local SGD lr 0.1, 1 local epoch, batch 10, cohort 50,
``WeightByUser`` (pfl's baseline config), evaluation off.

Data: ``benchmarks/peers/common.py: cifar_shaped``, the generator ``benchmarks.run`` uses too
(1000 users x 50 images 32x32x3, 10 classes), held on ``--device`` as pfl's own
benchmarks hold theirs.

Timing: ``--warmup-rounds`` rounds first (CUDA/cuDNN set-up, allocator), then up to ``--rounds``
rounds timed, stopped early (by a pfl callback) once ``--max-seconds`` have passed. Prints one
JSON line: engine, device, torch threads, rounds, seconds, rounds/s, client-updates/s,
a checksum of the final parameters and whether they are all finite.

Usage:
  V/bin/python benchmarks/peers/pfl_fedavg.py --device cpu --torch-threads 2 --rounds 20
  python3 benchmarks/peers/pfl_fedavg.py --device cuda --rounds 1500 --max-seconds 120
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/peers/common.py: numpy-only data, as benchmarks.run's)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--rounds", type=int, default=20, help="timed rounds (at most)")
  ap.add_argument("--warmup-rounds", type=int, default=2)
  ap.add_argument("--max-seconds", type=float, default=0.0,
                  help="stop the timed block after this many seconds (0: no limit)")
  ap.add_argument("--cohort", type=int, default=50)
  ap.add_argument("--num-clients", type=int, default=1000)
  ap.add_argument("--per-client", type=int, default=50)
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  for name in ("rounds", "cohort", "num_clients", "per_client", "batch_size"):
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


def simple_cnn(torch, input_shape=(32, 32, 3), num_outputs=10):
  """pfl-research's ``simple_cnn`` (benchmarks/model/pytorch/cnn.py), with its loss/metrics."""
  nn = torch.nn

  class ToNCHW(nn.Module):
    def forward(self, x):
      return x.permute(0, 3, 1, 2)

  flat = ((input_shape[0] - 4) // 2) ** 2 * 64
  model = nn.Sequential(
      ToNCHW(), nn.Conv2d(input_shape[-1], 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
      nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(),
      nn.Dropout(0.5), nn.Linear(128, num_outputs))
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(m.weight)

  from pfl.metrics import Weighted

  def loss(self, inputs, targets, eval=False):
    self.eval() if eval else self.train()
    return nn.functional.cross_entropy(self(inputs), targets.long())

  @torch.no_grad()
  def metrics(self, inputs, targets, eval=True):
    self.eval() if eval else self.train()
    logits = self(inputs)
    n = len(inputs)
    return {"loss": Weighted(nn.functional.cross_entropy(logits, targets.long(),
                                                         reduction="sum").item(), n),
            "accuracy": Weighted((logits.argmax(-1) == targets.long()).sum().item(), n)}

  import types
  model.loss = types.MethodType(loss, model)
  model.metrics = types.MethodType(metrics, model)
  return model


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ["PFL_PYTORCH_DEVICE"] = args.device  # pfl reads it when it places models and data
  try:
    import torch
  except ImportError as e:
    raise SystemExit(f"pfl peer: torch is not installed in {sys.executable} ({e}); build the pfl "
                     "virtualenv: python3 -m venv V && V/bin/pip install pfl torch") from e
  try:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
  except ImportError as e:
    raise SystemExit(f"pfl peer: pfl is not installed in {sys.executable} ({e}); build the pfl "
                     "virtualenv: python3 -m venv V && V/bin/pip install pfl torch") from e
  if args.device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("pfl peer: --device cuda but torch sees no CUDA device "
                     f"(torch {torch.__version__}); use --device cpu")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)  # noqa: NPY002 (pfl's samplers draw from the global numpy RNG)
  device = torch.device(args.device)

  x, y, _ = common.cifar_shaped(args.num_clients, args.per_client, args.seed)
  xt = torch.from_numpy(x).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  per = args.per_client
  users = {u: (xt[u * per:(u + 1) * per], yt[u * per:(u + 1) * per])
           for u in range(args.num_clients)}
  train = FederatedDataset(lambda u: Dataset(raw_data=list(users[u]), user_id=u),
                           get_user_sampler("random", list(range(args.num_clients))))

  net = simple_cnn(torch)
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
      self.timed = 0

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      sync()
      now = time.perf_counter()
      done = central_iteration + 1
      if done == args.warmup_rounds:
        self.start = now
      elif done > args.warmup_rounds:
        self.end, self.timed = now, done - args.warmup_rounds
      over = (self.start is not None and self.timed > 0 and args.max_seconds > 0
              and now - self.start >= args.max_seconds)
      return over, Metrics()

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
      "torch_threads": torch.get_num_threads(), "model": "cifar", "cohort": args.cohort,
      "num_clients": args.num_clients, "batch_size": args.batch_size, "params": num_params,
      "rounds": timer.timed, "warmup_rounds": args.warmup_rounds, "seconds": seconds,
      "rounds_per_s": timer.timed / seconds,
      "client_updates_per_s": timer.timed * args.cohort / seconds,
      "warmup_plus_timed_wall_s": wall,
      "param_checksum": float(flat.sum()), "params_finite": bool(torch.isfinite(flat).all()),
      "load_avg_1min": os.getloadavg()[0], "time": time.time(),
  }
  print(json.dumps(row), flush=True)
  return row


def _version(dist: str) -> str:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version(dist)
  except PackageNotFoundError:
    return "unknown"


if __name__ == "__main__":
  main()
