"""Checkpoint/resume is bit-identical; SIGTERM saves and stops; wrong configs are refused."""

import json
import os
import signal

import chex
import jax
import numpy as np
import optax
import pytest
from test_client_state import counting_algorithm

import fedjax_sim as fs
from fedjax_sim.checkpoint import SimulationInterrupted, read_log, to_csv


def make_sim(pop, loss_fn, cohort=4, algo=None):
  algo = algo or fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                                      local_epochs=1, server_optimizer=fs.algorithms.fedadam(0.05))
  return fs.Simulation(algo, pop, cohort_size=cohort)


def assert_states_equal(a, b):
  chex.assert_trees_all_equal((a.params, a.opt_state), (b.params, b.opt_state))


def test_resume_is_bit_identical(tmp_path, pop, loss_fn, init_params):
  sim = make_sim(pop, loss_fn, algo=counting_algorithm(loss_fn))
  full, _ = sim.run(sim.init(init_params(), jax.random.key(7)), num_rounds=9, block_size=3)
  sim2 = make_sim(pop, loss_fn, algo=counting_algorithm(loss_fn))
  part, _ = sim2.run(sim2.init(init_params(), jax.random.key(7)), num_rounds=4, block_size=3,
                     checkpoint_dir=str(tmp_path / "ck"))
  sim3 = make_sim(pop, loss_fn, algo=counting_algorithm(loss_fn))
  resumed = sim3.restore(str(tmp_path / "ck"), init_params())
  assert int(resumed.round) == 4
  resumed, _ = sim3.run(resumed, num_rounds=5, block_size=3)
  assert_states_equal(full, resumed)
  chex.assert_trees_all_equal(full.client_states, resumed.client_states)


@pytest.mark.slow  # a signal end to end; test_resume_is_bit_identical stays in the default tier
def test_sigterm_saves_then_resume_matches(tmp_path, pop, loss_fn, init_params):
  sim = make_sim(pop, loss_fn)
  full, _ = sim.run(sim.init(init_params(), jax.random.key(1)), num_rounds=8, block_size=2)
  killer = lambda rounds, block: os.kill(os.getpid(), signal.SIGTERM) if rounds == 4 else None  # noqa: E731
  sim2 = make_sim(pop, loss_fn)
  with pytest.raises(SimulationInterrupted, match="SIGTERM") as info:
    sim2.run(sim2.init(init_params(), jax.random.key(1)), num_rounds=8, block_size=2,
             checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=100, callback=killer)
  assert int(info.value.state.round) == 4 and len(info.value.metrics["loss"]) == 4
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  resumed = sim2.restore(str(tmp_path / "ck"), init_params())
  resumed, _ = sim2.run(resumed, num_rounds=4, block_size=2)
  assert_states_equal(full, resumed)


def test_other_configuration_is_refused_with_the_difference(tmp_path, pop, loss_fn, init_params):
  sim = make_sim(pop, loss_fn)
  sim.save(sim.init(init_params(), jax.random.key(0)), str(tmp_path / "ck"))
  other = make_sim(pop, loss_fn, cohort=5)
  with pytest.raises(ValueError, match="another configuration.*sampler"):
    other.restore(str(tmp_path / "ck"), init_params())
  with pytest.raises(FileNotFoundError):
    sim.restore(str(tmp_path / "missing"), init_params())


def test_corrupt_checkpoint_names_other_steps(tmp_path, pop, loss_fn, init_params):
  sim = make_sim(pop, loss_fn)
  state, _ = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=4, block_size=2,
                     checkpoint_dir=str(tmp_path / "ck"))
  latest = tmp_path / "ck" / "4"
  for root, _, files in os.walk(latest / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(ValueError, match=r"cannot be read.*other steps: \[2\]"):
    sim.restore(str(tmp_path / "ck"), init_params())
  earlier = sim.restore(str(tmp_path / "ck"), init_params(), step=2)
  assert int(earlier.round) == 2


def test_jsonl_log_and_csv(tmp_path, pop, loss_fn, init_params):
  sim = make_sim(pop, loss_fn)
  _, m = sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=5, block_size=2,
                 log_dir=str(tmp_path / "log"))
  log = read_log(str(tmp_path / "log"))
  np.testing.assert_array_equal(log["round"], np.arange(1, 6))
  np.testing.assert_allclose(log["loss"], m["loss"], rtol=1e-6)
  assert os.path.exists(to_csv(str(tmp_path / "log")))
  config = json.loads((tmp_path / "log" / "config.json").read_text())
  assert config["run_key_data"] == np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
  assert config["versions"]["jax"] == jax.__version__ and len(config["config_hash"]) == 16


def test_progress_prints_plain_lines_when_not_a_tty(pop, loss_fn, capsys, init_params):
  sim = make_sim(pop, loss_fn)
  sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=4, block_size=2, progress=True)
  err = capsys.readouterr().err
  assert "round 2: loss=" in err and "round 4: loss=" in err and "cu/s=" in err


def test_tensorboard_event_files(tmp_path, pop, loss_fn, init_params):
  from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401 - installed in [test]
  sim = make_sim(pop, loss_fn)
  sim.run(sim.init(init_params(), jax.random.key(0)), num_rounds=3, log_dir=str(tmp_path),
          tensorboard=True)
  events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
  assert events and os.path.getsize(tmp_path / events[0]) > 100
