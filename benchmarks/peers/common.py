"""What every peer script shares with ``benchmarks.run``: the workloads' data and models.

Only NumPy at import time, so each peer's virtualenv can import it (``benchmarks.run`` imports
the data generators from here, so every engine trains on byte-identical data). The PyTorch twins
of ``benchmarks.run``'s flax models are built by :func:`torch_model`, which imports torch lazily.

Workloads (all FedAvg, 1 local epoch, client SGD 0.1, server SGD 1.0):
  logistic, dense, cnn: :func:`emnist_shaped` (3400 lognormal clients, 28x28x1, 62 classes),
    batch 20; cnn is the EMNIST CNN of Reddi et al. 2021 (``fs.zoo.EmnistCNN``).
  cifar: :func:`cifar_shaped` (1000 users x 50 images 32x32x3, 10 classes), batch 10, with
    pfl-research's ``simple_cnn`` (the same conv32-conv64-pool-dense128 stack, 1,626,442
    parameters on 32x32x3).
"""

from __future__ import annotations

import math

import numpy as np

#: workload -> (data generator name, batch size, number of classes)
WORKLOADS = {
    "logistic": ("emnist", 20, 62),
    "dense": ("emnist", 20, 62),
    "cnn": ("emnist", 20, 62),
    "cifar": ("cifar", 10, 10),
}


def emnist_shaped(num_clients=3400, seed=0):
  """The fixed synthetic workload: lognormal client sizes, 28x28x1 inputs, 62 classes."""
  rng = np.random.default_rng(seed=seed)
  mu = math.log(100) - 0.6**2 / 2
  sizes = np.clip(np.round(rng.lognormal(mu, 0.6, num_clients)), 5, 2000).astype(np.int64)
  total = int(sizes.sum())
  x = rng.random((total, 28, 28, 1), np.float32)
  y = rng.integers(0, 62, total, np.int32)
  ids = np.repeat(np.arange(num_clients), sizes)
  return x, y, ids


def cifar_shaped(num_clients=1000, per_client=50, seed=0):
  """pfl-research's CIFAR-10 setup, synthetic: 1000 users x 50 images 32x32x3, 10 classes."""
  rng = np.random.default_rng(seed=seed)
  total = num_clients * per_client
  x = rng.random((total, 32, 32, 3), np.float32)
  y = rng.integers(0, 10, total, np.int32)
  return x, y, np.repeat(np.arange(num_clients), per_client)


def workload_data(model: str, num_clients: int, seed: int = 0):
  """``(x, y, client_ids)`` of workload ``model`` (client ids sorted, as the generators give)."""
  kind = WORKLOADS[model][0]
  return (emnist_shaped if kind == "emnist" else cifar_shaped)(num_clients, seed=seed)


def torch_model(model: str):
  """The PyTorch twin of ``benchmarks.run``'s flax model for ``model`` (NCHW input).

  Same layers, shapes and parameter count; initialisers are PyTorch's defaults (they change
  the values, not the work a step does).
  """
  import torch.nn as tnn

  classes = WORKLOADS[model][2]
  if model == "logistic":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, classes))
  if model == "dense":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 200), tnn.ReLU(), tnn.Linear(200, 200),
                          tnn.ReLU(), tnn.Linear(200, classes))
  channels, side = (1, 28) if model == "cnn" else (3, 32)
  flat = 64 * ((side - 4) // 2) ** 2
  return tnn.Sequential(
      tnn.Conv2d(channels, 32, 3), tnn.ReLU(), tnn.Conv2d(32, 64, 3), tnn.ReLU(),
      tnn.MaxPool2d(2), tnn.Dropout(0.25), tnn.Flatten(), tnn.Linear(flat, 128), tnn.ReLU(),
      tnn.Dropout(0.5), tnn.Linear(128, classes))


def num_params(module) -> int:
  """Parameter count of a torch module."""
  return sum(p.numel() for p in module.parameters())
