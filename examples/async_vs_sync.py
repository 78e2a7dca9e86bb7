"""Synchronous FedAvg (with and without a deadline) vs asynchronous FedBuff, in virtual time.

Digits (scikit-learn), ``--clients`` clients split Dirichlet(0.5); device speeds lognormal(0, 0.5)
local steps per second, and 30% of the devices are stragglers (10x slower). Every client runs
``--local-steps`` local steps of batch 10.

* sync FedAvg: cohort K per round; a round lasts as long as its slowest client.
* sync FedAvg + deadline: the same, but a round lasts at most ``deadline`` seconds (the 70th
  percentile of device durations) and clients still training then are dropped
  (``fs.systems.SystemModel(deadline=..., deadline_policy="drop")``).
* FedBuff: ``fs.AsyncSimulation`` with concurrency 3K, buffer K, polynomial staleness (a=0.5).

Each runs until the virtual clock passes the same horizon; accuracy on the held-out test set is
measured after every round / every ``--eval-every`` server steps. Printed: the time to
``--target`` test accuracy per method (mean and each seed) and the final accuracy, over
``--seeds`` seeds; a PNG of accuracy against virtual time with ``--out``.

  python examples/async_vs_sync.py --out async_vs_sync.png
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs


def build(args, seed):
  pop, test = fs.datasets.sklearn_dataset("digits", args.clients, alpha=0.5, seed=seed)
  model = fs.zoo.MLP(10, (32,))
  params = model.init(jax.random.key(seed), np.asarray(test["x"][:1]))["params"]
  apply = fs.models.linen_apply(model)
  loss_fn = fs.models.classifier_loss(apply)
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), batch_size=10,
                              local_steps=args.local_steps)
  tx, ty = jnp.asarray(test["x"]), jnp.asarray(test["y"])
  acc = jax.jit(lambda p: jnp.mean(jnp.argmax(apply(p, tx), -1) == ty))
  rng = np.random.default_rng(seed)
  speed = rng.lognormal(0.0, 0.5, args.clients)
  straggler = rng.random(args.clients) < 0.3
  speed = np.where(straggler, speed / 10.0, speed)
  timing = fs.asynchronous.Timing(steps_per_second=speed, local_steps=args.local_steps)
  return pop, algo, params, acc, timing


def run_sync(args, pop, algo, params, acc, timing, seed, deadline=None):
  seconds = timing.seconds(pop.num_clients)
  system = None if deadline is None else fs.systems.SystemModel(
      deadline=deadline, steps_per_second=tuple(np.asarray(timing.steps_per_second)))
  plan = fs.core.plan_for(algo, fs.sampling.uniform(args.cohort), pop, params,
                          chunk_size=args.cohort, system=system)
  state = fs.core.initial_state(plan, params, jax.random.key(seed))
  step = jax.jit(lambda s, p: fs.core.round_step(plan, s, p))
  t, times, accs = 0.0, [0.0], [float(acc(params))]
  while t < args.horizon:
    cohort, _ = fs.core.sample_cohort(plan, state.key, state.round)
    longest = float(seconds[np.asarray(cohort.ids)].max())
    t += longest if deadline is None else min(longest, deadline)
    state, _ = step(state, pop)
    times.append(t)
    accs.append(float(acc(state.params)))
  return np.asarray(times), np.asarray(accs)


def run_async(args, pop, algo, params, acc, timing, seed):
  sim = fs.AsyncSimulation(algo, pop, concurrency=3 * args.cohort, buffer_size=args.cohort,
                           timing=timing, staleness=fs.asynchronous.polynomial(0.5),
                           block_size=args.eval_every)
  state = sim.init(params, jax.random.key(seed))
  times, accs = [0.0], [float(acc(params))]
  stale = []
  while times[-1] < args.horizon:
    state, m = sim.run(state, args.eval_every)
    times.append(float(m["virtual_time"][-1]))
    accs.append(float(acc(state.server.params)))
    stale.append(m["staleness_mean"])
  return np.asarray(times), np.asarray(accs), float(np.mean(np.concatenate(stale)))


def time_to(times, accs, target):
  hit = np.flatnonzero(accs >= target)
  return float(times[hit[0]]) if len(hit) else float("nan")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--clients", type=int, default=100)
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--local-steps", type=int, default=10)
  ap.add_argument("--horizon", type=float, default=2000.0, help="virtual seconds")
  ap.add_argument("--eval-every", type=int, default=5)
  ap.add_argument("--target", type=float, default=0.85)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  curves = {"sync FedAvg": [], "sync FedAvg + deadline": [], "FedBuff (async)": []}
  stale = []
  for seed in range(args.seeds):
    pop, algo, params, acc, timing = build(args, seed)
    deadline = float(np.quantile(timing.seconds(pop.num_clients), 0.7))
    curves["sync FedAvg"].append(run_sync(args, pop, algo, params, acc, timing, seed))
    curves["sync FedAvg + deadline"].append(
        run_sync(args, pop, algo, params, acc, timing, seed, deadline))
    t, a, s = run_async(args, pop, algo, params, acc, timing, seed)
    curves["FedBuff (async)"].append((t, a))
    stale.append(s)

  print(f"digits, {args.clients} clients, K={args.cohort}, 30% stragglers (10x slower), "
        f"horizon {args.horizon:g} virtual s, {args.seeds} seeds")
  print(f"{'method':<26}{'time to ' + format(args.target, '.0%'):>16}  per seed"
        f"{'final acc':>34}")
  for name, runs in curves.items():
    tt = [time_to(t, a, args.target) for t, a in runs]
    final = [float(a[-1]) for _, a in runs]
    reached = int(np.isfinite(tt).sum())
    mean = f"{np.nanmean(tt):.0f} ({reached}/{len(tt)})" if reached else f"- (0/{len(tt)})"
    print(f"{name:<26}{mean:>16}  {' '.join(f'{x:7.0f}' for x in tt):<26}"
          f"{np.mean(final):>8.3f} ± {np.std(final):.3f}")
  print("time to target: mean over the seeds that reached it (how many); nan: not within the "
        "horizon")
  print(f"FedBuff: {3 * args.cohort} clients in flight (sync: {args.cohort} per round); mean "
        f"staleness {np.mean(stale):.2f} server steps")

  if args.out:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("C0", "C1", "C2"), strict=True):
      for i, (t, a) in enumerate(runs):
        ax.plot(t, a, color=color, alpha=0.8, label=name if i == 0 else None)
    ax.axhline(args.target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits: sync FedAvg vs FedBuff, lognormal speeds + 30% stragglers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
  main()
