"""Accuracy against published results, on data we can make: FedProx's synthetic experiments and
q-FFL's fairness result (``fs.datasets.fedprox_synthetic``, the papers' generator).

FedProx (Li et al., MLSys 2020, Section 5.2, Figure 1): Synthetic (0,0), (0.5,0.5), (1,1) and
IID; 30 devices, 10 per round, 20 local epochs, batch 10, lr 0.01, multinomial logistic
regression; 0 / 50 / 90 % stragglers. Three methods, as in the paper:

* ``fedavg``: FedAvg drops the stragglers (``SystemModel(dropout=s)``);
* ``fedprox0``: FedProx with mu = 0, stragglers' partial work kept
  (``SystemModel(straggler_prob=s, straggler_min_fraction=0.05)``);
* ``fedprox1``: FedProx with mu = 1, the same partial work.

q-FFL (Li et al., ICLR 2020, Section 5, Table 1 "Synthetic"): q = 0 vs q = 1 (q-FedAvg),
fairness across devices: the variance of the devices' test accuracies, the worst 10 %. Two
settings: ``--qffl`` (30 devices, uniform sampling, batch 10: our choice) and ``--qffl-paper``
(q-FFL's own, read from ``litian96/fair_flearn``: 100 devices, 80/10/10 split, sampling
proportional to size, batch 64, lr 0.01, one local epoch; see docs/accuracy.md).

Writes ``benchmarks/results/cpu-2core/accuracy.jsonl`` (one row per run) and prints the
aggregate (mean +- std over seeds) used in ``docs/accuracy.md``. Full setting (slow on CPU):

  python -m benchmarks.accuracy --rounds 200 --seeds 0 1 2

Differences from the papers' code (kept on purpose, stated in docs/accuracy.md): devices are
sampled uniformly (FedProx samples proportionally to size); a straggler's share of its local
steps is U(0.05, 1) (FedProx draws whole epochs U{1..19}); FedAvg's dropout is Bernoulli per
device (FedProx drops exactly round(0.9 * 10) devices).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-2core",
                       "accuracy.jsonl")
DATASETS = {"0_0": (0.0, 0.0, False), "0.5_0.5": (0.5, 0.5, False), "1_1": (1.0, 1.0, False),
            "iid": (0.0, 0.0, True)}


def _loss():
  return fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])


def _params(dim=60, classes=10):
  return {"w": jnp.zeros((dim, classes)), "b": jnp.zeros(classes)}


def _metrics(loss_fn, params, train, test):
  cat = lambda pop: {k: np.asarray(v) for k, v in pop.features.items()}
  tr = fs.evaluation.evaluate(loss_fn, params, cat(train))
  te = fs.evaluation.evaluate(loss_fn, params, cat(test))
  per = fs.evaluation.evaluate_clients(loss_fn, params, test)
  acc = per.metrics["accuracy"][per.num_examples > 0] * 100
  worst = np.sort(acc)[: max(1, int(round(0.1 * acc.size)))]
  return {"train_loss": tr["loss"], "test_accuracy": te["accuracy"],
          "device_acc_mean": float(acc.mean()), "device_acc_var": float(acc.var()),
          "device_acc_worst10": float(worst.mean())}


def fedprox_run(data, method, stragglers, seed, rounds, eval_every):
  alpha, beta, iid = DATASETS[data]
  train, test = fs.datasets.fedprox_synthetic(alpha, beta, iid=iid, seed=seed)
  loss_fn = _loss()
  common = dict(client_optimizer=optax.sgd(0.01), batch_size=10, local_epochs=20)
  if method == "fedavg":
    algo = fs.algorithms.fedavg(loss_fn, **common)
    system = fs.systems.SystemModel(dropout=stragglers) if stragglers else None
  else:
    algo = fs.algorithms.fedprox(loss_fn, mu=0.0 if method == "fedprox0" else 1.0, **common)
    system = (fs.systems.SystemModel(straggler_prob=stragglers, straggler_min_fraction=0.05)
              if stragglers else None)
  sim = fs.Simulation(algo, train, cohort_size=10, system=system)
  state = sim.init(_params(), jax.random.key(1000 + seed))
  curve = []
  t = time.perf_counter()
  done = 0
  while done < rounds:
    n = min(eval_every, rounds - done)
    state, _ = sim.run(state, num_rounds=n, block_size=n)
    done += n
    m = _metrics(loss_fn, state.params, train, test)
    curve.append({"round": done, "train_loss": m["train_loss"],
                  "test_accuracy": m["test_accuracy"]})
  return {"experiment": "fedprox", "data": data, "method": method, "stragglers": stragglers,
          "seed": seed, "rounds": rounds, **m, "curve": curve,
          "seconds": round(time.perf_counter() - t, 1)}


def qffl_run(q, seed, rounds, data="1_1"):
  alpha, beta, iid = DATASETS[data]
  train, test = fs.datasets.fedprox_synthetic(alpha, beta, iid=iid, seed=seed)
  loss_fn = _loss()
  algo = fs.algorithms.qffl(loss_fn, q=q, client_learning_rate=0.01, batch_size=10,
                            local_epochs=1)
  sim = fs.Simulation(algo, train, cohort_size=10)
  state = sim.init(_params(), jax.random.key(2000 + seed))
  t = time.perf_counter()
  state, _ = sim.run(state, num_rounds=rounds, block_size=min(rounds, 50))
  m = _metrics(loss_fn, state.params, train, test)
  return {"experiment": "qffl", "data": data, "q": q, "seed": seed, "rounds": rounds, **m,
          "seconds": round(time.perf_counter() - t, 1)}


def _fair_flearn_split(seed, num_devices=100):
  """fair_flearn's Synthetic (1,1): 100 devices, each device's examples split 80 / 10 / 10
  (train / validation / test, ``flearn/models/client.py``); returns (train, test)."""
  train, rest = fs.datasets.fedprox_synthetic(1.0, 1.0, num_devices=num_devices,
                                              train_fraction=0.8, seed=seed)
  xs, ys, ids = [], [], []
  for k in range(num_devices):
    n_train = int(train.num_examples[k])
    n = n_train + int(rest.num_examples[k])
    d = rest.client(k)
    skip = int(0.9 * n) - n_train  # the validation tenth [0.8 n, 0.9 n)
    xs.append(np.asarray(d["x"])[skip:])
    ys.append(np.asarray(d["y"])[skip:])
    ids.append(np.full(len(ys[-1]), k))
  test = fs.Population.from_arrays({"x": np.concatenate(xs), "y": np.concatenate(ys)},
                                   np.concatenate(ids), num_clients=num_devices)
  return train, test


def qffl_paper_run(q, seed, rounds, lr=0.01, batch_size=64):
  """q-FFL's own synthetic setting (``litian96/fair_flearn``): 100 devices of Synthetic (1,1),
  80/10/10 split, 10 devices a round sampled without replacement proportionally to their
  training examples (``--sampling=2``), q-FedAvg with one local epoch, batch 64, lr 0.01
  (``run.sh``), fairness over the devices' test accuracies (worst 10 % = 10 devices)."""
  train, test = _fair_flearn_split(seed)
  loss_fn = _loss()
  algo = fs.algorithms.qffl(loss_fn, q=q, client_learning_rate=lr, batch_size=batch_size,
                            local_epochs=1)
  sampler = fs.sampling.uniform(10, weights=np.asarray(train.num_examples, np.float64))
  sim = fs.Simulation(algo, train, sampler=sampler)
  state = sim.init(_params(), jax.random.key(3000 + seed))
  t = time.perf_counter()
  curve, done, block = [], 0, min(rounds, 500)
  while done < rounds:
    n = min(block, rounds - done)
    state, _ = sim.run(state, num_rounds=n, block_size=n)
    done += n
    m = _metrics(loss_fn, state.params, train, test)
    curve.append({"round": done, **{k: m[k] for k in ("train_loss", "device_acc_var",
                                                      "device_acc_worst10")}})
  return {"experiment": "qffl_paper", "data": "1_1/100dev", "q": q, "seed": seed,
          "rounds": rounds, "lr": lr, "batch_size": batch_size, **m, "curve": curve,
          "seconds": round(time.perf_counter() - t, 1)}


