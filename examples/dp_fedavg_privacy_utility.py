"""Privacy-utility trade-off of DP-FedAvg on real data (scikit-learn digits), with exact ε.

For several noise multipliers z, trains DP-FedAvg (Poisson-sampled cohorts, clip S, fixed
denominator qN) on digits split non-IID over simulated devices, and reports the test accuracy
against the user-level ε that fs.privacy computes for the Poisson sampler actually run (RDP and
PLD). Writes a PNG plot and prints a table.

  python examples/dp_fedavg_privacy_utility.py --out dp_utility.png
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import fedjax_sim as fs  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def main():
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)  # dp-accounting's notes on excluded RDP orders
  ap = argparse.ArgumentParser()
  ap.add_argument("--num-clients", type=int, default=400)
  ap.add_argument("--q", type=float, default=0.1, help="Poisson sampling probability")
  ap.add_argument("--rounds", type=int, default=150)
  ap.add_argument("--clip", type=float, default=1.0)
  ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.8, 1.2, 2.0])
  ap.add_argument("--alpha", type=float, default=1.0)
  ap.add_argument("--out", default="dp_fedavg_privacy_utility.png")
  args = ap.parse_args()

  d = load_digits()
  x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
  pop = fs.Population.from_arrays(
      {"x": xtr, "y": ytr}, fs.partition.dirichlet(ytr, args.num_clients, args.alpha, seed=0))
  n = pop.num_clients
  delta = 1.0 / n**1.1
  model = MLP()
  params = model.init(jax.random.key(0), xtr[:1])["params"]
  apply_fn = fs.models.linen_apply(model)
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(apply_fn(p, xte), -1) == yte))
  expected = args.q * n
  sampler = fs.sampling.poisson(args.q, max_cohort_size=n)  # no truncation
  print(f"digits: {n} devices, Poisson q={args.q} (expected cohort {expected:.0f}), "
        f"{args.rounds} rounds, clip {args.clip}, delta {delta:.2e}")
  print("| z | test accuracy | epsilon (RDP) | epsilon (PLD) | seconds |")
  print("|---|---|---|---|---|")
  rows = []
  for z in args.noise:
    algo = fs.algorithms.fedavg(
        fs.models.classifier_loss(apply_fn), client_optimizer=optax.sgd(0.1),
        server_optimizer=fs.algorithms.fedavgm(1.0, 0.9), local_epochs=2, batch_size=8,
        aggregator=fs.aggregators.dp_mean(clip=args.clip, noise_multiplier=z))
    sim = fs.Simulation(algo, pop, sampler=sampler)
    t = time.perf_counter()
    state, m = sim.run(sim.init(params, jax.random.key(1)), num_rounds=args.rounds)
    acc = float(accuracy(state.params))
    secs = time.perf_counter() - t
    if z > 0:
      eps_rdp = fs.privacy.epsilon(sampler, n, z, args.rounds, delta)
      eps_pld = fs.privacy.epsilon(sampler, n, z, args.rounds, delta, accountant="pld")
    else:
      eps_rdp = eps_pld = float("inf")
    rows.append((z, acc, eps_rdp, eps_pld))
    print(f"| {z} | {acc:.4f} | {eps_rdp:.3g} | {eps_pld:.3g} | {secs:.1f} |", flush=True)

  fig, ax = plt.subplots(figsize=(6, 4))
  finite = [r for r in rows if np.isfinite(r[2])]
  ax.plot([r[2] for r in finite], [r[1] for r in finite], "o-", label="DP-FedAvg (RDP ε)")
  ax.plot([r[3] for r in finite], [r[1] for r in finite], "s--", label="DP-FedAvg (PLD ε)")
  for z, acc, _, _ in rows:
    if z == 0:
      ax.axhline(acc, color="gray", ls=":", label="no noise (z = 0, clip only)")
  for z, acc, e, _ in finite:
    ax.annotate(f"z={z}", (e, acc), textcoords="offset points", xytext=(4, -10), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel(f"user-level ε (δ = {delta:.1e})")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"DP-FedAvg on digits: {n} devices, q = {args.q}, {args.rounds} rounds")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
