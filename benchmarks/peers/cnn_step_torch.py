"""One local step of pfl-research's ``simple_cnn`` in torch (the peer's kernel), per layer too.

The torch side of the CNN kernel check in docs/benchmarks.md: one SGD step (forward, mean
cross-entropy, backward, update) of ``pfl_fedavg.simple_cnn`` on one resident batch, medians of
``--reps`` calls after a warm-up, for the EMNIST shape (``--workload cnn``: 28x28x1, 62 classes,
batch 20) or pfl's CIFAR shape (``--workload cifar``: 32x32x3, 10 classes, batch 10). With
``--eval-mode`` the dropout layers are off (the JAX ceiling's step, ``benchmarks.ceiling``, runs
the workload's model with its dropout on, as the engine does). ``--layers`` also times each
layer's forward + backward alone, like ``benchmarks.ceiling --cnn-layers``.

Usage (pfl's venv, from the repository root):
  /work/venvs/pfl/bin/python benchmarks/peers/cnn_step_torch.py --workload cnn --torch-threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (host_cpu)
import pfl_fedavg  # noqa: E402  (pfl-research's simple_cnn, as the peer runs it)

SHAPES = {"cnn": ((28, 28, 1), 62, 20), "cifar": ((32, 32, 3), 10, 10)}


def _median_ms(f, reps):
  f()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f()
    times.append(1e3 * (time.perf_counter() - t))
  return float(np.median(times))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", choices=list(SHAPES), default="cnn")
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--reps", type=int, default=50)
  ap.add_argument("--batch", type=int, default=0, help="0 = the workload's own")
  ap.add_argument("--eval-mode", action="store_true", help="dropout off")
  ap.add_argument("--layers", action="store_true", help="also time each layer alone")
  args = ap.parse_args(argv)
  if args.torch_threads < 1 or args.reps < 1 or args.batch < 0:
    ap.error("--torch-threads and --reps must be >= 1, --batch >= 0")
  import torch

  torch.set_num_threads(args.torch_threads)
  shape, classes, bsz = SHAPES[args.workload]
  bsz = args.batch or bsz
  model = pfl_fedavg.simple_cnn(torch, shape, classes)
  model.train(not args.eval_mode)
  rng = np.random.default_rng(0)
  x = torch.tensor(rng.random((bsz, *shape), np.float32))
  y = torch.tensor(rng.integers(0, classes, bsz))
  opt = torch.optim.SGD(model.parameters(), lr=0.1)

  def step():
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  row = {"engine": "torch", "workload": args.workload, "batch": bsz,
         "torch_threads": args.torch_threads, "dropout": not args.eval_mode,
         "torch": torch.__version__, "cpu": common.host_cpu(),
         "load_avg_1min": os.getloadavg()[0]}
  row["step_ms"] = _median_ms(step, args.reps)
  row["examples_per_s"] = 1e3 * bsz / row["step_ms"]
  if args.layers:
    h, w, c = shape
    nn = torch.nn
    layers = {
        "conv1": (nn.Conv2d(c, 32, 3), (bsz, c, h, w), False),
        "conv2": (nn.Conv2d(32, 64, 3), (bsz, 32, h - 2, w - 2), True),
        "maxpool": (nn.MaxPool2d(2), (bsz, 64, h - 4, w - 4), True),
        "dense1": (nn.Linear(((h - 4) // 2) ** 2 * 64, 128), (bsz, ((h - 4) // 2) ** 2 * 64), True),
        "dense2": (nn.Linear(128, classes), (bsz, 128), True),
    }
    row["layers_ms"] = {}
    for name, (mod, in_shape, input_grad) in layers.items():
      inp = torch.randn(in_shape, requires_grad=input_grad)

      def f(mod=mod, inp=inp):
        mod.zero_grad()
        torch.sin(torch.relu(mod(inp))).sum().backward()

      row["layers_ms"][name] = _median_ms(f, args.reps)
  print(json.dumps(row))
  return row


if __name__ == "__main__":
  main()