def _write(row):
  row["load"] = os.getloadavg()
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "a") as f:
    f.write(json.dumps(row) + "\n")
  print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)


def summarize(path=RESULTS):
  """Mean +- std over seeds of each configuration's final metrics, as Markdown rows."""
  rows = [json.loads(line) for line in open(path)]
  groups: dict[tuple, dict] = {}
  for r in rows:  # one row per (configuration, seed): the latest
    key = ((r["experiment"], r["data"], r.get("method"), r.get("stragglers"), r.get("q"),
            r["rounds"]))
    groups.setdefault(key, {})[r["seed"]] = r
  groups = {k: list(v.values()) for k, v in groups.items()}
  out = ["| experiment | data | method / q | stragglers | rounds | seeds | train loss | "
         "test acc | device acc var | worst-10% acc |", "|" + "---|" * 10]
  for (exp, data, method, strag, q, rounds), rs in sorted(groups.items(), key=str):
    f = lambda k, s=1, rs=rs: (f"{np.mean([r[k] for r in rs]) * s:.3g} ± "
                               f"{np.std([r[k] for r in rs]) * s:.2g}")
    out.append(f"| {exp} | {data} | {method if q is None else f'q={q}'} | "
               f"{'' if strag is None else f'{strag:.0%}'} | {rounds} | "
               f"{sorted(r['seed'] for r in rs)} | {f('train_loss')} | "
               f"{f('test_accuracy', 100)} | {f('device_acc_var')} | {f('device_acc_worst10')} |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=200)
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
  p.add_argument("--stragglers", type=float, nargs="+", default=[0.0, 0.5, 0.9])
  p.add_argument("--methods", nargs="+", default=["fedavg", "fedprox0", "fedprox1"],
                 choices=["fedavg", "fedprox0", "fedprox1"])
  p.add_argument("--qffl", type=float, nargs="*", default=[0.0, 1.0],
                 help="q values for the fairness runs (none: skip)")
  p.add_argument("--qffl-rounds", type=int, default=None, help="default: --rounds")
  p.add_argument("--qffl-paper", type=float, nargs="*", default=[],
                 help="q values for q-FFL's own synthetic setting (fair_flearn: 100 devices, "
                      "size-proportional sampling, batch 64, lr 0.01); none: skip")
  p.add_argument("--qffl-paper-rounds", type=int, default=4000)
  p.add_argument("--skip-fedprox", action="store_true")
  p.add_argument("--summary", action="store_true", help="only print the table of RESULTS")
  args = p.parse_args(argv)
  if args.summary:
    print(summarize())
    return 0
  if not args.skip_fedprox:
    for s in args.stragglers:
      for data in args.data:
        for method in args.methods:
          if method == "fedprox0" and s == 0 and "fedavg" in args.methods:
            continue  # FedProx mu = 0 without stragglers is FedAvg (same per-seed rows)
          for seed in args.seeds:
            _write(fedprox_run(data, method, s, seed, args.rounds, args.eval_every))
  for q in args.qffl:
    for seed in args.seeds:
      _write(qffl_run(q, seed, args.qffl_rounds or args.rounds))
  for seed in args.seeds:
    for q in args.qffl_paper:
      _write(qffl_paper_run(q, seed, args.qffl_paper_rounds))
  print(summarize())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
