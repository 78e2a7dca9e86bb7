"""A run owns its checkpoint and log directories; no run is lost or silently mixed with another.

Issue 15, items 1-6, 11, 12, 16-18: directory ownership (run id), rollbacks, checks before the
first round, save errors that keep the state, a fingerprint that covers hyper-parameters and
data, config.json, eval metrics in every log, one integer rule, signal handlers, ε accountant,
progress rate, and the README's test command.
"""

import json
import os
import re
import signal
import subprocess
import sys
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
from fedjax_sim.checkpoint import read_log, to_csv
from fedjax_sim.runs import ownership

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sim(pop, loss_fn, *, lr=0.2, batch_size=4, clip=None, chunk_size=None):
  aggregator = None if clip is None else fs.aggregators.dp_mean(clip, 0.0)
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), batch_size=batch_size,
                              local_epochs=1, aggregator=aggregator)
  return fs.Simulation(algo, pop, cohort_size=4, chunk_size=chunk_size)


@pytest.fixture(scope="module")
def sim(pop, loss_fn):
  return make_sim(pop, loss_fn)


@pytest.fixture(scope="module")
def start(init_params):
  """``start(sim, seed=0)``: ``sim``'s initial state from the shared linear model's params."""
  return lambda sim, seed=0: sim.init(init_params(), jax.random.key(seed))


