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
  stackoverflow: :func:`lm_shaped` ``("stackoverflow")``: FedJAX's Stack Overflow next-word
    setup (sentences of 20 tokens, 10,000 words + 4 special ids), batch 16.
  shakespeare: :func:`lm_shaped` ``("shakespeare")``: FedJAX/TFF's Shakespeare next-character
    setup (snippets of 80 characters, 86 characters + 4 special ids), batch 4.
"""

from __future__ import annotations

import math
import platform

import numpy as np

#: workload -> (data generator name, batch size, number of classes)
WORKLOADS = {
    "logistic": ("emnist", 20, 62),
    "dense": ("emnist", 20, 62),
    "cnn": ("emnist", 20, 62),
    "cifar": ("cifar", 10, 10),
    "stackoverflow": ("stackoverflow", 16, 10004),
    "shakespeare": ("shakespeare", 4, 90),
}

#: Language-model data: sequence length, vocabulary (without the 4 special ids), population,
#: and the client-size distribution (examples per client, lognormal, clipped).
#: Stack Overflow (TFF ``tff.simulation.datasets.stackoverflow``, the data FedJAX loads): 342,477
#: train clients holding 135,818,730 sentences, a mean of 396.6 per client; FedJAX/TFF truncate
#: sentences to 20 tokens. Shakespeare (TFF ``shakespeare``, LEAF): 715 clients (speaking roles)
#: holding 16,068 train lines, a mean of 22.5; FedJAX/TFF cut the text into 80-character
#: snippets. The means come from those published counts; the per-client histograms are not
#: available offline, so the spread (lognormal sigma) is our assumption, and clients are clipped
#: to ``max_examples`` (Stack Overflow: 256 sentences, the per-client cap of Reddi et al. 2021's
#: Stack Overflow experiments) so a round's work stays bounded.
LM_DATA = {
    "stackoverflow": {"seq_len": 20, "vocab": 10000, "num_clients": 342_477, "mean": 396.6,
                      "sigma": 1.0, "min_examples": 1, "max_examples": 256},
    "shakespeare": {"seq_len": 80, "vocab": 86, "num_clients": 715, "mean": 22.5,
                    "sigma": 1.0, "min_examples": 1, "max_examples": 200},
}



def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
  """This machine's CPU as one string: its model name, family and model numbers, and the vector
  and matrix extensions that decide the kernels' speed (AVX-512, AMX).

  Every benchmark row records it: the "2-core CPU" these benchmarks run on has been more than
  one kind of processor (an Intel part with AMX when issue 22 was filed, an AMD EPYC without it
  in a later session), and kernel ratios such as XLA:CPU's convolution against oneDNN's differ
  between them. A ratio is only ever quoted from one sitting, so its rows carry their CPU.

  Returns:
    e.g. ``"AMD EPYC (family 25, model 17; avx512f, no amx)"``; ``platform.processor()`` (or
    the machine type) where ``cpuinfo`` cannot be read.

  Example:
    >>> isinstance(host_cpu(), str)
    True
  """
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  fields = {}
  for line in text.split("\n\n")[0].splitlines():  # the first processor's block
    key, sep, value = line.partition(":")
    if sep:
      fields[key.strip()] = value.strip()
  flags = set(fields.get("flags", "").split())
  name = fields.get("model name") or platform.processor() or platform.machine()
  numbers = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)
  numbers = numbers.replace("cpu family", "family")
  ext = ", ".join(["avx512f" if "avx512f" in flags else "no avx512f",
                   "amx" if any(f.startswith("amx") for f in flags) else "no amx"])
  return f"{name} ({numbers}; {ext})" if numbers else f"{name} ({ext})"

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


def lm_shaped(kind: str, num_clients: int | None = None, seed: int = 0):
  """Synthetic next-token data shaped like ``kind`` (a key of :data:`LM_DATA`).

  Each example is a sequence of length ``seq_len``: ``x = [BOS, t_1, ..., t_{L-1}]`` and
  ``y = [t_1, ..., t_{L-1}, EOS]``, padded with 0 after the true length ``L`` (uniform in
  ``1..seq_len``); tokens are uniform over the vocabulary ids (PAD 0, BOS 1, EOS 2, words from
  3), FedJAX's id layout. Client sizes follow :data:`LM_DATA` (lognormal with the published mean).

  Returns:
    ``(x, y, client_ids)``: int32 ``[N, seq_len]`` twice and the sorted client id per example.
  """
  d = LM_DATA[kind]
  n = d["num_clients"] if num_clients is None else num_clients
  rng = np.random.default_rng(seed=seed)
  mu = math.log(d["mean"]) - d["sigma"] ** 2 / 2
  sizes = np.clip(np.round(rng.lognormal(mu, d["sigma"], n)), d["min_examples"],
                  d["max_examples"]).astype(np.int64)
  total, t = int(sizes.sum()), d["seq_len"]
  tokens = rng.integers(3, d["vocab"] + 3, (total, t), np.int32)
  length = rng.integers(1, t + 1, total)
  pos = np.arange(t)[None, :]
  y = np.where(pos < length[:, None] - 1, tokens, 0).astype(np.int32)
  y[np.arange(total), length - 1] = 2  # EOS
  x = np.zeros((total, t), np.int32)
  x[:, 0] = 1  # BOS
  x[:, 1:] = np.where(pos[:, 1:] < length[:, None], tokens[:, :-1], 0)
  return x, y, np.repeat(np.arange(n), sizes)


def stackoverflow_shaped(num_clients=None, seed=0):
  """:func:`lm_shaped` for Stack Overflow (20 tokens, 10,004 ids)."""
  return lm_shaped("stackoverflow", num_clients, seed)


def shakespeare_shaped(num_clients=None, seed=0):
  """:func:`lm_shaped` for Shakespeare (80 characters, 90 ids)."""
  return lm_shaped("shakespeare", num_clients, seed)


GENERATORS = {"emnist": emnist_shaped, "cifar": cifar_shaped,
              "stackoverflow": stackoverflow_shaped, "shakespeare": shakespeare_shaped}


def workload_data(model: str, num_clients: int, seed: int = 0):
  """``(x, y, client_ids)`` of workload ``model`` (client ids sorted, as the generators give)."""
  return GENERATORS[WORKLOADS[model][0]](num_clients, seed=seed)


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
