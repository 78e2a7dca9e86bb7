"""pfl-research FedAvg on pfl's Stack Overflow transformer, the LM peer of ``benchmarks.run``.

Runs in the pfl virtualenv (``python3 -m venv V && V/bin/pip install pfl torch``) and uses only
pfl's public API, as ``pfl_fedavg.py`` does for CIFAR: an in-memory ``FederatedDataset`` of
per-user ``Dataset`` slices, a ``PyTorchModel`` of pfl-research's ``LMTransformer``
(apple/pfl-research benchmarks/model/pytorch/transformer.py with
benchmarks/lm/configs/baseline.yaml: embedding = hidden 96, 8 heads, 3 layers, feed-forward
1536, dropout 0.1, sinusoidal positions, causal mask, output tied to the embedding; 1,962,912
parameters at 10,004 ids), ``FederatedAveraging`` on a ``SimulatedBackend`` with ``WeightByUser``,
1 local epoch, batch 16 (pfl's config), evaluation off. Loss: token cross-entropy ignoring pad 0.

Data: ``benchmarks/peers/common.py: stackoverflow_shaped`` (what ``benchmarks.run``'s
``stackoverflow-transformer`` trains on). Timing and the JSON line as ``pfl_fedavg.py``.

Usage:
  V/bin/python benchmarks/peers/pfl_lm.py --device cpu --torch-threads 2 --rounds 3 --cohort 10
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
  ap.add_argument("--model", default="stackoverflow-transformer",
                  choices=["stackoverflow-transformer"])
  ap.add_argument("--cohort", type=int, default=400)
  ap.add_argument("--num-clients", type=int, default=3400)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  for name in ("rounds", "cohort", "num_clients", "batch_size"):
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


def lm_transformer(torch, vocab_size=10004, max_len=20, d=96, heads=8, ff=1536, layers=3,
                   dropout=0.1, pad=0):
  """pfl-research's ``LMTransformer`` (benchmarks/model/pytorch/transformer.py), loss/metrics."""
  import math
  nn = torch.nn

  pos = np.arange(max_len)[:, None]
  i = np.arange(d)[None, :]
  angle = pos / np.power(10000.0, (2 * (i // 2)) / d)
  pe = torch.as_tensor(np.where(i % 2 == 0, np.sin(angle), np.cos(angle)), dtype=torch.float32)

  class LMTransformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.emb = nn.Embedding(vocab_size, d, padding_idx=pad)
      self.register_buffer("pe", pe)
      self.enc = nn.TransformerEncoder(
          nn.TransformerEncoderLayer(d, heads, ff, dropout, batch_first=True), layers)
      self.emb.weight.data.uniform_(-0.05, 0.05)

    def forward(self, x):
      t = x.size(1)
      mask = ~torch.tril(torch.ones((t, t), dtype=torch.bool, device=x.device))
      h = self.emb(x) * math.sqrt(d) + self.pe[:t].unsqueeze(0)
      return self.enc(h, mask) @ self.emb.weight.t()

  from pfl.metrics import Weighted

  def xent(logits, targets, reduction):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                       targets.reshape(-1).long(), ignore_index=pad,
                                       reduction=reduction)

  def loss(self, inputs, targets, eval=False):
    self.eval() if eval else self.train()
    return xent(self(inputs.long()), targets, "mean")

  @torch.no_grad()
  def metrics(self, inputs, targets, eval=True):
    self.eval() if eval else self.train()
    logits = self(inputs.long())
    n = int((targets != pad).sum())
    return {"loss": Weighted(xent(logits, targets, "sum").item(), n)}

  import types
  model = LMTransformer()
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

  x, y, ids = common.stackoverflow_shaped(args.num_clients, args.seed)
  xt = torch.from_numpy(x.astype(np.int64)).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  bounds = np.searchsorted(ids, np.arange(args.num_clients + 1))
  users = {u: (xt[bounds[u]:bounds[u + 1]], yt[bounds[u]:bounds[u + 1]])
           for u in range(args.num_clients)}
  train = FederatedDataset(lambda u: Dataset(raw_data=list(users[u]), user_id=u),
                           get_user_sampler("random", list(range(args.num_clients))))

  net = lm_transformer(torch, vocab_size=common.LM_DATA['stackoverflow']['vocab'] + 4,
                       max_len=x.shape[1]).to(device)
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
      "torch_threads": torch.get_num_threads(), "model": args.model, "cohort": args.cohort,
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
