"""Federated k-means on bundled real data against scikit-learn's centralized KMeans: iterative
federated Lloyd (sufficient statistics every round) and one-shot k-FED (Dennis et al. 2021: local
k'-means, one upload, server farthest-point seeding + one Lloyd step). Reports the k-means cost
ratio to sklearn, ARI and NMI against the true labels, and plots the clusters (2-D PCA).

  python examples/federated_kmeans.py [--out clusters.png]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

import fedjax_sim as fs
from fedjax_sim import plots
from fedjax_sim.unsupervised import (
    adjusted_rand_index,
    assign_clusters,
    kfed,
    kmeans,
    kmeans_cost,
    kmeans_plus_plus,
    normalized_mutual_info,
)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew of the split")
  ap.add_argument("--num-clients", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=50)
  ap.add_argument("--k-prime", type=int, default=0, help="k-FED local clusters; 0: k")
  ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "federated_kmeans.png"))
  args = ap.parse_args()
  print(f"| dataset | k | clients (Dirichlet {args.alpha}) | method | cost | sklearn cost "
        "| ratio | ARI | NMI |")
  print("|---|---|---|---|---|---|---|---|---|")
  plt = plots.pyplot()
  fig, axes = plt.subplots(3, 3, figsize=(12, 11))
  for row, (name, k) in enumerate((("iris", 3), ("wine", 3), ("digits", 10))):
    pop, _ = fs.datasets.sklearn_dataset(name, args.num_clients, alpha=args.alpha, seed=0)
    x, y = np.asarray(pop.features["x"]), np.asarray(pop.features["y"])
    # k-means++ seeding on a 10% sample, as a server could get from a public or donated set.
    rng = np.random.default_rng(0)
    sample = x[rng.choice(len(x), max(k, len(x) // 10), replace=False)]
    sim = fs.Simulation(kmeans(k), pop, cohort_size=pop.num_clients)
    state, _ = sim.run(sim.init(jnp.asarray(kmeans_plus_plus(sample, k, seed=0)),
                                jax.random.key(0)), num_rounds=args.rounds)
    k_prime = args.k_prime or k
    one_shot = kfed(pop, k, min(k_prime, k), key=jax.random.key(0))
    sk = KMeans(k, n_init=10, random_state=0).fit(x)
    ref = sk.inertia_
    pca = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:2].T
    results = ((f"federated Lloyd ({args.rounds} rounds)", np.asarray(state.params)),
               (f"k-FED one-shot (k'={min(k_prime, k)})", np.asarray(one_shot.centroids)),
               ("sklearn KMeans (central)", sk.cluster_centers_))
    for col, (method, c) in enumerate(results):
      cost, labels = kmeans_cost(x, c), assign_clusters(x, c)
      print(f"| {name} | {k} | {pop.num_clients} | {method} | {cost:.1f} | {ref:.1f} | "
            f"{cost / ref:.3f} | {adjusted_rand_index(y, labels):.3f} | "
            f"{normalized_mutual_info(y, labels):.3f} |")
      ax = axes[row, col]
      p2, c2 = (x - x.mean(0)) @ pca, (c - x.mean(0)) @ pca
      ax.scatter(p2[:, 0], p2[:, 1], c=labels, s=6, cmap="tab10")
      ax.scatter(c2[:, 0], c2[:, 1], c="black", marker="x", s=60)
      ax.set_title(f"{name}: {method}\ncost ratio {cost / ref:.3f}", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=100)
  print(f"wrote {args.out}")

if __name__ == "__main__":
  main()