def steps(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def assert_same_state(a, b):
  chex.assert_trees_all_equal((a.params, a.opt_state, a.round), (b.params, b.opt_state, b.round))


# -- 1. another run's folder -----------------------------------------------------------------


def test_another_runs_checkpoints_are_refused_then_overwritten_on_request(tmp_path, sim,
                                                                          init_params, start):
  d = str(tmp_path / "ck")
  sim.run(start(sim, 0), 6, block_size=2, checkpoint_dir=d)
  assert steps(d) == [2, 4, 6]
  other = start(sim, 1)
  with pytest.raises(ValueError, match=r"another run \(steps \[2, 4, 6\].*another run key"):
    sim.run(other, 4, block_size=2, checkpoint_dir=d)
  assert steps(d) == [2, 4, 6]  # nothing deleted, nothing run
  assert int(other.round) == 0 and np.isfinite(np.asarray(other.params["w"])).all()  # not donated
  with pytest.warns(UserWarning, match=r"overwrite=True: deleted checkpoint steps \[2, 4, 6\]"):
    b, _ = sim.run(other, 4, block_size=2, checkpoint_dir=d, overwrite=True)
  assert steps(d) == [2, 4]
  assert_same_state(sim.restore(d, init_params()), b)  # the new run, not the old round 6


def test_another_configuration_names_the_differences(tmp_path, pop, loss_fn, sim, start):
  d = str(tmp_path / "ck")
  sim.run(start(sim), 2, block_size=2, checkpoint_dir=d)
  other = make_sim(pop, loss_fn, lr=0.05)
  with pytest.raises(ValueError, match="another run.*differences: algorithm_digest"):
    other.run(start(other), 2, block_size=2, checkpoint_dir=d)


# -- 2. rollback, restart, collisions --------------------------------------------------------


def test_rollback_deletes_later_steps_and_continues_bit_identically(tmp_path, sim, init_params,
                                                                    start):
  d = str(tmp_path / "ck")
  sim.run(start(sim), 6, block_size=2, checkpoint_dir=d)
  at4 = sim.restore(d, init_params(), step=4)
  back = sim.restore(d, init_params(), step=2)
  with pytest.warns(UserWarning, match=r"starts at round 2: deleted its later checkpoint steps "
                                       r"\[4, 6\]"):
    again, _ = sim.run(back, 2, block_size=2, checkpoint_dir=d)
  assert steps(d) == [2, 4]
  assert_same_state(again, at4)
  assert_same_state(sim.restore(d, init_params()), at4)


def test_restart_of_the_same_run_from_round_0_replaces_its_steps(tmp_path, sim, start):
  d = str(tmp_path / "ck")
  sim.run(start(sim), 6, block_size=2, checkpoint_dir=d)
  with pytest.warns(UserWarning, match=r"deleted its later checkpoint steps \[2, 4, 6\]"):
    sim.run(start(sim), 2, block_size=2, checkpoint_dir=d)
  assert steps(d) == [2]


def test_legacy_checkpoint_without_run_id_restores_with_a_warning(tmp_path, sim, init_params,
                                                                  start):
  d = str(tmp_path / "ck")
  state = start(sim)
  fp = {k: v for k, v in ckpt.fingerprint(sim, state).items()
        if k not in run_dir.NEW_FIELDS + ("digest_jax",)}
  ckpt.save(d, state, fp)
  with pytest.warns(UserWarning, match="older version without"):
    restored = sim.restore(d, init_params())
  with pytest.warns(UserWarning, match="predate run ids"):
    sim.run(restored, 2, block_size=2, checkpoint_dir=d)
  assert steps(d) == [0, 2]


# -- JAX's global settings: other draws or precision, the same shapes -----------------------


def test_the_partitionable_setting_changes_draws_not_the_jaxpr(partitionable):
  """The premise: the traced program cannot see the setting, so the fingerprint records it."""
  draw = lambda: jax.random.uniform(jax.random.key(0), (4,))
  jaxpr = lambda: str(jax.make_jaxpr(draw)())
  partitionable(True)
  a, ja = np.asarray(draw()), jaxpr()
  partitionable(False)
  b, jb = np.asarray(draw()), jaxpr()
  assert ja == jb and not np.array_equal(a, b)


def test_a_checkpoint_of_other_prng_settings_is_refused_naming_the_fix(tmp_path, sim, start,
                                                                       init_params,
                                                                       partitionable):
  d, log = str(tmp_path / "ck"), str(tmp_path / "log")
  partitionable(True)
  fp_true = sim.fingerprint(start(sim))
  sim.run(start(sim), 2, block_size=2, checkpoint_dir=d, log_dir=log)
  partitionable(False)
  fix = re.escape("jax_threefry_partitionable=True (now False)") + ".*" + re.escape(
      "jax.config.update('jax_threefry_partitionable', True)")
  with pytest.raises(ValueError, match="comes from another run.*" + fix):
    sim.restore(d, init_params())
  fp_false = sim.fingerprint(start(sim))
  assert fp_true["prng"] == {"impl": "threefry2x32", "threefry_partitionable": True}
  assert fp_false["prng"]["threefry_partitionable"] is False
  assert fp_true["run_id"] != fp_false["run_id"]
  seen = run_dir.compare(fp_true, fp_false)
  assert seen.owner == "other" and seen.diffs == ["prng"]
  with pytest.raises(ValueError, match=r"checkpoints of another run \(steps \[2\].*" + fix):
    sim.run(start(sim), 2, block_size=2, checkpoint_dir=d)
  with pytest.raises(ValueError, match="holds the log of another run.*" + fix):
    sim.run(start(sim), 2, block_size=2, log_dir=log)
  with pytest.raises(ValueError, match="checkpoints of another run.*" + fix):
    sim.save(start(sim), str(tmp_path / "ck"))
  assert steps(d) == [2]  # nothing deleted, nothing run
  partitionable(True)  # the saved setting: the same run again
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    restored = sim.restore(d, init_params())
  assert int(restored.round) == 2
  sim.run(restored, 2, block_size=2, checkpoint_dir=d, log_dir=log)
  assert steps(d) == [2, 4]


def test_a_compiled_program_follows_the_setting_the_fingerprint_records(pop, loss_fn, start,
                                                                          partitionable):
  """A flip after a compile compiles again: the executable never runs the old setting while
  checkpoints record the new one."""
  program = fs.programs.Program(lambda k: jax.random.uniform(k, (4,)))
  partitionable(True)
  a = np.asarray(program(jax.random.key(0)))
  partitionable(False)
  b = np.asarray(program(jax.random.key(0)))
  assert program.num_compiles == 2 and not np.array_equal(a, b)
  np.testing.assert_array_equal(b, jax.random.uniform(jax.random.key(0), (4,)))
  sim = make_sim(pop, loss_fn)
  partitionable(True)
  sim.run(start(sim), 2)
  partitionable(False)
  flipped, _ = sim.run(start(sim), 2)
  fresh = make_sim(pop, loss_fn)
  expected, _ = fresh.run(start(fresh), 2)
  assert_same_state(flipped, expected)


def test_a_claim_of_other_prng_settings_is_refused_naming_the_fix(tmp_path, sim, start,
                                                                   partitionable):
  d = str(tmp_path / "claimed")
  os.makedirs(d)
  partitionable(True)
  fp = sim.fingerprint(start(sim))
  ownership.claim(d, fp, what="checkpoint_dir")
  partitionable(False)
  with pytest.raises(ValueError, match="claimed by another run.*jax_threefry_partitionable"
                                       r".*jax.config.update\('jax_threefry_partitionable', "
                                       r"True\)"):
    ownership.claim(d, sim.fingerprint(start(sim)), what="checkpoint_dir")


def test_a_checkpoint_of_another_x64_setting_is_refused_naming_the_fix(tmp_path, pop, loss_fn,
                                                                       init_params):
  """jax_enable_x64 with float32 params: the same state shapes and dtypes, other results."""
  d = str(tmp_path / "ck")
  sim = make_sim(pop, loss_fn)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), init_params())
  state, _ = sim.run(sim.init(params, jax.random.key(0)), 2, block_size=2, checkpoint_dir=d)
  before = jax.config.jax_enable_x64
  try:
    jax.config.update("jax_enable_x64", True)
    other = make_sim(pop, loss_fn)
    fp = other.fingerprint(other.init(params, jax.random.key(0)))
    assert fp["x64"] is True and fp["state"] == sim.fingerprint(state)["state"]
    with pytest.raises(ValueError, match="comes from another run.*" + re.escape(
        "jax_enable_x64=False (now True)") + ".*" + re.escape(
        "jax.config.update('jax_enable_x64', False)")):
      other.restore(d, params)
  finally:
    jax.config.update("jax_enable_x64", before)


