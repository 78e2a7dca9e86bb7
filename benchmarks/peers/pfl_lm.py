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

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/peers/common.py: numpy-only data, as benchmarks.run's)
import pfl_common  # noqa: E402  (what both pfl peers share)


def parse_args(argv=None):
  """The flags (``pfl_common.parse_args``) and ``--model``; pfl's LM config: cohort 400,
  batch 16.

  Returns:
    the parsed ``argparse.Namespace``.
  """
  def extra(ap):
    ap.add_argument("--model", default="stackoverflow-transformer",
                    choices=["stackoverflow-transformer"])
    return []

  return pfl_common.parse_args(__doc__.split("\n")[0], argv, cohort=400, num_clients=3400,
                               batch_size=16, extra=extra)


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
  torch, device = pfl_common.start(args)
  x, y, ids = common.stackoverflow_shaped(args.num_clients, args.seed)
  xt = torch.from_numpy(x.astype(np.int64)).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  bounds = np.searchsorted(ids, np.arange(args.num_clients + 1))
  users = {u: (xt[bounds[u]:bounds[u + 1]], yt[bounds[u]:bounds[u + 1]])
           for u in range(args.num_clients)}
  train = pfl_common.federated(users)

  net = lm_transformer(torch, vocab_size=common.LM_DATA['stackoverflow']['vocab'] + 4,
                       max_len=x.shape[1]).to(device)
  return pfl_common.train_and_time(args, torch, net, train, args.model)


if __name__ == "__main__":
  main()
