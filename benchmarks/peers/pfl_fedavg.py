"""pfl-research (Apple's ``pfl``) FedAvg on pfl's CIFAR-10 setup, the peer of ``benchmarks.run``.

``--model cnn`` runs the workload ``cnn`` instead: the EMNIST CNN of Reddi et al. 2021
(``fs.zoo.EmnistCNN``), which is pfl's ``simple_cnn`` built for 28x28x1 inputs and 62 classes
(the same layers; 1,206,590 parameters), on ``common.emnist_shaped``'s 3400 users of lognormal
sizes, batch 20. pfl's benchmarks define no EMNIST model; this is the model a pfl user would
write for the workload, trained through the same public API.

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

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/peers/common.py: numpy-only data, as benchmarks.run's)
import pfl_common  # noqa: E402  (what both pfl peers share)


def parse_args(argv=None):
  """The flags (``pfl_common.parse_args``) and ``--per-client`` images per user.

  Returns:
    the parsed ``argparse.Namespace``.
  """
  def extra(ap):
    ap.add_argument("--model", choices=("cifar", "cnn"), default="cifar",
                    help="cifar: pfl's CIFAR-10 setup; cnn: the EMNIST CNN workload")
    ap.add_argument("--per-client", type=int, default=50, help="cifar: images per user")
    return ["per_client"]

  return pfl_common.parse_args(__doc__.split("\n")[0], argv, cohort=50, num_clients=1000,
                               batch_size=10, extra=extra)


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
  if args.model == "cnn":
    x, y, ids = common.emnist_shaped(args.num_clients, args.seed)
    net = simple_cnn(torch, input_shape=(28, 28, 1), num_outputs=62)
  else:
    x, y, ids = common.cifar_shaped(args.num_clients, args.per_client, args.seed)
    net = simple_cnn(torch)
  xt = torch.from_numpy(x).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  bounds = np.searchsorted(ids, np.arange(args.num_clients + 1))  # ids are sorted by user
  users = {u: (xt[bounds[u]:bounds[u + 1]], yt[bounds[u]:bounds[u + 1]])
           for u in range(args.num_clients)}
  train = pfl_common.federated(users)
  return pfl_common.train_and_time(args, torch, net, train, args.model)


if __name__ == "__main__":
  main()