def test_a_checkpoint_without_the_prng_field_restores_with_a_warning(tmp_path, sim, start,
                                                                      init_params):
  """Saved before the field existed (at jax's defaults): the same run id, so it restores with a
  warning and its directory stays this run's."""
  d = str(tmp_path / "ck")
  state = start(sim)
  fp = ckpt.fingerprint(sim, state)
  old = {k: v for k, v in fp.items() if k not in ("prng", "x64")}
  assert run_dir.run_id(old, state.key) == fp["run_id"]  # ids of existing runs are unchanged
  ckpt.save(d, state, old)
  with pytest.warns(UserWarning, match=r"older version without \['prng', 'x64'\]"):
    restored = sim.restore(d, init_params())
  sim.run(restored, 2, block_size=2, checkpoint_dir=d)
  assert steps(d) == [0, 2]


# -- checks before the first round; the state survives a save error --------------------------


def test_zero_size_leaf_is_refused_before_the_first_round(tmp_path, pop, loss_fn, init_params):
  algo = fs.algorithms.fedavg(
      lambda p, b, k: loss_fn({"w": p["w"], "b": p["b"]}, b, k),
      client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=4)
  state = sim.init({**init_params(), "empty": jnp.zeros((0, 3))}, jax.random.key(0))
  with pytest.raises(ValueError, match=r"\['empty'\] has zero size"):
    sim.run(state, 2, checkpoint_dir=str(tmp_path / "ck"))
  assert not os.path.exists(tmp_path / "ck" / "2") and int(state.round) == 0
  with pytest.raises(ValueError, match="zero size"):
    sim.save(state, str(tmp_path / "ck2"))


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_unusable_checkpoint_dir_is_refused_before_the_first_round(tmp_path, sim, where, start):
  (tmp_path / "f").write_text("x")
  d = str(tmp_path / "f") if where == "file" else str(tmp_path / "f" / "ck")
  state = start(sim)
  with pytest.raises(ValueError, match="checkpoint_dir=.*(is a file|cannot be created)"):
    sim.run(state, 2, checkpoint_dir=d)
  assert int(state.round) == 0


def test_save_error_keeps_the_state(tmp_path, sim, monkeypatch, start):
  full, _ = sim.run(start(sim), 4, block_size=2)
  calls = []

  def failing_save(directory, state, fp, **kw):
    calls.append(int(state.round))
    raise OSError("disk full")

  monkeypatch.setattr(fs.runs.store, "save", failing_save)  # where checkpoints are written
  with pytest.raises(run_dir.CheckpointSaveError, match="step 2 .*disk full") as info:
    sim.run(start(sim), 4, block_size=2, checkpoint_dir=str(tmp_path / "ck"))
  assert calls == [2] and len(info.value.metrics["loss"]) == 2
  monkeypatch.undo()
  rest, _ = sim.run(info.value.state, 2, block_size=2)  # usable: not deleted by donation
  assert_same_state(rest, full)


