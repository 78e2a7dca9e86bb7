"""Robust aggregation under attack, quantised uploads, and distributed vs central DP on digits.

Three studies on scikit-learn digits split non-IID (Dirichlet) over simulated devices, each a
table (markdown) and a PNG panel:

1. robust: 20% of the devices are malicious (sign flip at scale 1 and 5, and ALIE); the test
   accuracy of mean, coordinate median, trimmed mean, Multi-Krum, geometric median (RFA) and
   centered clipping, with and without attack.
2. bits: FedAvg with unbiased stochastic quantisation (shared Hadamard rotation) at 1..16 bits
   per coordinate vs float32 uploads; bits uploaded per client.
3. ddp: DP-FedAvg with central Gaussian noise vs the distributed Skellam mechanism under
   simulated secure aggregation, same clip and noise multiplier; ε for both without
   amplification by sampling (apples to apples) and, for central DP, also with it.

  python examples/robustness_compression.py --out robustness.png
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


def setup(num_clients, alpha):
  d = load_digits()
  x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
  pop = fs.Population.from_arrays(
      {"x": xtr, "y": ytr}, fs.partition.dirichlet(ytr, num_clients, alpha, seed=0))
  model = MLP()
  params = model.init(jax.random.key(0), xtr[:1])["params"]
  apply_fn = fs.models.linen_apply(model)
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(apply_fn(p, xte), -1) == yte))
  return pop, params, fs.models.classifier_loss(apply_fn), accuracy


def train(pop, params, loss_fn, accuracy, aggregator, rounds, cohort, server_lr=1.0, seed=1):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.sgd(server_lr), local_epochs=1,
                              batch_size=8, aggregator=aggregator)
  sim = fs.Simulation(algo, pop, cohort_size=cohort)
  state, metrics = sim.run(sim.init(params, jax.random.key(seed)), num_rounds=rounds)
  acc = float(accuracy(state.params))
  if not np.isfinite(acc):
    raise FloatingPointError("the run produced non-finite parameters")
  return acc, metrics


def robust_study(args, ax):
  pop, params, loss_fn, accuracy = setup(args.num_clients, args.alpha)
  bad = fs.attacks.choose(pop.num_clients, fraction=args.attackers, seed=0)
  f = int(round(args.attackers * args.cohort))
  rules = {
      "mean": ("mean", fs.aggregators.mean()),
      "median": ("median", fs.aggregators.median()),
      "trimmed": ("trimmed mean (0.2)", fs.aggregators.trimmed_mean(0.2)),
      "krum": (f"Multi-Krum (f={f})", fs.aggregators.multi_krum(f)),
      "rfa": ("geometric median", fs.aggregators.geometric_median(weighted=False)),
      "cc": ("centered clip (0.1)", fs.aggregators.centered_clip(0.1, 5)),
  }
  attacks = {
      "none": ("none", None),
      "flip1": ("sign flip x1", fs.attacks.sign_flip(bad, 1.0)),
      "flip5": ("sign flip x5", fs.attacks.sign_flip(bad, 5.0)),
      "alie": ("ALIE", fs.attacks.alie(bad)),
  }
  rules = {k: v for k, v in rules.items() if k in args.rules}
  attacks = {k: v for k, v in attacks.items() if k in args.attacks}
  print(f"\n### Robust aggregation: {pop.num_clients} devices (Dirichlet {args.alpha}), cohort "
        f"{args.cohort}, {args.rounds} rounds, {bad.sum()} malicious devices "
        f"({args.attackers:.0%})")
  print("| rule | " + " | ".join(label for label, _ in attacks.values()) + " |")
  print("|---" * (len(attacks) + 1) + "|")
  table = {}
  for name, rule in rules.values():
    row = []
    for _, attack in attacks.values():
      agg = rule if attack is None else fs.attacks.apply(rule, attack)
      acc, _ = train(pop, params, loss_fn, accuracy, agg, args.rounds, args.cohort)
      row.append(acc)
    table[name] = row
    print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in row) + " |", flush=True)
  xs = np.arange(len(attacks))
  width = 0.8 / len(rules)
  for i, (name, row) in enumerate(table.items()):
    ax.bar(xs + i * width, row, width, label=name)
  ax.set_xticks(xs + 0.4 - width / 2, [label for label, _ in attacks.values()])
  ax.set_ylabel("test accuracy")
  ax.set_title(f"{args.attackers:.0%} malicious devices")
  ax.legend(fontsize=7)


def bits_study(args, ax):
  pop, params, loss_fn, accuracy = setup(args.num_clients, args.alpha)
  print(f"\n### Quantised uploads: {pop.num_clients} devices, cohort {args.cohort}, "
        f"{args.rounds} rounds (stochastic rounding after a shared Hadamard rotation)")
  print("| bits per coordinate | test accuracy | bits uploaded per client |")
  print("|---|---|---|")
  num = sum(x.size for x in jax.tree.leaves(params))
  acc, _ = train(pop, params, loss_fn, accuracy, fs.aggregators.weighted_mean(), args.rounds,
                 args.cohort)
  print(f"| float32 | {acc:.4f} | {num * 32} |")
  rows = []
  for b in args.bits:
    a, m = train(pop, params, loss_fn, accuracy, fs.aggregators.quantized_mean(b),
                 args.rounds, args.cohort)
    rows.append((b, a, float(m["bits_uploaded"][-1])))
    print(f"| {b} | {a:.4f} | {rows[-1][2]:.0f} |", flush=True)
  ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="quantised (rotated)")
  ax.axhline(acc, color="gray", ls=":", label="float32")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("bits per coordinate")
  ax.set_ylabel("test accuracy")
  ax.set_title("accuracy vs upload bits")
  ax.legend(fontsize=8)


def ddp_study(args, ax):
  pop, params, loss_fn, accuracy = setup(args.dp_clients, args.alpha)
  n, k, t, delta = pop.num_clients, args.dp_cohort, args.rounds, 1e-5
  num = sum(x.size for x in jax.tree.leaves(params))
  sampler = fs.sampling.uniform(k)
  print(f"\n### Distributed (Skellam, {args.dp_bits} bits) vs central DP: {n} devices, cohort "
        f"{k}, {t} rounds, clip {args.clip}, delta {delta}; test accuracy mean ± std over "
        f"{args.dp_seeds} seeds; wraps summed over rounds and seeds")
  print("| z | central acc | Skellam acc | ε central (fixed cohort, replace-one, sampled) | "
        "ε central (add/remove, no ampl.) | ε Skellam (add/remove, no ampl.) | Skellam wraps |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for z in args.noise:
    central, skellam, wraps = [], [], 0.0
    for seed in range(args.dp_seeds):  # noisy training: report mean and std over seeds
      a, _ = train(pop, params, loss_fn, accuracy, fs.aggregators.dp_mean(args.clip, z), t, k,
                   server_lr=args.dp_server_lr, seed=seed)
      central.append(a)
      a, m = train(pop, params, loss_fn, accuracy,
                   fs.aggregators.distributed_dp_mean(args.clip, z, bits=args.dp_bits), t, k,
                   server_lr=args.dp_server_lr, seed=seed)
      skellam.append(a)
      wraps += float(np.sum(m["secagg_wrapped"]))
    eps_s = fs.privacy.epsilon(sampler, n, z, t, delta)
    eps_c = fs.privacy.gaussian_epsilon(z, t, delta)
    eps_k = fs.privacy.skellam_epsilon(args.clip, z, args.dp_bits, num, k, t, delta)
    rows.append((z, np.mean(central), np.mean(skellam), eps_c, eps_k))
    print(f"| {z} | {np.mean(central):.3f} ± {np.std(central):.3f} | {np.mean(skellam):.3f} ± "
          f"{np.std(skellam):.3f} | {eps_s:.3g} | {eps_c:.3g} | {eps_k:.3g} | {wraps:.0f} |",
          flush=True)
  ax.plot([r[3] for r in rows], [r[1] for r in rows], "o-", label="central Gaussian")
  ax.plot([r[4] for r in rows], [r[2] for r in rows], "s--",
          label=f"distributed Skellam ({args.dp_bits} bits)")
  ax.set_xscale("log")
  ax.set_xlabel(f"ε (δ = {delta}, no amplification by sampling)")
  ax.set_ylabel("test accuracy")
  ax.set_title("distributed vs central DP")
  ax.legend(fontsize=8)


def main():
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)
  ap = argparse.ArgumentParser()
  ap.add_argument("--studies", nargs="+", default=["robust", "bits", "ddp"],
                  choices=["robust", "bits", "ddp"])
  ap.add_argument("--num-clients", type=int, default=200)
  ap.add_argument("--cohort", type=int, default=40)
  ap.add_argument("--alpha", type=float, default=1.0)
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--attackers", type=float, default=0.2)
  ap.add_argument("--rules", nargs="+", default=["mean", "median", "trimmed", "krum", "rfa", "cc"],
                  choices=["mean", "median", "trimmed", "krum", "rfa", "cc"])
  ap.add_argument("--attacks", nargs="+", default=["none", "flip1", "flip5", "alie"],
                  choices=["none", "flip1", "flip5", "alie"])
  ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  ap.add_argument("--dp-clients", type=int, default=300)
  ap.add_argument("--dp-cohort", type=int, default=150)
  ap.add_argument("--dp-bits", type=int, default=16)
  ap.add_argument("--dp-seeds", type=int, default=3)
  ap.add_argument("--dp-server-lr", type=float, default=1.0)
  ap.add_argument("--clip", type=float, default=1.0)
  ap.add_argument("--noise", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
  ap.add_argument("--out", default="robustness_compression.png")
  args = ap.parse_args()

  studies = {"robust": robust_study, "bits": bits_study, "ddp": ddp_study}
  fig, axes = plt.subplots(1, len(args.studies), figsize=(5.5 * len(args.studies), 4))
  axes = np.atleast_1d(axes)
  t0 = time.perf_counter()
  for name, ax in zip(args.studies, axes):
    studies[name](args, ax)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
