"""The migration example reaches the parameters its FedJAX 0.0.17 original reached.

tests/fixtures/federated/fedjax_emnist_fedavg_expected.npz is the output of
examples/migration/fedjax_emnist_fedavg.py run with FedJAX 0.0.17 (command in that script's
docstring) on tests/fixtures/federated/fedjax_migration.sqlite (written by FedJAX's own builder):
its initial and final parameters after 3 rounds of FedAvg over all 6 clients, 2 local epochs of
one full batch of 8.
"""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "federated")


def load_example():
  path = os.path.join(ROOT, "examples", "migration", "fedjax_sim_emnist_fedavg.py")
  spec = importlib.util.spec_from_file_location("fedjax_sim_emnist_fedavg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fedjax_sim_equivalent_reaches_fedjax_parameters():
  example = load_example()
  with np.load(os.path.join(FIXTURES, "fedjax_emnist_fedavg_expected.npz")) as f:
    recorded = dict(f)
  init = example.haiku_to_flax(recorded, "init")
  assert init["Dense_0"]["kernel"].shape == (784, 32) and len(init) == 3
  params, metrics = example.run(
      os.path.join(FIXTURES, "fedjax_migration.sqlite"), rounds=3, cohort=6, batch_size=8,
      epochs=2, client_lr=0.1, server_lr=1.0, hidden_units=32, init_params=init)
  got = example.flax_to_haiku(params, "final")
  want = {k: v for k, v in recorded.items() if k.startswith("final/")}
  assert sorted(got) == sorted(want)
  moved = max(float(np.abs(want[k] - recorded["init" + k[5:]]).max()) for k in want)
  assert moved > 1e-2  # FedJAX's training moved the parameters well beyond the tolerance below
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert np.all(np.isfinite(metrics["loss"]))