def test_manual_save_refuses_collisions_pruning_and_other_runs(tmp_path, sim, start):
  d = str(tmp_path / "ck")
  state, _ = sim.run(start(sim), 4, block_size=2, checkpoint_dir=d)
  with pytest.raises(ValueError, match="already holds step 4"):
    sim.save(state, d)
  with pytest.raises(ValueError, match=r"later steps \[2, 4\] than this state's round 0"):
    sim.save(start(sim), d)
  with pytest.raises(ValueError, match=r"checkpoints of another run \(steps \[2, 4\]\)"):
    sim.save(start(sim, 1), d)
  assert steps(d) == [2, 4]


# -- 4. the fingerprint covers what changes results ------------------------------------------


@pytest.mark.parametrize("change", ["lr", "batch_size", "clip", "data"])
def test_restore_refuses_other_hyper_parameters_or_data(tmp_path, clients, pop, loss_fn,
                                                         change, init_params, start):
  base = make_sim(pop, loss_fn, clip=1.0)
  base.save(start(base), str(tmp_path / "ck"))
  if change == "data":  # same shapes, other values
    other_pop = fs.Population.from_clients([{"x": c["x"] + 1.0, "y": c["y"]} for c in clients])
    assert other_pop.features["x"].shape == pop.features["x"].shape
    other = make_sim(other_pop, loss_fn, clip=1.0)
  else:
    kw = {"lr": {"lr": 0.3}, "batch_size": {"batch_size": 5}, "clip": {"clip": 2.0}}[change]
    other = make_sim(pop, loss_fn, **{"clip": 1.0, **kw})
  field = "population_digest" if change == "data" else "algorithm_digest"
  with pytest.raises(ValueError, match=f"another configuration \\({field}"):
    other.restore(str(tmp_path / "ck"), init_params())


def test_fingerprint_ignores_chunk_size_and_population_placement(pop, loss_fn, sim, start):
  a = ckpt.fingerprint(sim, start(sim))
  chunked = make_sim(pop, loss_fn, chunk_size=1)
  hosted = fs.Simulation(sim.algorithm, pop, cohort_size=4, population_on="host")
  for other in (chunked, hosted):
    b = ckpt.fingerprint(other, start(other))
    assert (b["algorithm_digest"], b["population_digest"], b["run_id"]) == (
        a["algorithm_digest"], a["population_digest"], a["run_id"])
  assert ckpt.fingerprint(sim, start(sim, 1))["run_id"] != a["run_id"]  # the seed is the run


def test_population_digest_sees_one_changed_value_and_a_permutation(clients):
  base = run_dir.population_digest(fs.Population.from_clients(clients))
  changed = [dict(c) for c in clients]
  changed[3] = {"x": changed[3]["x"].copy(), "y": changed[3]["y"]}
  changed[3]["x"][0, 0] += 1e-6
  swapped = [dict(c) for c in clients]
  swapped[0] = {"x": swapped[0]["x"][::-1].copy(), "y": swapped[0]["y"][::-1].copy()}
  assert run_dir.population_digest(fs.Population.from_clients(changed)) != base
  assert run_dir.population_digest(fs.Population.from_clients(swapped)) != base


# -- 3, 5, 6. the log directory: ownership, config.json, eval metrics ------------------------


def eval_fn(params):
  return {"w_norm": float(jnp.linalg.norm(params["w"]))}


def test_resumed_log_continues_and_config_json_is_extended(tmp_path, sim, init_params, start):
  d = str(tmp_path / "run")
  sim.run(start(sim), 4, block_size=2, checkpoint_dir=d + "/ck", log_dir=d,
          settings={"client_lr": 0.2, "seed": 0})
  first = json.load(open(os.path.join(d, "config.json")))
  sim.run(sim.restore(d + "/ck", init_params()), 2, block_size=2, checkpoint_dir=d + "/ck",
          log_dir=d, settings={"client_lr": 0.2, "seed": 0})
  config = json.load(open(os.path.join(d, "config.json")))
  assert config["run_id"] == first["run_id"] and config["fingerprint"] == first["fingerprint"]
  assert config["settings"] == {"client_lr": 0.2, "seed": 0}
  assert [s["start_round"] for s in config["sessions"]] == [0, 4]
  assert [s["num_rounds"] for s in config["sessions"]] == [4, 2]
  np.testing.assert_array_equal(read_log(d)["round"], np.arange(1, 7))


