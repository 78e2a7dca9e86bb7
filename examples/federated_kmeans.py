"""Federated k-means (Lloyd on sufficient statistics) on bundled real data, against
scikit-learn's centralized KMeans.

  python examples/federated_kmeans.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

import fedjax_sim as fs
from fedjax_sim.unsupervised import kmeans, kmeans_cost, kmeans_plus_plus


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew of the split")
  ap.add_argument("--num-clients", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=50)
  args = ap.parse_args()
  print(f"| dataset | k | clients (Dirichlet {args.alpha}) | federated cost | sklearn cost "
        "| ratio |")
  print("|---|---|---|---|---|---|")
  for name, k in (("iris", 3), ("wine", 3), ("digits", 10)):
    pop, _ = fs.datasets.sklearn_dataset(name, args.num_clients, alpha=args.alpha, seed=0)
    x = np.asarray(pop.features["x"])
    # k-means++ seeding on a 10% sample, as a server could get from a public or donated set.
    rng = np.random.default_rng(0)
    sample = x[rng.choice(len(x), max(k, len(x) // 10), replace=False)]
    sim = fs.Simulation(kmeans(k), pop, cohort_size=pop.num_clients)
    state, _ = sim.run(sim.init(jnp.asarray(kmeans_plus_plus(sample, k, seed=0)),
                                jax.random.key(0)), num_rounds=args.rounds)
    ours = kmeans_cost(x, np.asarray(state.params))
    ref = KMeans(k, n_init=10, random_state=0).fit(x).inertia_
    print(f"| {name} | {k} | {pop.num_clients} | {ours:.1f} | {ref:.1f} | {ours / ref:.3f} |")


if __name__ == "__main__":
  main()
