"""The real-data accuracy-suite configs run on the fixtures, and stop clearly without the data."""

import glob
import os

import pytest

from fedjax_sim import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "accuracy", "*.yaml")))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "federated", "tff_emnist.sqlite")
SO_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "federated", "tff_stackoverflow.sqlite")


def _fixture(config, tmp_path):
  """The fixture file of a config's dataset (a tiny pfl-style CIFAR-10 pickle is written)."""
  name = os.path.basename(config)
  if name.startswith("stackoverflow"):
    return SO_FIXTURE
  if name.startswith("cifar10_pfl"):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "cifar10_train.p"
    with open(path, "wb") as f:
      pickle.dump((rng.integers(0, 256, (120, 32, 32, 3), np.uint8),
                   rng.integers(0, 10, (120, 1))), f)
    return str(path)
  return FIXTURE


def test_configs_exist_and_missing_data_is_one_clear_line(capsys):
  assert len(CONFIGS) >= 2
  assert cli.main(["run", CONFIGS[0], "--set", "data.path=/nonexistent/fed_emnist_train.h5"]) == 2
  assert "data.path='/nonexistent/fed_emnist_train.h5' does not exist" in capsys.readouterr().err


@pytest.mark.slow  # one compile per config (~20 s of CPU each)
@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_smoke_on_fixture(config, tmp_path):
  assert cli.main(["run", config, "--set", f"data.path={_fixture(config, tmp_path)}",
                   "--set", "run.rounds=1",
                   "--set", "run.eval_every=1", "--set", "sampler.cohort_size=2",
                   "--set", f"run.out_dir={tmp_path / 'run'}", "--set", "run.progress=false"]) == 0
