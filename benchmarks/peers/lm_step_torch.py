"""One local step of pfl-research's Stack Overflow transformer in torch (the peer's kernel).

The torch side of the kernel check in docs/benchmarks.md: one SGD step (forward, plain mean
cross-entropy, backward, update) of ``pfl_lm.lm_transformer`` on a [16, 20] batch, and a
no-grad forward, medians of ``--reps`` calls after one warm-up. The JAX side is the ``bare``
variant of ``python -m benchmarks.lm_step_breakdown`` (the same step without dropout); torch's
module here is in train mode, so its dropout is on.

Usage (pfl's venv, from the repository root):
  /work/venvs/pfl/bin/python benchmarks/peers/lm_step_torch.py --torch-threads 2
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
import pfl_lm  # noqa: E402  (pfl-research's LMTransformer, as the peer runs it)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args(argv)
  if args.torch_threads < 1 or args.reps < 1:
    ap.error("--torch-threads and --reps must be >= 1")
  import torch

  torch.set_num_threads(args.torch_threads)
  model = pfl_lm.lm_transformer(torch)
  x = torch.tensor(np.random.default_rng(0).integers(1, 10004, (16, 20)))
  opt = torch.optim.SGD(model.parameters(), lr=0.1)

  def fwd():
    with torch.no_grad():
      model(x)

  def step():
    opt.zero_grad()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()

  row = {"engine": "torch", "model": "stackoverflow-transformer", "batch": [16, 20],
         "torch_threads": args.torch_threads, "torch": torch.__version__, "cpu": common.host_cpu(),
         "load_avg_1min": os.getloadavg()[0]}
  for name, f in (("fwd_ms", fwd), ("step_ms", step)):
    f()
    times = []
    for _ in range(args.reps):
      t = time.perf_counter()
      f()
      times.append(1e3 * (time.perf_counter() - t))
    row[name] = float(np.median(times))
  print(json.dumps(row))
  return row


if __name__ == "__main__":
  main()
