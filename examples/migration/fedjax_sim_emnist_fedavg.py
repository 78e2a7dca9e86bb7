"""FedAvg on federated EMNIST with fedjax_sim: the equivalent of fedjax_emnist_fedavg.py.

Same data file (FedJAX's cached SQLite is read directly), same model, same optimizers, same
local work; the loop over rounds and the loop over clients become one compiled program:

  python examples/migration/fedjax_sim_emnist_fedavg.py \\
      --data ~/.cache/fedjax/federated_emnist_train.sqlite --rounds 1500 --cohort 10

``--init-params FILE.npz`` starts from the initial parameters a FedJAX run saved (its haiku
names ``init/linear/w`` ... are mapped to flax's ``Dense_0/kernel`` ...) and ``--out`` saves the
final ones in the same layout, so the two runs can be compared parameter by parameter
(tests/test_migration.py does this at smoke size; docs/migration.md says when the runs are
equal and when they only agree in distribution).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import fedjax_sim as fs


def haiku_to_flax(flat: dict[str, np.ndarray], tag: str) -> dict:
  """``{tag}/linear{,_1,_2}/{w,b}`` (haiku MLP) -> ``{Dense_i: {kernel, bias}}`` (fs.zoo.MLP)."""
  layers = sorted({k.split("/")[1] for k in flat if k.startswith(tag + "/")},
                  key=lambda s: int(s.rsplit("_", 1)[1]) if "_" in s else 0)
  return {f"Dense_{i}": {"kernel": flat[f"{tag}/{name}/w"], "bias": flat[f"{tag}/{name}/b"]}
          for i, name in enumerate(layers)}


def flax_to_haiku(params: dict, tag: str) -> dict[str, np.ndarray]:
  """The inverse of :func:`haiku_to_flax`."""
  out = {}
  for i in range(len(params)):
    name = "linear" if i == 0 else f"linear_{i}"
    out[f"{tag}/{name}/w"] = np.asarray(params[f"Dense_{i}"]["kernel"])
    out[f"{tag}/{name}/b"] = np.asarray(params[f"Dense_{i}"]["bias"])
  return out


def run(data: str, *, rounds: int, cohort: int, batch_size: int, epochs: int, client_lr: float,
        server_lr: float, hidden_units: int, seed: int = 0, init_params: dict | None = None):
  """Trains and returns ``(final params, metrics)``."""
  # fedjax.datasets.emnist.load_data flips the pixels (x = 1 - pixels): invert=True does the same.
  pop = fs.datasets.emnist(data, invert=True)
  model = fs.zoo.MLP(62, (hidden_units, hidden_units))  # = create_dense_model(hidden_units)
  if init_params is None:
    init_params = model.init(jax.random.key(seed), np.asarray(pop.features["x"][:1]))["params"]
  loss = fs.models.classifier_loss(fs.models.linen_apply(model))  # = fedjax.model_grad(model)
  algorithm = fs.algorithms.fedavg(
      loss,
      client_optimizer=optax.sgd(client_lr),  # = fedjax.optimizers.sgd(client_lr)
      server_optimizer=optax.sgd(server_lr),
      batch_size=batch_size, local_epochs=epochs)  # = ShuffleRepeatBatchHParams(B, epochs)
  sim = fs.Simulation(algorithm, pop, cohort_size=cohort)  # = UniformGetClientSampler(fd, K)
  state = sim.init(init_params, jax.random.key(seed))
  state, metrics = sim.run(state, rounds)  # = the `for r in range(rounds)` loop
  return state.params, metrics


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", required=True, help="EMNIST: FedJAX SQLite, TFF SQLite or TFF h5")
  ap.add_argument("--rounds", type=int, default=1500)
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--batch-size", type=int, default=20)
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--hidden-units", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--init-params", help="npz saved by fedjax_emnist_fedavg.py --out")
  ap.add_argument("--out", help="save the final parameters (npz, FedJAX's names)")
  args = ap.parse_args()
  init = None
  if args.init_params:
    with np.load(args.init_params) as f:
      init = haiku_to_flax(dict(f), "init")
  params, metrics = run(args.data, rounds=args.rounds, cohort=args.cohort,
                        batch_size=args.batch_size, epochs=args.epochs,
                        client_lr=args.client_lr, server_lr=args.server_lr,
                        hidden_units=args.hidden_units, seed=args.seed, init_params=init)
  print(f"{args.rounds} rounds; last round's mean client loss {float(metrics['loss'][-1]):.4f}")
  if args.out:
    np.savez(args.out, **flax_to_haiku(params, "final"))
    print("wrote", args.out)


if __name__ == "__main__":
  main()
