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
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/peers/common.py: numpy-only data, as benchmarks.run's)
import pfl_common  # noqa: E402  (what both pfl peers share)


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
  torch, device = pfl_common.start(args)
  x, y, _ = common.cifar_shaped(args.num_clients, args.per_client, args.seed)
  xt = torch.from_numpy(x).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  per = args.per_client
  users = {u: (xt[u * per:(u + 1) * per], yt[u * per:(u + 1) * per])
           for u in range(args.num_clients)}
  train = pfl_common.federated(users)

  net = simple_cnn(torch)
  return pfl_common.train_and_time(args, torch, net, train, "cifar")


if __name__ == "__main__":
  main()
