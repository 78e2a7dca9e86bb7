"""Client heterogeneity: SCAFFOLD vs client drift, FedNova vs objective inconsistency, q-FFL vs
unfairness. Prints one measured comparison for each and saves a PNG.

  python examples/heterogeneity.py --out heterogeneity.png
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def run(algo, pop, params, rounds, cohort, eval_fn=None, seed=0):
  sim = fs.Simulation(algo, pop, cohort_size=cohort)
  state, m = sim.run(sim.init(params, jax.random.key(seed)), rounds,
                     eval_every=None if eval_fn is None else max(1, rounds // 10),
                     eval_fn=eval_fn)
  return state, m


def drift(args, ax):
  """Digits, Dirichlet(0.1), many local steps: SCAFFOLD vs FedAvg at the same client lr."""
  pop, _ = fs.datasets.sklearn_dataset("digits", 50, alpha=0.1, seed=0)
  model = fs.zoo.MLP(10, (64,))
  params = model.init(jax.random.key(0), np.asarray(pop.features["x"][:1]))["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model))
  data = {k: np.asarray(v) for k, v in pop.features.items()}
  ev = fs.evaluation.make_eval_fn(loss_fn, data)
  kw = dict(batch_size=10, local_epochs=5)
  algos = {"FedAvg": fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), **kw),
           "SCAFFOLD": fs.algorithms.scaffold(loss_fn, client_learning_rate=0.05, **kw)}
  out = {}
  for name, algo in algos.items():
    _, m = run(algo, pop, params, args.rounds, 10, ev)
    ok = np.isfinite(m["eval_loss"])
    ax.plot(np.flatnonzero(ok) + 1, m["eval_loss"][ok], "o-", label=name)
    out[name] = m["eval_loss"][ok]
  ax.set_title("client drift: digits, Dirichlet(0.1), 5 local epochs")
  ax.set_xlabel("round")
  ax.set_ylabel("global training loss")
  ax.set_yscale("log")
  ax.legend()
  return out


def inconsistency(args, ax, stragglers=False):
  """Quadratic clients f_k(w) = mean ||w - e_k||^2 with unequal local step counts, from skewed
  sizes or (``stragglers``) from equal sizes with half the clients straggling: the global
  optimum is the size-weighted mean of the e_k."""
  rng = np.random.default_rng(0)
  num_clients, dim = 20, 5
  if stragglers:
    ids = np.repeat(np.arange(num_clients), 100)
  else:
    ids = fs.partition.quantity_skew(2000, num_clients, sigma=1.2, seed=0)
  system = (fs.systems.SystemModel(straggler_prob=0.5, straggler_min_fraction=0.1)
            if stragglers else None)
  centres = rng.normal(size=(num_clients, dim)).astype(np.float32)
  pop = fs.Population.from_arrays({"x": centres[ids], "y": centres[ids]}, ids,
                                  num_clients=num_clients)
  sizes = np.bincount(ids, minlength=num_clients)
  optimum = (sizes[:, None] * centres).sum(0) / sizes.sum()
  loss_fn = fs.models.regression_loss(lambda p, x: jnp.broadcast_to(p["w"], x.shape))
  params = {"w": jnp.zeros(dim)}
  kw = dict(batch_size=10, local_epochs=1)
  algos = {"FedAvg": fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), **kw),
           "FedNova": fs.algorithms.fednova(loss_fn, client_learning_rate=0.05, **kw)}
  out = {}
  for name, algo in algos.items():
    sim = fs.Simulation(algo, pop, cohort_size=num_clients, system=system)
    state = sim.init(params, jax.random.key(0))
    dist = []
    for _ in range(args.rounds):
      state, _ = sim.round(state)
      dist.append(float(np.linalg.norm(np.asarray(state.params["w"]) - optimum)))
    if ax is not None:
      ax.plot(np.arange(1, args.rounds + 1), dist, label=name)
    out[name] = dist[-1]
  if ax is None:
    return out
  ax.set_title("objective inconsistency: skewed local steps")
  ax.set_xlabel("round")
  ax.set_ylabel("distance to the global optimum")
  ax.set_yscale("log")
  ax.legend()
  return out


def fairness(args, ax):
  """LEAF Synthetic(1, 1), 30 clients: the spread of per-client LOSS (what q-FFL flattens) and
  accuracy for several q (q = 0 is FedAvg with an unweighted mean)."""
  pop = fs.datasets.leaf_synthetic(1.0, 1.0, num_clients=30, seed=0)
  loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])
  params = {"w": jnp.zeros((60, 10)), "b": jnp.zeros(10)}
  out = {}
  for q in args.q:
    algo = fs.algorithms.qffl(loss_fn, q=q, client_learning_rate=0.01, batch_size=10,
                              local_epochs=1)
    state, _ = run(algo, pop, params, args.fairness_rounds, 10)
    ev = fs.evaluation.evaluate_clients(loss_fn, state.params, pop)
    loss, acc = ev.metrics["loss"], ev.metrics["accuracy"]
    out[q] = {"loss_mean": float(loss.mean()), "loss_std": float(loss.std()),
              "loss_max": float(loss.max()), "acc_mean": float(acc.mean()),
              "acc_std": float(acc.std())}
    ax.hist(loss, bins=15, alpha=0.5, label=f"q = {q}")
  ax.set_title("q-FFL: per-client training loss (LEAF Synthetic(1,1))")
  ax.set_xlabel("client loss")
  ax.legend()
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=60)
  ap.add_argument("--q", type=float, nargs="+", default=[0.0, 1.0, 5.0])
  ap.add_argument("--fairness-rounds", type=int, default=500)
  ap.add_argument("--out", default="heterogeneity.png")
  args = ap.parse_args()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  d = drift(args, axes[0])
  print("client drift (global training loss by evaluation round):")
  for name, losses in d.items():
    print(f"  {name:8s} " + " ".join(f"{v:.3f}" for v in losses))
  i = inconsistency(args, axes[1])
  print("objective inconsistency (skewed sizes), distance to the optimum after "
        f"{args.rounds} rounds: " + ", ".join(f"{k} {v:.2e}" for k, v in i.items()))
  i = inconsistency(args, None, stragglers=True)
  print("objective inconsistency (equal sizes, 50% stragglers doing 10-100% of their steps), "
        f"distance to the optimum after {args.rounds} rounds: "
        + ", ".join(f"{k} {v:.2e}" for k, v in i.items()))
  f = fairness(args, axes[2])
  print(f"q-FFL per-client loss / accuracy after {args.fairness_rounds} rounds:")
  for q, s in f.items():
    print(f"  q = {q}: loss mean {s['loss_mean']:.3f} std {s['loss_std']:.3f} max "
          f"{s['loss_max']:.3f} | accuracy mean {s['acc_mean']:.3f} std {s['acc_std']:.3f}")
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
