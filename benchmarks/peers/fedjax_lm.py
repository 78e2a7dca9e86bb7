"""Throughput of FedJAX FedAvg on the language-model workloads (``stackoverflow``, ``shakespeare``).

Own code; it calls only FedJAX's public API (fedjax 0.0.17): fedjax.InMemoryFederatedData,
fedjax.models.stackoverflow.create_lstm_model (Reddi et al. 2021: embed 96, LSTM 670, projection
96, 10,000 words + 4 ids; FedJAX has no Stack Overflow transformer),
fedjax.models.shakespeare.create_lstm_model (McMahan et al. 2017: embed 8, 2 x LSTM 256, 86
characters + 4 ids), fedjax.model_grad, fedjax.optimizers.sgd, fedjax.ShuffleRepeatBatchHParams,
fedjax.algorithms.fed_avg.federated_averaging, fedjax.client_samplers.UniformGetClientSampler.

Data: ``benchmarks/peers/common.py: lm_shaped`` (byte-identical to what fedjax_sim trains on):
x/y int32 ``[n, seq_len]``. FedJAX's default for-each-client backend (jit: a Python loop over
clients, one jitted call per batch). Round time = sampler.sample() + algorithm.apply() +
block_until_ready(params); the first round (compilation) is untimed. One JSON line on stdout,
the same keys ``benchmarks/side_by_side.py`` reads from ``fedjax_fedavg.py``.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (numpy-only data shared with benchmarks.workloads)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="stackoverflow", choices=sorted(common.LM_DATA))
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--num_clients", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=None)
  p.add_argument("--client_lr", type=float, default=0.1)
  p.add_argument("--server_lr", type=float, default=1.0)
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (max)")
  p.add_argument("--max_seconds", type=float, default=60.0)
  p.add_argument("--warmup_cohort", type=int, default=0, help="accepted; warm-up uses --cohort")
  p.add_argument("--backend", default="jit", choices=["jit"])
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import fedjax
  import fedjax.version
  import jax

  x, y, ids = common.lm_shaped(args.model, args.num_clients, seed=args.seed)
  bounds = np.searchsorted(ids, np.arange(ids[-1] + 2))
  data = {str(c).encode(): {"x": x[bounds[c]:bounds[c + 1]], "y": y[bounds[c]:bounds[c + 1]]}
          for c in range(ids[-1] + 1)}
  fd = fedjax.InMemoryFederatedData(data)
  if args.model == "stackoverflow":
    model = fedjax.models.stackoverflow.create_lstm_model()
  else:
    model = fedjax.models.shakespeare.create_lstm_model()
  batch = args.batch_size or common.WORKLOADS[args.model][1]
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(learning_rate=args.client_lr),
      fedjax.optimizers.sgd(learning_rate=args.server_lr),
      fedjax.ShuffleRepeatBatchHParams(batch_size=batch, num_epochs=1, seed=args.seed))
  params = model.init(jax.random.PRNGKey(args.seed))
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  state = algorithm.init(params)
  sampler = fedjax.client_samplers.UniformGetClientSampler(fd, num_clients=args.cohort,
                                                           seed=args.seed)
  times, examples, warm = [], 0, None
  while True:
    t = time.perf_counter()
    clients = sampler.sample()
    n = sum(len(c[1]) for c in clients)
    state, _ = algorithm.apply(state, clients)
    jax.block_until_ready(state.params)
    dt = time.perf_counter() - t
    if warm is None:
      warm = dt
      continue
    times.append(dt)
    examples += n
    if len(times) >= args.rounds or sum(times) >= args.max_seconds:
      break
  total = sum(times)
  finite = all(bool(np.all(np.isfinite(np.asarray(p))))
               for p in jax.tree_util.tree_leaves(state.params))
  print(json.dumps({
      "tool": "fedjax", "fedjax": fedjax.version.__version__, "jax": jax.__version__,
      "python": platform.python_version(), "device": jax.devices()[0].platform,
      "backend": args.backend, "model": args.model, "num_params": num_params,
      "num_clients": int(ids[-1] + 1), "cohort": args.cohort, "batch_size": batch,
      "warmup_round_s": round(warm, 3), "timed_rounds": len(times),
      "rounds_per_s": len(times) / total, "client_updates_per_s": args.cohort * len(times) / total,
      "examples_per_s": examples / total, "params_finite": finite,
      "loadavg_end": open("/proc/loadavg").read().split()[:3],
  }))


if __name__ == "__main__":
  sys.exit(main())