def test_log_of_another_run_is_refused_and_a_restart_drops_later_rows(tmp_path, sim, start):
  d = str(tmp_path / "run")
  sim.run(start(sim), 4, block_size=2, log_dir=d)
  with pytest.raises(ValueError, match="log_dir=.*holds the log of another run"):
    sim.run(start(sim, 1), 2, block_size=2, log_dir=d)
  with pytest.warns(UserWarning, match="dropped 4 later rows"):
    sim.run(start(sim), 2, block_size=2, log_dir=d)  # the same run from round 0
  np.testing.assert_array_equal(read_log(d)["round"], [1, 2])
  with pytest.warns(UserWarning, match="overwrite=True: deleted"):
    sim.run(start(sim, 1), 2, block_size=2, log_dir=d, overwrite=True)
  assert json.load(open(os.path.join(d, "config.json")))["run_key_data"] == np.asarray(
      jax.random.key_data(jax.random.key(1))).tolist()


def test_legacy_log_dir_is_taken_over_with_a_warning(tmp_path, sim, start):
  d = tmp_path / "run"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"config_hash": "0" * 16, "fingerprint": {}}))
  (d / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
  with pytest.warns(UserWarning) as record:
    sim.run(start(sim), 2, block_size=2, log_dir=str(d))
  messages = " | ".join(str(w.message) for w in record)
  assert "predates run ids" in messages and "dropped 2 later rows" in messages
  np.testing.assert_array_equal(read_log(str(d))["round"], [1, 2])
  assert len(json.load(open(d / "config.json"))["sessions"]) == 1


def test_eval_metrics_reach_jsonl_csv_and_tensorboard(tmp_path, sim, start):
  d = str(tmp_path / "run")
  _, m = sim.run(start(sim), 4, block_size=2, eval_every=2, eval_fn=eval_fn, log_dir=d,
                 tensorboard=True)
  log = read_log(d)
  np.testing.assert_array_equal(np.isnan(log["eval_w_norm"]), [True, False, True, False])
  np.testing.assert_allclose(log["eval_w_norm"][[1, 3]], m["eval_w_norm"][[1, 3]], rtol=1e-12)
  header = open(to_csv(d)).readline().strip().split(",")
  assert "eval_w_norm" in header
  events = [f for f in os.listdir(d) if f.startswith("events.out.tfevents")]
  assert b"eval_w_norm" in open(os.path.join(d, events[0]), "rb").read()


# -- 11. one integer rule --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error", [
    ({"num_rounds": True}, "num_rounds must be a positive int; got True"),
    ({"num_rounds": 2.0}, "num_rounds must be a positive int; got 2.0"),
    ({"block_size": True}, "block_size must be a positive int; got True"),
    ({"eval_every": 0, "eval_fn": eval_fn}, "eval_every must be a positive int; got 0"),
    ({"checkpoint_every": np.float32(2)}, "checkpoint_every must be a positive int"),
    ({"block_size": np.int64(2), "eval_every": np.int32(2), "eval_fn": eval_fn,
      "checkpoint_every": np.int16(2)}, None),
])
def test_one_integer_rule(tmp_path, sim, kwargs, error, start):
  kwargs = {"num_rounds": np.int64(2), **kwargs}
  if "checkpoint_every" in kwargs:
    kwargs["checkpoint_dir"] = str(tmp_path / "ck")
  state = start(sim)
  if error is None:
    _, m = sim.run(state, **kwargs)
    assert len(m["loss"]) == 2 and np.isfinite(m["eval_w_norm"][1])
  else:
    with pytest.raises(ValueError, match=re.escape(error)):
      sim.run(state, **kwargs)


# -- 12. the signal handler is restored whatever raised --------------------------------------


@pytest.mark.parametrize("what", ["callback", "eval_fn"])
def test_signal_handlers_restored_when_run_raises(tmp_path, sim, what, start):
  mine = lambda signum, frame: None  # noqa: E731
  old = signal.signal(signal.SIGINT, mine)
  try:
    def boom(*args):
      raise RuntimeError("user code failed")

    kw = {"callback": boom} if what == "callback" else {"eval_fn": boom, "eval_every": 2}
    with pytest.raises(RuntimeError, match="user code failed"):
      sim.run(start(sim), 2, block_size=2, checkpoint_dir=str(tmp_path / "ck"), **kw)
    assert signal.getsignal(signal.SIGINT) is mine
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  finally:
    signal.signal(signal.SIGINT, old)


