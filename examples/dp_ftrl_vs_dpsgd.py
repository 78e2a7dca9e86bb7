"""DP-FedAvg with Poisson sampling vs BandMF (DP-FTRL family) with min-separation, at the same ε.

Same population (scikit-learn digits split non-IID over simulated devices), model, clip, δ,
rounds, expected cohort size and target ε. Arm A: DP-FedAvg (independent Gaussian noise),
each device joins a round with probability q. Arm B: BandMF with b bands (jax_privacy's
RMSE-optimal banded Toeplitz strategy) under cyclic Poisson sampling with min-separation b: the
devices are split into b bins, round t samples bin t mod b with probability q·b (so the expected
cohort is the same qN). Each arm's noise multiplier is calibrated to the target ε by its own
accountant (fs.privacy, i.e. dp-accounting / jax_privacy's amplified_bandmf_event). Prints the
test accuracy of each arm over several seeds, and each ε.

  python examples/dp_ftrl_vs_dpsgd.py --rounds 100 --seeds 3
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fedjax_sim as fs


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def main():
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)  # dp-accounting's notes on excluded RDP orders
  ap = argparse.ArgumentParser()
  ap.add_argument("--num-clients", type=int, default=400)
  ap.add_argument("--q", type=float, default=0.1, help="DP-FedAvg's Poisson probability")
  ap.add_argument("--bands", type=int, default=8, help="BandMF bands = min-separation b")
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--epsilon", type=float, default=8.0, help="target ε of both arms")
  ap.add_argument("--clip", type=float, default=1.0)
  ap.add_argument("--seeds", type=int, default=3)
  args = ap.parse_args()
  if args.q * args.bands > 1:
    raise SystemExit(f"--q {args.q} x --bands {args.bands} > 1: BandMF's within-bin probability "
                     "q*b must be <= 1 for the same expected cohort; lower one of them.")

  d = load_digits()
  x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
  pop = fs.Population.from_arrays(
      {"x": xtr, "y": ytr}, fs.partition.dirichlet(ytr, args.num_clients, 1.0, seed=0))
  n = pop.num_clients
  delta = 1.0 / n**1.1
  model = MLP()
  params = model.init(jax.random.key(0), xtr[:1])["params"]
  apply_fn = fs.models.linen_apply(model)
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(apply_fn(p, xte), -1) == yte))
  b, t = args.bands, args.rounds
  arms = []
  s_a = fs.sampling.poisson(args.q, max_cohort_size=n)
  z_a = fs.privacy.calibrate_noise_multiplier(args.epsilon, delta, t, s_a, n)
  arms.append(("DP-FedAvg, Poisson", s_a, fs.aggregators.dp_mean(args.clip, z_a), z_a, 1))
  s_b = fs.sampling.cyclic_poisson(args.q * b, b, max_cohort_size=n)
  z_b = fs.privacy.calibrate_noise_multiplier(args.epsilon, delta, t, s_b, n, num_bands=b)
  arms.append((f"BandMF b={b}, min-sep {b}", s_b,
               fs.aggregators.band_mf_mean(args.clip, z_b, bands=b, num_rounds=t), z_b, b))
  print(f"digits: {n} devices, expected cohort {args.q * n:.0f}, {t} rounds, clip {args.clip}, "
        f"delta {delta:.2e}, target epsilon {args.epsilon}")
  print("| mechanism | z | epsilon (RDP) | epsilon (run(delta=)) | epsilon (PLD) | "
        "accuracy per seed | mean |")
  print("|---|---|---|---|---|---|---|")
  for name, sampler, agg, z, bands in arms:
    eps = fs.privacy.epsilon(sampler, n, z, t, delta, num_bands=bands)
    eps_pld = fs.privacy.epsilon(sampler, n, z, t, delta, num_bands=bands, accountant="pld")
    algo = fs.algorithms.fedavg(
        fs.models.classifier_loss(apply_fn), client_optimizer=optax.sgd(0.1),
        server_optimizer=fs.algorithms.fedavgm(1.0, 0.9), local_epochs=2, batch_size=8,
        aggregator=agg)
    sim = fs.Simulation(algo, pop, sampler=sampler)
    accs = []
    for seed in range(args.seeds):
      state, m = sim.run(sim.init(params, jax.random.key(seed)), num_rounds=t, delta=delta,
                         progress=False)
      run_eps = float(m["epsilon"][-1])  # what run(delta=) reports (its per-round RDP table)
      assert abs(run_eps - eps) <= 1e-6 * eps, (run_eps, eps)
      accs.append(float(accuracy(state.params)))
    print(f"| {name} | {z:.3f} | {eps:.3f} | {run_eps:.3f} | {eps_pld:.3f} | "
          f"{', '.join(f'{a:.3f}' for a in accs)} | {np.mean(accs):.3f} |", flush=True)


if __name__ == "__main__":
  main()
