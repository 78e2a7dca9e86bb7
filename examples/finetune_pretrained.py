"""Pretrained -> federated fine-tuning: full fine-tuning, head only, LoRA r in {2, 8}, LoRA and
FFA-LoRA under DP-FedAvg. Prints a measured table (Markdown) and saves a PNG.

No weights can be downloaded here, so the example pretrains centrally on a public split: an MLP
on 25% of the scikit-learn digits training set. The federated clients hold the other 75% under a
domain shift (every image mirrored left-right) and label skew (Dirichlet(alpha) per client);
the held-out test set is mirrored the same way. Every configuration starts from the same
pretrained weights (loaded through ``fs.peft.load_pretrained``, the path real weights take:
a flax params pytree or a msgpack / safetensors file).

Columns: test accuracy and loss after ``--rounds`` rounds; parameters each client trains and
uploads (bits at float32); per-client memory of the compiled round (XLA memory analysis: the
growth of the round's temporaries per extra client in a chunk); client-updates/s of the
compiled round on this machine; the largest chunk that fits a 256 MiB client-pass budget,
from the measured per-client memory (and from the library's automatic rule).

  python examples/finetune_pretrained.py --out finetune_pretrained.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fedjax_sim as fs  # noqa: E402

BUDGET = 256 * 2**20


def mirror(x):
  return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)


def data(args):
  from sklearn import datasets as skd
  from sklearn.model_selection import train_test_split

  d = skd.load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
  xpub, xfed, ypub, yfed = train_test_split(xtr, ytr, train_size=0.25, random_state=0,
                                            stratify=ytr)
  ids = fs.partition.dirichlet(yfed, args.num_clients, args.alpha, seed=0)
  pop = fs.Population.from_arrays({"x": mirror(xfed), "y": yfed}, ids,
                                  num_clients=args.num_clients)
  return (xpub, ypub), pop, {"x": mirror(xte), "y": yte}


def pretrain(model, x, y, steps, seed=0):
  """Central training on the public split (Adam, full batch)."""
  params = model.init(jax.random.key(seed), x[:1])["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model))
  batch = {"x": x, "y": y, fs.MASK_KEY: np.ones(len(y), np.float32)}
  opt = optax.adam(3e-3)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: loss_fn(p, batch, None)[0])(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


def per_client_bytes(sim_factory, params):
  """Growth of the compiled round's temporaries per extra client in a chunk (XLA analysis)."""
  temps = []
  for chunk in (2, 6):
    sim = sim_factory(chunk)
    state = sim.init(params, jax.random.key(0))
    temps.append(fs.memory.round_memory(sim, state).temp_bytes)
  return max((temps[1] - temps[0]) / 4, 1.0), temps[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--num-clients", type=int, default=100)
  ap.add_argument("--cohort", type=int, default=20)
  ap.add_argument("--alpha", type=float, default=0.3)
  ap.add_argument("--pretrain-steps", type=int, default=300)
  ap.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
  ap.add_argument("--clip", type=float, default=0.5)
  ap.add_argument("--noise", type=float, default=1.0)
  ap.add_argument("--bench-rounds", type=int, default=10)
  ap.add_argument("--configs", nargs="+", default=None,
                  help="run only these configurations (names as in the table)")
  ap.add_argument("--out", default="finetune_pretrained.png")
  args = ap.parse_args()

  (xpub, ypub), pop, test = data(args)
  base = fs.zoo.MLP(10, tuple(args.hidden))
  t0 = time.perf_counter()
  pretrained = pretrain(base, xpub, ypub, args.pretrain_steps)
  # The loading path of real weights: a msgpack file (flax.serialization) read back.
  from flax import serialization

  path = os.path.join(tempfile.mkdtemp(), "pretrained.msgpack")
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(jax.device_get(pretrained)))
  print(f"pretrained on {len(ypub)} public examples in {time.perf_counter() - t0:.1f} s; "
        f"saved to {path}")
  head = f"Dense_{len(args.hidden)}"
  dp = fs.aggregators.dp_mean(args.clip, args.noise)
  kw = dict(client_optimizer=optax.sgd(0.1), batch_size=10, local_epochs=1)
  configs = {  # name: (model, trainable= spec, aggregator)
      "full fine-tuning": (base, None, None),
      "head only": (base, lambda p: head in p, None),
      "LoRA r=2": (fs.peft.lora(base, 2), fs.peft.lora_trainable(), None),
      "LoRA r=8": (fs.peft.lora(base, 8), fs.peft.lora_trainable(), None),
      "FFA-LoRA r=8": (fs.peft.lora(base, 8), fs.peft.lora_trainable(freeze_a=True), None),
      "full fine-tuning + DP": (base, None, dp),
      "LoRA r=8 + DP": (fs.peft.lora(base, 8), fs.peft.lora_trainable(), dp),
      "FFA-LoRA r=8 + DP": (fs.peft.lora(base, 8), fs.peft.lora_trainable(freeze_a=True), dp),
  }
  if args.configs:
    configs = {k: v for k, v in configs.items() if k in args.configs}
  ev_base = fs.evaluation.make_eval_fn(
      fs.models.classifier_loss(fs.models.linen_apply(base)), test)
  zero_shot = ev_base(pretrained)
  print(f"pretrained model on the clients' (mirrored) test set: accuracy "
        f"{zero_shot['accuracy']:.3f}, loss {zero_shot['loss']:.3f}")
  rows, curves = [], {}
  for name, (model, trainable, agg) in configs.items():
    init = model.init(jax.random.key(1), xpub[:1])["params"]
    params = fs.peft.load_pretrained(init, path)
    loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model))
    algo = fs.algorithms.fedavg(loss_fn, aggregator=agg, trainable=trainable, **kw)

    def make(chunk, algo=algo):
      return fs.Simulation(algo, pop, cohort_size=args.cohort, chunk_size=chunk)

    ev = fs.evaluation.make_eval_fn(loss_fn, test)
    sim = fs.Simulation(algo, pop, cohort_size=args.cohort, memory_budget=BUDGET)
    state = sim.init(params, jax.random.key(2))
    auto_chunk = sim.chunk_size
    every = max(1, args.rounds // 10)
    state, m = sim.run(state, args.rounds, eval_every=every, eval_fn=ev,
                       delta=1e-5 if agg is not None else None)
    final = ev(state.params)
    ok = np.isfinite(m["eval_accuracy"])
    curves[name] = (np.flatnonzero(ok) + 1, m["eval_accuracy"][ok])
    view = params if trainable is None else fs.peft.trainable_view(params, trainable)
    n_train = sum(int(np.size(x)) for x in jax.tree.leaves(view))
    per_client, fixed = per_client_bytes(make, params)
    bench_sim = make(args.cohort)
    _, b = bench_sim.benchmark(bench_sim.init(params, jax.random.key(3)), args.bench_rounds)
    frozen = sum(int(np.size(x)) for x in jax.tree.leaves(params)) - n_train
    rule = fs.round.auto_chunk_size(10**6, n_train + frozen, 65 * 4, 10, BUDGET, "gpu",
                                    frozen_params=frozen)
    rows.append({
        "name": name, "acc": final["accuracy"], "loss": final["loss"], "trained": n_train,
        "bits": fs.peft.upload_bits(view), "mem": per_client,
        "cu_s": b["clients"] / b["seconds"], "fit": int((BUDGET - fixed) // per_client),
        "rule": rule, "auto": auto_chunk,
        "eps": float(m["epsilon"][-1]) if "epsilon" in m else None,
    })
  load = os.getloadavg()[0]
  print(f"\n{args.rounds} rounds, cohort {args.cohort} of {args.num_clients} clients, "
        f"Dirichlet({args.alpha}), DP: clip {args.clip}, z {args.noise}, delta 1e-5; "
        f"{jax.devices()[0].platform}, load average {load:.2f}\n")
  print("| configuration | test accuracy | test loss | trained params | bits uploaded / client "
        "| per-client memory (KiB) | client-updates/s | largest chunk in 256 MiB (measured) "
        "| automatic chunk rule (GPU) | epsilon |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(f"| pretrained, no fine-tuning | {zero_shot['accuracy']:.3f} | {zero_shot['loss']:.3f} "
        "| 0 | 0 | - | - | - | - | - |")
  for r in rows:
    eps = "-" if r["eps"] is None else f"{r['eps']:.2f}"
    print(f"| {r['name']} | {r['acc']:.3f} | {r['loss']:.3f} | {r['trained']} | {r['bits']} | "
          f"{r['mem'] / 1024:.1f} | {r['cu_s']:.0f} | {r['fit']} | {r['rule']} | {eps} |")

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, (x, y) in curves.items():
    a1.plot(x, y, "o-", ms=3, label=name)
  a1.axhline(zero_shot["accuracy"], color="gray", ls="--", label="pretrained, no fine-tuning")
  a1.set_xlabel("round")
  a1.set_ylabel("test accuracy (mirrored digits)")
  a1.set_title("federated fine-tuning of a pretrained MLP")
  a1.legend(fontsize=7)
  names = [r["name"] for r in rows]
  a2.barh(names, [r["bits"] / 8 / 1024 for r in rows])
  a2.set_xscale("log")
  a2.set_xlabel("KiB uploaded per client per round (log)")
  for i, r in enumerate(rows):
    a2.text(r["bits"] / 8 / 1024, i, f" acc {r['acc']:.2f}", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"\nsaved {args.out}")


if __name__ == "__main__":
  main()