def test_sigint_mid_block_then_resume_is_bit_identical(tmp_path, sim, init_params, start):
  import threading

  # What the run must restore: Python's default handler, or SIG_IGN where the shell started
  # this process in the background (nohup, `cmd &` without job control).
  before = signal.getsignal(signal.SIGINT)
  full, _ = sim.run(start(sim), 40, block_size=2)
  sender = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT))

  def callback(rounds, block):
    if rounds == 2:
      sender.start()  # fires while the next block computes
    else:
      sender.join()  # delivered by now: the run stops at this block's end at the latest

  d = str(tmp_path / "ck")
  with pytest.raises(fs.checkpoint.SimulationInterrupted, match="SIGINT") as info:
    sim.run(start(sim), 40, block_size=2, checkpoint_dir=d, checkpoint_every=100,
            callback=callback)
  stopped = int(info.value.state.round)
  assert stopped in (4, 6) and steps(d) == [stopped]
  assert signal.getsignal(signal.SIGINT) is before
  resumed = sim.restore(d, init_params())
  resumed, _ = sim.run(resumed, 40 - stopped, block_size=2, checkpoint_dir=d)
  assert_same_state(resumed, full)


# -- 16. accountant choice in run(); an achievable cap ---------------------------------------


@pytest.mark.slow  # (~3 s) test_privacy's accountant tests stay
def test_run_takes_the_accountant_and_the_cap_message_is_achievable(pop, loss_fn, init_params):
  n = pop.num_clients
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1, aggregator=fs.aggregators.dp_mean(1.0, 1.0))
  sim = fs.Simulation(algo, pop, sampler=fs.sampling.poisson(0.5, max_cohort_size=8))
  with pytest.raises(ValueError, match="max_cohort_size to at least") as info:
    sim.run(sim.init(init_params(), jax.random.key(0)), 2, delta=1e-5)
  need = int(re.search(r"at least (\d+)", str(info.value)).group(1))
  assert need <= n  # achievable: a cap of N never truncates
  capped = fs.sampling.poisson(0.5, max_cohort_size=need)
  assert np.isfinite(fs.privacy.epsilon(capped, n, 1.0, 2, 1e-5))
  _, m = sim.run(sim.init(init_params(), jax.random.key(0)), 2, delta=1e-5, accountant="pld")
  want = fs.privacy.epsilon(sim.sampler, n, 1.0, 2, 1e-5, accountant="pld")
  np.testing.assert_allclose(m["epsilon"][-1], want, rtol=1e-9)
  with pytest.raises(ValueError, match="accountant must be 'rdp' or 'pld'; got 'PLD'"):
    sim.run(sim.init(init_params(), jax.random.key(0)), 2, delta=1e-5, accountant="PLD")


# -- 17. progress counts the clients that took part ------------------------------------------


def test_progress_rate_counts_real_clients(monkeypatch, capsys):
  from fedjax_sim import progress

  clock = iter([10.0, 12.0])
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  bar = progress.Progress(total=2, cohort=100)  # capacity 100 per round
  bar.update(2, 2, {"loss": np.ones(2), "clients": np.asarray([3.0, 5.0])}, None)
  assert capsys.readouterr().err.split()[-1] == "cu/s=4"  # 8 real clients in 2 s, not 200/2


# -- 18. the README's test command -----------------------------------------------------------


def test_ci_runs_the_readme_test_command_verbatim():
  readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
  command = 'pip install -e ".[test]" && pytest'
  assert command in readme
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert 'bash -c "$test_command"' in ci and "python3 -m pytest\n" not in ci


# Slow (default tier budget): a second pytest process; .ci/run's plain `pytest` (no PYTHONPATH)
# collects tests/test_bench_harness.py itself and fails on its import error.
@pytest.mark.slow
def test_plain_pytest_collects_the_benchmark_harness_tests():
  pytest_exe = os.path.join(os.path.dirname(sys.executable), "pytest")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([pytest_exe, "--collect-only", "-q", "-p", "no:cacheprovider",
                        "tests/test_bench_harness.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "ModuleNotFoundError" not in out.stdout


def test_no_unexpected_warnings_on_a_fresh_directory(tmp_path, sim, start):
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    sim.run(start(sim), 2, block_size=2, checkpoint_dir=str(tmp_path / "ck"),
            log_dir=str(tmp_path / "log"))
