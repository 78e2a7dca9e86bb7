"""Data sharing for non-IID clients (Zhao et al. 2018): a small public set mixed into every local
batch, against plain FedAvg, on Dirichlet(0.1) digits over several seeds. Prints a measured table
and saves a PNG.

The shared set is ``--shared-percent`` % of the training data, taken out (stratified) before
the rest is split over the clients; each local batch of B draws ``round(fraction * B)`` examples
from it with the client's key (in-jit) and the rest from the client's own data. The shared set
is public: every client holds it, so privacy guarantees (DP) cover the clients' own data only.

  python examples/shared_data.py --out shared_data.png
"""

from __future__ import annotations

import argparse
import os

import jax
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def split(seed, args):
  from sklearn import datasets as skd
  from sklearn.model_selection import train_test_split

  d = skd.load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
  xcl, xsh, ycl, ysh = train_test_split(xtr, ytr, test_size=args.shared_percent / 100,
                                        random_state=seed, stratify=ytr)
  ids = fs.partition.dirichlet(ycl, args.num_clients, args.alpha, seed=seed)
  pop = fs.Population.from_arrays({"x": xcl, "y": ycl}, ids, num_clients=args.num_clients)
  return pop, {"x": xsh, "y": ysh}, {"x": xte, "y": yte}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=60)
  ap.add_argument("--num-clients", type=int, default=50)
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--alpha", type=float, default=0.1)
  ap.add_argument("--shared-percent", type=float, default=5.0)
  ap.add_argument("--fraction", type=float, default=0.2)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--out", default="shared_data.png")
  args = ap.parse_args()

  model = fs.zoo.MLP(10, (64,))
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model))
  kw = dict(client_optimizer=optax.sgd(0.05), batch_size=10, local_epochs=5)
  results = {"FedAvg": [], f"FedAvg + shared data ({args.fraction:.0%} of each batch)": []}
  curves = {k: [] for k in results}
  every = max(1, args.rounds // 10)
  for seed in range(args.seeds):
    pop, shared, test = split(seed, args)
    params = model.init(jax.random.key(seed), test["x"][:1])["params"]
    ev = fs.evaluation.make_eval_fn(loss_fn, test)
    algos = dict(zip(results, [
        fs.algorithms.fedavg(loss_fn, **kw),
        fs.algorithms.fedavg(loss_fn, shared_data=shared, shared_fraction=args.fraction, **kw),
    ]))
    for name, algo in algos.items():
      sim = fs.Simulation(algo, pop, cohort_size=args.cohort)
      state, m = sim.run(sim.init(params, jax.random.key(100 + seed)), args.rounds,
                         eval_every=every, eval_fn=ev)
      results[name].append(ev(state.params)["accuracy"])
      ok = np.isfinite(m["eval_accuracy"])
      curves[name].append((np.flatnonzero(ok) + 1, m["eval_accuracy"][ok]))
  print(f"\ndigits, {args.num_clients} clients, Dirichlet({args.alpha}), cohort {args.cohort}, "
        f"{args.rounds} rounds, 5 local epochs, shared set {args.shared_percent}% of training "
        f"data; {args.seeds} seeds; load average {os.getloadavg()[0]:.2f}\n")
  print("| method | final test accuracy (mean ± std over seeds) | per seed |")
  print("|---|---|---|")
  for name, accs in results.items():
    a = np.asarray(accs)
    print(f"| {name} | {a.mean():.3f} ± {a.std():.3f} | {', '.join(f'{v:.3f}' for v in a)} |")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (name, runs), colour in zip(curves.items(), ("C0", "C1")):
    for i, (x, y) in enumerate(runs):
      ax.plot(x, y, "o-", ms=3, color=colour, alpha=0.8, label=name if i == 0 else None)
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"shared data vs FedAvg: digits, Dirichlet({args.alpha}), {args.seeds} seeds")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"\nsaved {args.out}")


if __name__ == "__main__":
  main()
