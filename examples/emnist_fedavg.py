"""FedAvg on federated EMNIST (TFF h5) or, without a file, on scikit-learn's bundled digits.

  python examples/emnist_fedavg.py          # digits, Dirichlet(0.3) over 100 clients
  python examples/emnist_fedavg.py --h5 fed_emnist_train.h5 --h5-test fed_emnist_test.h5

The EMNIST files are TFF's
(https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2); with them the EMNIST CNN
of Reddi et al. 2021 is trained, otherwise an MLP on 8x8 digits. Prints a progress line per
evaluation, per-client accuracy percentiles at the end, and saves a learning curve.
"""

from __future__ import annotations

import argparse
import time

import jax
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--h5", help="TFF fed_emnist train h5 (else: bundled digits)")
  ap.add_argument("--h5-test", help="TFF fed_emnist test h5")
  ap.add_argument("--max-clients", type=int, default=None)
  ap.add_argument("--num-clients", type=int, default=100)
  ap.add_argument("--alpha", type=float, default=0.3)
  ap.add_argument("--cohort-size", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--eval-every", type=int, default=10)
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--local-epochs", type=int, default=1)
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--out", default="emnist_fedavg.png")
  args = ap.parse_args()

  if args.h5:
    pop = fs.datasets.emnist(args.h5, max_clients=args.max_clients)
    test_pop = fs.datasets.emnist(args.h5_test or args.h5, max_clients=args.max_clients)
    test = {k: np.asarray(v) for k, v in test_pop.features.items()}
    model, name = fs.zoo.EmnistCNN(62), "EMNIST-62, EMNIST CNN"
  else:
    pop, test = fs.datasets.sklearn_dataset("digits", args.num_clients, alpha=args.alpha)
    test_pop = None
    model, name = fs.zoo.MLP(10, (64,)), f"digits Dirichlet({args.alpha}), MLP"
  x0 = np.asarray(pop.features["x"][:1])
  params = model.init(jax.random.key(0), x0)["params"]
  train_loss = fs.models.classifier_loss(fs.models.linen_apply(model, train=True))
  eval_loss = fs.models.classifier_loss(fs.models.linen_apply(model))
  algo = fs.algorithms.fedavg(train_loss, client_optimizer=optax.sgd(args.client_lr),
                              local_epochs=args.local_epochs, batch_size=args.batch_size)
  sim = fs.Simulation(algo, pop, cohort_size=min(args.cohort_size, pop.num_clients))
  state = sim.init(params, jax.random.key(0))
  print(f"{name}: {pop.num_clients} clients, {pop.total_examples} train examples, cohort "
        f"{sim.max_cohort_size}, chunk {sim.chunk_size}", flush=True)
  evaluate = fs.evaluation.make_eval_fn(eval_loss, test)
  t0 = time.perf_counter()

  def progress(r, block):
    print(f"  round {r:4d}  train loss {block['loss'][-1]:.3f}  "
          f"{time.perf_counter() - t0:6.1f} s", flush=True)

  state, m = sim.run(state, args.rounds, eval_every=args.eval_every, eval_fn=evaluate,
                     callback=progress)
  acc = m["eval_accuracy"][-1]
  per_client = fs.evaluation.evaluate_clients(eval_loss, state.params, test_pop or pop)
  s = per_client.summary()
  print(f"final test accuracy {acc:.4f} after {args.rounds} rounds "
        f"({time.perf_counter() - t0:.1f} s); per-client accuracy p10/p50/p90 "
        f"{s['accuracy_p10']:.3f}/{s['accuracy_p50']:.3f}/{s['accuracy_p90']:.3f} "
        f"({'test' if test_pop else 'train'} data of each client)")
  rounds = np.arange(1, args.rounds + 1)
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
  ax[0].plot(rounds, m["loss"])
  ax[0].set_xlabel("round")
  ax[0].set_ylabel("train loss (cohort)")
  ok = np.isfinite(m["eval_accuracy"])
  ax[1].plot(rounds[ok], m["eval_accuracy"][ok], "o-")
  ax[1].set_xlabel("round")
  ax[1].set_ylabel("test accuracy")
  fig.suptitle(f"FedAvg, {name}")
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
