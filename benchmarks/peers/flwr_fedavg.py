"""Throughput of Flower's simulation engine (Ray) on ``benchmarks.run``'s workloads, FedAvg.

Own code; only Flower's public API (flwr 1.x): ``flwr.simulation.run_simulation`` with a
``flwr.serverapp.ServerApp`` running ``flwr.serverapp.strategy.FedAvg`` and a
``flwr.clientapp.ClientApp`` whose ``@train`` function trains a PyTorch model, one virtual
SuperNode per client. Data and models are ``benchmarks/peers/common.py``'s (the same generators
and architectures as ``benchmarks.run``); one local epoch of minibatch SGD (``--client_lr``,
``--batch_size``, shuffled), FedAvg weighted by example counts (= server SGD with lr 1.0, the
only server learning rate this peer accepts), federated evaluation off (``fraction_evaluate=0``).

Timing: a round is ``configure_train`` (sampling) to the end of ``aggregate_train``; the first
``--warmup`` rounds (Ray actor start, torch warm-up) are not timed, and rounds that start after
``--max_seconds`` of timed rounds are skipped (no clients). Setting: ``--num_cpus`` is Ray's
``num_cpus`` per client (so ``cpu_count / num_cpus`` clients run at once), and each client runs
torch with that many threads.

Prints one JSON line (``client_updates_per_s``, ``rounds_per_s``, ``params_finite``, ...) like
``fedjax_fedavg.py``.

Run with the Flower venv of ``benchmarks/peers/setup.sh``::

    /work/venvs/flwr/bin/python benchmarks/peers/flwr_fedavg.py --model dense --cohort 10
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/peers/common.py: numpy-only data and torch models)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="dense", choices=sorted(common.WORKLOADS))
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--num_clients", type=int, default=0, help="0: the workload's own")
  p.add_argument("--batch_size", type=int, default=0, help="0: the workload's own")
  p.add_argument("--client_lr", type=float, default=0.1)
  p.add_argument("--server_lr", type=float, default=1.0)
  p.add_argument("--rounds", type=int, default=20, help="timed rounds (at most)")
  p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
  p.add_argument("--warmup_cohort", type=int, default=0, help="ignored (FedJAX peer flag)")
  p.add_argument("--max_seconds", type=float, default=60.0)
  p.add_argument("--num_cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) "
                 "per client")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  if a.server_lr != 1.0:
    p.error(f"--server_lr {a.server_lr}: Flower's FedAvg is server SGD with lr 1.0 only")
  default_clients = {"emnist": 3400, "cifar": 1000}[common.WORKLOADS[a.model][0]]
  a.num_clients = a.num_clients or default_clients
  a.batch_size = a.batch_size or common.WORKLOADS[a.model][1]
  if not 1 <= a.cohort <= a.num_clients:
    p.error(f"--cohort {a.cohort} must be in [1, --num_clients={a.num_clients}]")
  return a


def make_apps(a, data_dir, result_path):
  """The ServerApp and ClientApp (closures over paths only: Ray pickles them by value)."""
  from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
  from flwr.clientapp import ClientApp
  from flwr.serverapp import Grid, ServerApp
  from flwr.serverapp.strategy import FedAvg

  model_name, batch, lr, threads = a.model, a.batch_size, a.client_lr, max(1, int(a.num_cpus))
  cache = {}

  def client_data():
    if "x" not in cache:  # once per Ray worker process: memory-mapped, shared page cache
      cache.update({k: np.load(os.path.join(data_dir, k + ".npy"), mmap_mode="r")
                    for k in ("x", "y", "offsets", "sizes")})
    return cache

  client_app = ClientApp()

  @client_app.train()
  def train(msg: Message, context: Context):
    import torch

    torch.set_num_threads(threads)
    d = client_data()
    cid = int(context.node_config["partition-id"])
    lo, n = int(d["offsets"][cid]), int(d["sizes"][cid])
    x = torch.from_numpy(np.array(d["x"][lo:lo + n])).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.array(d["y"][lo:lo + n], np.int64))
    if "model" not in cache:
      cache["model"] = common.torch_model(model_name)
    net = cache["model"]
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    perm = torch.randperm(n)
    for s in range(0, n, batch):
      idx = perm[s:s + batch]
      opt.zero_grad()
      loss_fn(net(x[idx]), y[idx]).backward()
      opt.step()
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=msg)

  num_clients, cohort, rounds, warmup = a.num_clients, a.cohort, a.rounds, a.warmup
  max_seconds = a.max_seconds

  class TimedFedAvg(FedAvg):
    """FedAvg that times each round (public Strategy hooks only)."""

    def __init__(self, **kw):
      super().__init__(**kw)
      self.times, self.skipped, self.t0 = [], 0, None

    def configure_train(self, server_round, arrays, config, grid):
      if server_round > warmup and sum(t for r, t in self.times if r > warmup) >= max_seconds:
        self.skipped += 1
        return []
      self.t0 = time.perf_counter()
      return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
      out = super().aggregate_train(server_round, replies)
      if self.t0 is not None:
        self.times.append((server_round, time.perf_counter() - self.t0))
        self.t0 = None
      return out

  server_app = ServerApp()

  @server_app.main()
  def main(grid: Grid, context: Context) -> None:
    net = common.torch_model(model_name)
    strategy = TimedFedAvg(fraction_train=(cohort + 0.5) / num_clients, fraction_evaluate=0.0,
                           min_train_nodes=cohort, min_available_nodes=num_clients)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
                            num_rounds=warmup + rounds)
    final = result.arrays.to_torch_state_dict()
    finite = all(bool(np.all(np.isfinite(v.numpy()))) for v in final.values())
    timed = [t for r, t in strategy.times if r > warmup]
    with open(result_path, "w") as f:
      json.dump({"timed": timed, "warmup_seconds": sum(t for r, t in strategy.times
                                                       if r <= warmup),
                 "params_finite": finite, "params": common.num_params(net)}, f)

  return server_app, client_app


def main(argv=None):
  a = parse_args(argv)
  import flwr
  import torch
  from flwr.simulation import run_simulation

  x, y, ids = common.workload_data(a.model, a.num_clients, seed=a.seed)
  sizes = np.bincount(ids, minlength=a.num_clients)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  tmp = tempfile.mkdtemp(prefix="flwr_peer_", dir="/dev/shm" if os.path.isdir("/dev/shm")
                         else None)
  try:
    for k, v in {"x": x, "y": y, "offsets": offsets, "sizes": sizes}.items():
      np.save(os.path.join(tmp, k + ".npy"), v)
    del x, y
    result_path = os.path.join(tmp, "result.json")
    server_app, client_app = make_apps(a, tmp, result_path)
    t = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=a.num_clients,
                   backend_config={"client_resources": {"num_cpus": a.num_cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(),
                                                 "include_dashboard": False}})
    wall = time.perf_counter() - t
    if not os.path.exists(result_path):
      raise SystemExit("flwr peer: the ServerApp finished without a result (see Flower's log "
                       "above)")
    with open(result_path) as f:
      res = json.load(f)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  timed = res["timed"]
  if not timed:
    raise SystemExit("flwr peer: no timed round completed")
  seconds = float(sum(timed))
  out = {
      "tool": "flwr", "flwr": flwr.__version__, "torch": torch.__version__,
      "model": a.model, "cohort": a.cohort, "num_clients": a.num_clients,
      "batch_size": a.batch_size, "client_lr": a.client_lr, "server_lr": a.server_lr,
      "setting": f"num_cpus={a.num_cpus:g}", "num_cpus_per_client": a.num_cpus,
      "timed_rounds": len(timed), "seconds": seconds,
      "rounds_per_s": len(timed) / seconds,
      "client_updates_per_s": a.cohort * len(timed) / seconds,
      "round_s_median": float(np.median(timed)), "warmup_seconds": res["warmup_seconds"],
      "wall_seconds": wall, "params": res["params"], "params_finite": res["params_finite"],
      "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(),
  }
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
