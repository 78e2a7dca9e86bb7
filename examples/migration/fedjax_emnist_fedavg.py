"""FedAvg on federated EMNIST with FedJAX 0.0.17 (the "before" of docs/migration.md).

A complete FedJAX script (FedJAX's public API only). It needs FedJAX's own virtualenv (FedJAX
0.0.17 does not import with jax >= 0.5; pins in shared/bench/peers/fedjax/
requirements-fedjax-anchor.txt):

  /work/venvs/fedjax/bin/python examples/migration/fedjax_emnist_fedavg.py \\
      --data ~/.cache/fedjax/federated_emnist_train.sqlite --rounds 1500 --cohort 10

Its fedjax_sim equivalent is examples/migration/fedjax_sim_emnist_fedavg.py. The smoke-size run
recorded as tests/fixtures/federated/fedjax_emnist_fedavg_expected.npz (parameters before and
after, checked by tests/test_migration.py) is

  /work/venvs/fedjax/bin/python examples/migration/fedjax_emnist_fedavg.py \\
      --data tests/fixtures/federated/fedjax_migration.sqlite --rounds 3 --cohort 6 \\
      --batch-size 8 --epochs 2 --hidden-units 32 \\
      --out tests/fixtures/federated/fedjax_emnist_fedavg_expected.npz
"""

import argparse

import fedjax
import jax
import numpy as np
from fedjax.datasets import emnist


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", required=True, help="FedJAX EMNIST SQLite (train split)")
  ap.add_argument("--rounds", type=int, default=1500)
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--batch-size", type=int, default=20)
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--client-lr", type=float, default=0.1)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--hidden-units", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", help="save the initial and final parameters (npz)")
  args = ap.parse_args()

  # fedjax.datasets.emnist.load_data() downloads and caches these files; here we open one.
  train_fd = emnist.preprocess_split(fedjax.SQLiteFederatedData.new(args.data))
  # 784-200-200-62 MLP without dropout (create_conv_model's dropout draws FedJAX's own PRNG).
  model = fedjax.models.emnist.create_dense_model(hidden_units=args.hidden_units)
  grad_fn = fedjax.model_grad(model)
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      grad_fn,
      client_optimizer=fedjax.optimizers.sgd(args.client_lr),
      server_optimizer=fedjax.optimizers.sgd(args.server_lr),
      client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
          batch_size=args.batch_size, num_epochs=args.epochs))
  init_params = model.init(jax.random.PRNGKey(args.seed))
  state = algorithm.init(init_params)
  sampler = fedjax.client_samplers.UniformGetClientSampler(
      train_fd, num_clients=args.cohort, seed=args.seed)
  for r in range(args.rounds):
    clients = sampler.sample()
    state, _ = algorithm.apply(state, clients)
    print(f"round {r}: {len(clients)} clients")

  if args.out:
    flat = {}
    for tag, params in (("init", init_params), ("final", state.params)):
      for layer, values in params.items():
        for name, value in values.items():
          flat[f"{tag}/{layer}/{name}"] = np.asarray(value)
    np.savez(args.out, **flat)
    print("wrote", args.out)


if __name__ == "__main__":
  main()
