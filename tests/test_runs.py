"""The host wing (fedjax_sim/runs/): identity's one comparison, speed-only settings outside a
run's identity, run options as one value, the XLA flags a run records, and the import switch."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import host_cpu
from fedjax_sim.runs import identity
from fedjax_sim.sweep import _state_spec

FP = {"algorithm": "fedavg", "num_clients": 4, "algorithm_digest": "a" * 16,
      "population_digest": "b" * 16, "digest_jax": "0.10.2", "digest_engine": "2",
      "digest_libs": "optax 0.2.8, flax 0.12.8", "run_id": "r1"}


@pytest.mark.parametrize("change,owner,diffs", [
    ({}, "same", []),
    ({"run_id": "r2"}, "other", []),  # same configuration, another run key
    ({"run_id": "r2", "num_clients": 8}, "other", ["num_clients"]),
    ({"run_id": None}, "legacy", []),
    ({"run_id": "r2", "digest_engine": "1", "algorithm_digest": "c" * 16}, "older",
     ["algorithm_digest"]),
    ({"run_id": "r2", "digest_engine": "1", "algorithm_digest": "c" * 16, "num_clients": 8},
     "other", ["algorithm_digest", "num_clients"]),
])
def test_compare_names_the_owner_and_the_differences(change, owner, diffs):
  saved = {k: v for k, v in {**FP, **change}.items() if v is not None}
  seen = identity.compare(saved, FP)
  assert (seen.owner, seen.diffs) == (owner, diffs)
  # An incomparable digest is no evidence of another configuration; a missing field neither.
  assert "algorithm_digest" not in seen.config_diffs or not seen.incomparable


def test_compare_skips_fields_an_old_fingerprint_predates():
  saved = {k: v for k, v in FP.items() if k not in ("population_digest", "run_id")}
  seen = identity.compare(saved, FP)
  assert seen.owner == "legacy" and seen.missing == ["population_digest"]
  assert seen.config_diffs == []
  assert identity.compare(saved, FP, saved_run_id="r1").owner == "same"


def test_compare_sees_jax_settings_and_skips_them_where_a_fingerprint_predates_them():
  fp = {**FP, **identity.jax_settings()}
  flipped = {**fp, "run_id": "r2", "prng": {**fp["prng"], "threefry_partitionable": False}}
  seen = identity.compare(flipped, fp)
  assert (seen.owner, seen.diffs, seen.config_diffs) == ("other", ["prng"], ["prng"])
  hint = identity.settings_hint(flipped, {**fp, "prng": {**fp["prng"],
                                                         "threefry_partitionable": True}})
  assert "jax.config.update('jax_threefry_partitionable', False)" in hint
  # Written before the fields, by another jax / engine: taken to be this run's, as before them.
  old = {**{k: v for k, v in fp.items() if k not in ("prng", "x64")}, "run_id": "r2",
         "digest_engine": "1", "algorithm_digest": "c" * 16}
  seen = identity.compare(old, fp)
  assert (seen.owner, seen.missing, seen.config_diffs) == ("older", ["prng", "x64"], [])
  assert identity.settings_hint(old, fp) == ""


@pytest.fixture(scope="module")
def sims(pop, loss_fn):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  return [fs.Simulation(algo, pop, cohort_size=4, chunk_size=c, sort_by_size=s)
          for c, s in ((4, True), (2, False))]


PARAMS = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}


def test_speed_only_settings_are_not_part_of_a_runs_identity(sims):
  a, b = sims
  sa, sb = a.init(PARAMS, jax.random.key(0)), b.init(PARAMS, jax.random.key(0))
  assert a.plan.performance != b.plan.performance
  assert a.plan.performance == fs.Performance(chunk_size=4, sort_by_size=True,
                                             trim_last_batch=False)  # resolved: tiny step
  fa, fb = a.fingerprint(sa), b.fingerprint(sb)
  assert fa["algorithm_digest"] != "unavailable" and fa == fb


def test_run_options_value_and_keywords_agree_and_config_records_xla_flags(sims, tmp_path):
  sim = sims[0]
  options = fs.RunOptions(block_size=2, log_dir=str(tmp_path / "a"))
  s1, m1 = sim.run(sim.init(PARAMS, jax.random.key(0)), 2, options)
  s2, m2 = sim.run(sim.init(PARAMS, jax.random.key(0)), 2, block_size=2,
                   log_dir=str(tmp_path / "b"))
  chex.assert_trees_all_equal(m1, m2)
  chex.assert_trees_all_equal(s1.params, s2.params)
  _, m3 = sim.run(s2, 2, options, log_dir=str(tmp_path / "b"))  # a keyword overrides options
  assert len(m3["loss"]) == 2
  with open(tmp_path / "b" / "config.json") as f:
    config = json.load(f)
  assert len(config["sessions"]) == 2
  flags = config["sessions"][-1]["xla_flags"]
  assert flags["XLA_FLAGS"] == os.environ.get("XLA_FLAGS")
  assert flags["added_by_fedjax_sim"] == list(host_cpu.added_flags())
  assert flags["switch"].startswith("FEDJAX_SIM_XLA_FLAGS=")
  with pytest.raises(TypeError, match="unexpected keyword argument 'eval_evry'"):
    sim.run(s2, 1, eval_evry=1)


def test_sweep_state_spec_holds_every_piece_of_the_initial_state(sims, pop, loss_fn):
  """A per-client aggregator stage's state (top-k error feedback) is part of the lane's state."""
  def algo(feedback):
    agg = fs.aggregators.process(per_client=fs.aggregators.top_k(2, error_feedback=feedback))
    return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                                local_epochs=1, aggregator=agg)

  plan = sims[0].plan
  with_feedback = _state_spec(plan, algo(True), PARAMS)
  assert with_feedback != _state_spec(plan, algo(False), PARAMS)
  lane = dataclasses.replace(plan, algorithm=algo(True))
  state = jax.eval_shape(lambda p: fs.core.initial_state(lane, p, jax.random.key(0)), PARAMS)
  assert jax.tree.leaves(state.agg_client_states)  # the piece the hand-written list missed
  assert len(with_feedback[1]) == len(jax.tree.leaves(state))


def test_xla_flags_switch_off_leaves_xla_flags_untouched(monkeypatch):
  """``FEDJAX_SIM_XLA_FLAGS=0``: the import-time configuration changes nothing (in-process:
  the backend is taken as not yet started; the device count switch is at its default)."""
  monkeypatch.setattr(host_cpu, "backend_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
  monkeypatch.setenv(host_cpu.ENV_FLAGS, "0")
  monkeypatch.delenv(host_cpu.ENV_DEVICES, raising=False)
  saved = dict(host_cpu._state)
  try:
    assert host_cpu.auto_configure() == {"devices": None, "flags": ()}
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/nowhere"
  finally:
    host_cpu._state.update(saved)


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["0", "1"])
def test_import_changes_only_the_documented_xla_flags(switch):
  """A fresh process: ``import fedjax_sim`` starts no backend and changes no environment
  variable but ``XLA_FLAGS``; with ``FEDJAX_SIM_XLA_FLAGS=0`` not even that."""
  code = ("import os, json; before = dict(os.environ);"
          "import fedjax_sim, fedjax_sim.host_cpu as h; after = dict(os.environ);"
          "print(json.dumps({'changed': sorted(k for k in set(before) | set(after)"
          " if before.get(k) != after.get(k)), 'xla': after.get('XLA_FLAGS'),"
          " 'started': h.backend_started(), 'added': list(h.added_flags())}))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ("FEDJAX_SIM_HOST_DEVICES",)}
  env.update(PYTHONPATH=root, FEDJAX_SIM_XLA_FLAGS=switch, XLA_FLAGS="--xla_dump_to=/nowhere")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, check=True).stdout
  seen = json.loads(out.strip().splitlines()[-1])
  assert not seen["started"]
  if switch == "0":
    assert seen["changed"] == [] and seen["xla"] == "--xla_dump_to=/nowhere"
  else:
    assert seen["changed"] in ([], ["XLA_FLAGS"])
    assert seen["xla"] == " ".join(["--xla_dump_to=/nowhere", *seen["added"]])
    assert all(f.split("=")[0].lstrip("-") in dict(host_cpu.FAST_XLA_FLAGS)
               for f in seen["added"])


def test_a_state_of_another_population_is_refused_before_running(make_population, loss_fn):
  """SCAFFOLD's per-client control variates for 4 clients under an 8-client plan: refused by
  Simulation.run / round (after init) and by core.round_step, naming the piece."""
  algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=4, local_steps=1)
  small = fs.Simulation(algo, fs.Population.from_clients(make_population(num_clients=4)),
                        cohort_size=2, chunk_size=2)
  big = fs.Simulation(algo, fs.Population.from_clients(make_population(num_clients=8)),
                      cohort_size=2, chunk_size=2)
  foreign = small.init(PARAMS, jax.random.key(0))
  big.init(PARAMS, jax.random.key(0))
  for call in (lambda: big.run(foreign, 1), lambda: big.round(foreign)):
    with pytest.raises(ValueError, match=r"state\.client_states.* \(4, 3\).* for 8 clients"):
      call()
  with pytest.raises(ValueError, match=r"state\.client_states.*another population or plan"):
    jax.eval_shape(lambda s, p: fs.core.round_step(big.plan, s, p), foreign, big.population)


RACE_CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import fedjax_sim as fs

directory, seed, role, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0)
x = rng.normal(size=(60, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 6, 60))
algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
                            client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
sim = fs.Simulation(algo, pop, cohort_size=2, chunk_size=2)
state = sim.init(jnp.zeros((3, 2)), jax.random.key(seed))
run_id = sim.fingerprint(state)["run_id"]

def wait_for(name):
  deadline = time.time() + 120
  while not os.path.exists(os.path.join(sync, name)):
    assert time.time() < deadline, name
    time.sleep(0.05)

def callback(done, block):
  if role == "first" and done == 1:  # claimed, round 1 done, nothing saved yet
    open(os.path.join(sync, "first_claimed"), "w").close()
    wait_for("second_done")

if role != "first":
  wait_for("first_claimed")
try:
  sim.run(state, 3, block_size=1, checkpoint_dir=directory, callback=callback,
          overwrite=role == "takeover")
  status = "ok"
except Exception as e:
  status = f"{type(e).__name__}: {e}"
if role != "first":
  open(os.path.join(sync, "second_done"), "w").close()
print(json.dumps({"run_id": run_id, "status": status}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("second", ["second", "takeover"])
def test_two_processes_never_interleave_steps_in_one_directory(tmp_path, second):
  """Two real processes, the second started after the first claimed the directory and before
  its first save (the window where a check-only guard let both write): the second is refused;
  with overwrite=True it takes over and the first stops at its next save, keeping its state.
  Every step in the directory belongs to one run."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  d, sync = str(tmp_path / "ck"), tmp_path / "sync"
  sync.mkdir()
  env = dict(os.environ, PYTHONPATH=root)
  procs = [subprocess.Popen([sys.executable, "-c", RACE_CHILD, d, str(seed), role, str(sync)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for seed, role in ((0, "first"), (1, second))]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  first, other = out
  steps = sorted(int(n) for n in os.listdir(d) if n.isdigit())
  owners = {json.load(open(os.path.join(d, str(s), "meta", "metadata")))["run_id"]
            for s in steps}
  if second == "second":
    assert first["status"] == "ok", first
    assert other["status"].startswith("ValueError") and "claimed by another run" in other["status"]
    assert steps == [1, 2, 3] and owners == {first["run_id"]}
  else:
    assert other["status"] == "ok", other
    assert first["status"].startswith("DirectoryTakenError"), first
    assert steps == [1, 2, 3] and owners == {other["run_id"]}


def test_a_claim_is_atomic_per_run_and_checked(tmp_path):
  from fedjax_sim.runs import ownership

  d = str(tmp_path)
  other = {**FP, "run_id": "r2", "algorithm_digest": "c" * 16}
  ownership.claim(d, FP, what="checkpoint_dir")
  ownership.claim(d, FP, what="checkpoint_dir")  # this run again (a resume): still its own
  assert ownership.claimed_by_other(d, FP) is None
  with pytest.raises(ValueError, match="claimed by another run \\(run r1.*this run is r2"):
    ownership.claim(d, other, what="checkpoint_dir")
  assert ownership.claimed_by_other(d, other) == "r1"
  with pytest.warns(UserWarning, match="took checkpoint_dir=.* over from run r1"):
    ownership.claim(d, other, what="checkpoint_dir", overwrite=True)
  assert ownership.claimed_by_other(d, FP) == "r2"
  assert [n for n in os.listdir(d)] == [ownership.OWNER_FILE]  # no temporary file left


def test_a_step_that_cannot_be_proven_ours_is_never_deleted(sims, tmp_path):
  sim, d = sims[0], str(tmp_path / "ck")
  sim.run(sim.init(PARAMS, jax.random.key(0)), 2, block_size=1, checkpoint_dir=d)
  os.remove(os.path.join(d, "2", "meta", "metadata"))  # step 2: whose is it?
  with pytest.raises(ValueError, match=r"steps \[2\] .*cannot be proven to be this run's"):
    sim.run(sim.init(PARAMS, jax.random.key(0)), 1, block_size=1, checkpoint_dir=d)
  assert sorted(n for n in os.listdir(d) if n.isdigit()) == ["1", "2"]
  with pytest.warns(UserWarning, match=r"deleted its later checkpoint steps \[1, 2\]"):
    sim.run(sim.init(PARAMS, jax.random.key(0)), 1, block_size=1, checkpoint_dir=d,
            overwrite=True)


def test_a_state_of_another_model_is_refused_by_the_round(sims):
  sim = sims[0]
  sim.init(PARAMS, jax.random.key(0))
  wide = fs.core.initial_state(fs.core.plan_for(sim.algorithm, sim.sampler, sim.population,
                                                {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}),
                               {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}, jax.random.key(0))
  with pytest.raises(ValueError, match="state.params do not have the structure and shapes"):
    jax.eval_shape(lambda s, p: fs.core.round_step(sim.plan, s, p), wide, sim.population)
