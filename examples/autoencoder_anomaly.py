"""Federated autoencoder anomaly detection on digits, against the same autoencoder trained
centrally.

Normal data = every digit except ``--anomaly`` (default 0), split Dirichlet over clients; the
autoencoder is trained with FedAvg on the clients' normal data; the detection threshold comes
from the clients' aggregated error statistics (mean + k·std, no raw errors shared); the held-out
test set (normal digits plus the anomalous digit) is scored by reconstruction error.

  python examples/autoencoder_anomaly.py [--out roc.png]   # ROC curves of both, as a PNG
  python examples/autoencoder_anomaly.py --seeds 0 1 2 3 4  # both over 5 splits, with spread

Each seed draws its own train/test split, Dirichlet client split, initialization and sampling;
the summary gives the mean and standard deviation of each AUROC over the seeds and how often
the federated model beat the central one. One split is not evidence either way: the figures
in docs/unsupervised.md are over several.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fedjax_sim as fs
from fedjax_sim import plots
from fedjax_sim.unsupervised import anomaly_metrics, federated_threshold, reconstruction_error


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--anomaly", type=int, default=0)
  ap.add_argument("--num-clients", type=int, default=30)
  ap.add_argument("--rounds", type=int, default=150)
  ap.add_argument("--k", type=float, default=2.0)
  ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "autoencoder_roc.png"))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                  help="one run per seed (split, init, sampling); the ROC plot shows the first")
  args = ap.parse_args()
  results = [run_seed(args, seed, plot=i == 0) for i, seed in enumerate(args.seeds)]
  if len(results) > 1:
    fed = np.array([r["federated"] for r in results])
    cen = np.array([r["central"] for r in results])
    print(f"over {len(results)} seeds {args.seeds} ({args.num_clients} clients, {args.rounds} "
          f"rounds): AUROC federated {fed.mean():.3f} +- {fed.std(ddof=1):.3f} "
          f"[{fed.min():.3f}, {fed.max():.3f}], central {cen.mean():.3f} +- "
          f"{cen.std(ddof=1):.3f} [{cen.min():.3f}, {cen.max():.3f}]; federated higher in "
          f"{int(np.sum(fed > cen))} of {len(results)}")


def run_seed(args, seed: int, plot: bool) -> dict[str, float]:
  d = load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
  normal = ytr != args.anomaly
  xn, yn = xtr[normal], ytr[normal]
  ids = fs.partition.dirichlet(yn, args.num_clients, 0.5, seed=seed)
  pop = fs.Population.from_arrays({"x": xn}, ids, num_clients=args.num_clients)
  module = fs.zoo.DenseAutoencoder((32, 8))
  params = module.init(jax.random.key(seed), xn[:1])["params"]
  apply_fn = fs.models.linen_apply(module)
  loss_fn = fs.models.regression_loss(apply_fn, target_key="x")
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.adam(3e-3), local_epochs=2,
                              batch_size=16)
  sim = fs.Simulation(algo, pop, cohort_size=min(10, args.num_clients))
  state, _ = sim.run(sim.init(params, jax.random.key(seed + 1)), args.rounds)
  fed = state.params

  # The same autoencoder trained centrally with the same optimizer, batch size and number of
  # passes over the data as the federated run (rounds x cohort/N x local epochs).
  opt = optax.adam(3e-3)

  @jax.jit
  def step(p, s, b):
    g = jax.grad(lambda q: jnp.mean(jnp.square(apply_fn(q, b) - b)))(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  central, opt_state = params, opt.init(params)
  epochs = max(1, round(args.rounds * sim.max_cohort_size / args.num_clients * 2))
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for batch in np.array_split(rng.permutation(len(xn)), max(1, len(xn) // 16)):
      central, opt_state = step(central, opt_state, xn[batch])
  is_anomaly = yte == args.anomaly
  print(f"seed {seed}: digits, anomaly = digit {args.anomaly}; {len(xn)} normal training "
        f"examples over {args.num_clients} clients; test {is_anomaly.sum()} anomalies / "
        f"{len(yte)}")
  from sklearn.metrics import roc_curve

  if plot:
    fig, ax = plots.pyplot().subplots(figsize=(5, 5))
  aurocs = {}
  for name, p in (("federated", fed), ("central", central)):
    thr = federated_threshold(apply_fn, p, pop, k=args.k)
    scores = reconstruction_error(apply_fn, p, xte)
    m = anomaly_metrics(scores, is_anomaly, thr)
    print(f"  {name:9s} AUROC {m['auroc']:.3f}  AP {m['average_precision']:.3f}  at threshold "
          f"{thr:.4f} (mean + {args.k} std): F1 {m['f1']:.3f} TPR {m['tpr']:.3f} "
          f"FPR {m['fpr']:.3f}")
    aurocs[name] = m["auroc"]
    if not plot:
      continue
    fpr, tpr, _ = roc_curve(is_anomaly, scores)
    line, = ax.plot(fpr, tpr, label=f"{name} (AUROC {m['auroc']:.3f})")
    ax.plot([m["fpr"]], [m["tpr"]], "o", color=line.get_color())
  if not plot:
    return aurocs
  ax.plot([0, 1], [0, 1], ":", color="gray")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(f"digits, anomaly = {args.anomaly} (dots: mean + {args.k} std threshold)")
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")
  return aurocs


if __name__ == "__main__":
  main()
