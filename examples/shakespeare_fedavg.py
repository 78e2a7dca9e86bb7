"""FedAvg next-character prediction on Shakespeare, one client per speaking role.

  python examples/shakespeare_fedavg.py                      # bundled public-domain text
  python examples/shakespeare_fedavg.py --h5 shakespeare_train.h5

The full data set is TFF's federated Shakespeare h5
(https://storage.googleapis.com/tff-datasets-public/shakespeare.tar.bz2). Reports the token loss
against the unigram (character-frequency) baseline and saves a learning curve.
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
from fedjax_sim.data import datasets  # noqa: E402


def unigram_cross_entropy(y: np.ndarray) -> float:
  tokens = y[y != datasets.PAD]
  p = np.bincount(tokens) / tokens.size
  return float(-np.sum(p[p > 0] * np.log(p[p > 0])))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--h5")
  ap.add_argument("--max-clients", type=int, default=None)
  ap.add_argument("--seq-len", type=int, default=40)
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=60)
  ap.add_argument("--cohort-size", type=int, default=10)
  ap.add_argument("--client-lr", type=float, default=0.01)
  ap.add_argument("--out", default="shakespeare_fedavg.png")
  args = ap.parse_args()

  if args.h5:
    pop = datasets.shakespeare(args.h5, seq_len=args.seq_len, max_clients=args.max_clients)
  else:
    pop = datasets.tiny_shakespeare(seq_len=args.seq_len)
  model = fs.zoo.CharLSTM(datasets.SHAKESPEARE_VOCAB_SIZE, hidden=args.hidden, num_layers=1)
  params = model.init(jax.random.key(0), np.asarray(pop.features["x"][:1]))["params"]
  loss_fn = fs.models.sequence_loss(fs.models.linen_apply(model))
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.adam(args.client_lr),
                              local_epochs=1, batch_size=4)
  sim = fs.Simulation(algo, pop, cohort_size=min(args.cohort_size, pop.num_clients))
  data = {k: np.asarray(v) for k, v in pop.features.items()}
  baseline = unigram_cross_entropy(data["y"])
  evaluate = fs.evaluation.make_eval_fn(loss_fn, data)
  print(f"{pop.num_clients} roles, {pop.total_examples} windows of {args.seq_len} chars; "
        f"unigram baseline {baseline:.3f} nats/char", flush=True)
  t0 = time.perf_counter()
  state, m = sim.run(sim.init(params, jax.random.key(0)), args.rounds, eval_every=10,
                     eval_fn=evaluate,
                     callback=lambda r, b: print(f"  round {r:3d}  loss {b['loss'][-1]:.3f}",
                                                 flush=True))
  final = m["eval_loss"][-1]
  print(f"final loss {final:.3f} nats/char vs unigram {baseline:.3f} "
        f"({final / baseline:.0%} of it), next-char accuracy {m['eval_accuracy'][-1]:.3f}, "
        f"{time.perf_counter() - t0:.1f} s")
  rounds = np.arange(1, args.rounds + 1)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(rounds, m["loss"], label="train loss (cohort)")
  ok = np.isfinite(m["eval_loss"])
  ax.plot(rounds[ok], m["eval_loss"][ok], "o-", label="loss on all data")
  ax.axhline(baseline, color="gray", ls=":", label="unigram baseline")
  ax.set_xlabel("round")
  ax.set_ylabel("nats / character")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
