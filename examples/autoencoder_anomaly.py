"""Federated autoencoder anomaly detection on digits, against the same autoencoder trained
centrally.

Normal data = every digit except ``--anomaly`` (default 0), split Dirichlet over clients; the
autoencoder is trained with FedAvg on the clients' normal data; the detection threshold comes
from the clients' aggregated error statistics (mean + k·std, no raw errors shared); the held-out
test set (normal digits plus the anomalous digit) is scored by reconstruction error.

  python examples/autoencoder_anomaly.py [--out roc.png]   # ROC curves of both, as a PNG
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
  args = ap.parse_args()
  d = load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
  normal = ytr != args.anomaly
  xn, yn = xtr[normal], ytr[normal]
  ids = fs.partition.dirichlet(yn, args.num_clients, 0.5, seed=0)
  pop = fs.Population.from_arrays({"x": xn}, ids, num_clients=args.num_clients)
  module = fs.zoo.DenseAutoencoder((32, 8))
  params = module.init(jax.random.key(0), xn[:1])["params"]
  apply_fn = fs.models.linen_apply(module)
  loss_fn = fs.models.regression_loss(apply_fn, target_key="x")
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.adam(3e-3), local_epochs=2,
                              batch_size=16)
  sim = fs.Simulation(algo, pop, cohort_size=min(10, args.num_clients))
  state, _ = sim.run(sim.init(params, jax.random.key(1)), args.rounds)
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
  rng = np.random.default_rng(0)
  for _ in range(epochs):
    for batch in np.array_split(rng.permutation(len(xn)), max(1, len(xn) // 16)):
      central, opt_state = step(central, opt_state, xn[batch])
  is_anomaly = yte == args.anomaly
  print(f"digits: anomaly = digit {args.anomaly}; {len(xn)} normal training examples over "
        f"{args.num_clients} clients; test {is_anomaly.sum()} anomalies / {len(yte)}")
  from sklearn.metrics import roc_curve

  plt = plots._plt()
  fig, ax = plt.subplots(figsize=(5, 5))
  for name, p in (("federated", fed), ("central", central)):
    thr = federated_threshold(apply_fn, p, pop, k=args.k)
    scores = reconstruction_error(apply_fn, p, xte)
    m = anomaly_metrics(scores, is_anomaly, thr)
    print(f"  {name:9s} AUROC {m['auroc']:.3f}  AP {m['average_precision']:.3f}  at threshold "
          f"{thr:.4f} (mean + {args.k} std): F1 {m['f1']:.3f} TPR {m['tpr']:.3f} "
          f"FPR {m['fpr']:.3f}")
    fpr, tpr, _ = roc_curve(is_anomaly, scores)
    line, = ax.plot(fpr, tpr, label=f"{name} (AUROC {m['auroc']:.3f})")
    ax.plot([m["fpr"]], [m["tpr"]], "o", color=line.get_color())
  ax.plot([0, 1], [0, 1], ":", color="gray")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(f"digits, anomaly = {args.anomaly} (dots: mean + {args.k} std threshold)")
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
