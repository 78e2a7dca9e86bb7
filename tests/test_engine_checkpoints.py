"""Checkpoints and logs written by an earlier engine (before the round moved to fedjax_sim.core)
still restore and resume: the algorithm digest traces the engine's code, so a digest from another
engine version is reported as incomparable, not as another configuration."""

import json
import os
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint as ckpt
from fedjax_sim import run_dir


@pytest.fixture(scope="module")
def setup(pop, loss_fn):
  return pop, loss_fn


PARAMS = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}


def _sim(setup, lr=0.2):
  pop, loss_fn = setup
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), batch_size=4,
                              local_epochs=1)
  return fs.Simulation(algo, pop, cohort_size=3, chunk_size=3)


def _old_engine(fp):
  """The fingerprint an engine before ``digest_engine`` would have written for this run."""
  old = {k: v for k, v in fp.items() if k != "digest_engine"}
  old["algorithm_digest"] = "0123456789abcdef"  # another traced program
  old["run_id"] = run_dir.run_id(old, jax.random.key(0))
  return old


def test_old_engine_checkpoint_restores_and_resumes(tmp_path, setup):
  sim = _sim(setup)
  d = str(tmp_path / "ck")
  state, _ = sim.run(sim.init(PARAMS, jax.random.key(0)), 2)
  expect = jax.tree.map(np.asarray, state.params)
  ckpt.save(d, state, _old_engine(ckpt.fingerprint(sim, state)))
  with pytest.warns(UserWarning, match="engine 1 .*cannot be compared"):
    restored = sim.restore(d, PARAMS)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.params), expect)
  with pytest.warns(UserWarning, match="another jax or engine version"):
    state, metrics = sim.run(restored, 2, checkpoint_dir=d)
  assert int(state.round) == 4 and np.all(np.isfinite(metrics["loss"]))
  with open(os.path.join(d, "4", "meta", "metadata")) as f:
    assert json.load(f)["digest_engine"] == run_dir.ENGINE_DIGEST


def test_another_configuration_is_still_refused_by_the_same_engine(tmp_path, setup):
  d = str(tmp_path / "ck")
  a = _sim(setup, lr=0.2)
  a.run(a.init(PARAMS, jax.random.key(0)), 2, checkpoint_dir=d)
  b = _sim(setup, lr=0.3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "older engine" leniency: same engine, other lr
    with pytest.raises(ValueError, match="another run.*algorithm_digest"):
      b.run(b.init(PARAMS, jax.random.key(0)), 2, checkpoint_dir=d)


def test_old_engine_log_is_taken_as_this_runs(tmp_path, setup):
  sim = _sim(setup)
  d = str(tmp_path / "log")
  state, _ = sim.run(sim.init(PARAMS, jax.random.key(0)), 2, log_dir=d)
  path = os.path.join(d, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["fingerprint"] = _old_engine(config["fingerprint"])
  config["run_id"] = config["fingerprint"]["run_id"]
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.warns(UserWarning, match="another jax or engine version"):
    sim.run(state, 1, log_dir=d)
  assert len(ckpt.read_log(d)["loss"]) == 3


def test_speed_only_settings_do_not_change_the_configuration(tmp_path, setup):
  pop, loss_fn = setup
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1)
  d = str(tmp_path / "ck")
  a = fs.Simulation(algo, pop, cohort_size=3, chunk_size=3)
  a.run(a.init(PARAMS, jax.random.key(0)), 2, checkpoint_dir=d)
  b = fs.Simulation(algo, pop, cohort_size=3, chunk_size=1, sort_by_size=False,
                    unbatched_single_client=False)
  assert int(b.restore(d, PARAMS).round) == 2


@pytest.mark.slow  # (~2.5 s) test_old_engine_log_is_taken_as_this_runs stays
def test_a_torn_last_log_row_does_not_block_the_resume(tmp_path, setup):
  sim = _sim(setup)
  d, log = str(tmp_path / "ck"), str(tmp_path / "log")
  sim.run(sim.init(PARAMS, jax.random.key(0)), 2, checkpoint_dir=d, log_dir=log)
  with open(os.path.join(log, "metrics.jsonl"), "a") as f:
    f.write('{"round": 3, "loss": 0.')  # killed mid-write
  with pytest.warns(UserWarning, match="dropped 1 unreadable row"):
    sim.run(sim.restore(d, PARAMS), 1, checkpoint_dir=d, log_dir=log)
  assert ckpt.read_log(log)["round"].tolist() == [1, 2, 3]


def test_a_checkpoint_from_another_optax_restores_with_a_warning(tmp_path, setup):
  sim = _sim(setup)
  d = str(tmp_path / "ck")
  state, _ = sim.run(sim.init(PARAMS, jax.random.key(0)), 1)
  fp = dict(ckpt.fingerprint(sim, state))
  fp["digest_libs"], fp["algorithm_digest"] = "optax 0.0.1, flax 0.0.1", "fedcba9876543210"
  ckpt.save(d, state, fp)
  with pytest.warns(UserWarning, match="optax 0.0.1.*cannot be compared"):
    assert int(sim.restore(d, PARAMS).round) == 1
  fp["digest_libs"] = run_dir.traced_library_versions()  # same libraries: another config
  ckpt.save(str(tmp_path / "ck2"), state, fp)
  with pytest.raises(ValueError, match="another configuration"):
    sim.restore(str(tmp_path / "ck2"), PARAMS)
