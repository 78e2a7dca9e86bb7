"""Every CLI error is one line naming the flag or config key and the fix, exit code 2, no
traceback; a run directory is never silently restarted, mixed or overwritten (issue 15, items 3,
5, 6, 14)."""

import json
import os
import textwrap

import pytest

import fedjax_sim
from fedjax_sim import cli

CONFIG = """\
data: {name: digits, num_clients: 30}
model: {name: mlp, hidden: [16]}
algorithm: {name: fedavg, client_lr: 0.1, local_epochs: 1, batch_size: 8}
privacy: {clip: 1.0, noise_multiplier: 0.3, delta: 1.0e-5}
sampler: {cohort_size: 5}
run: {rounds: 4, eval_every: 2, seed: 3, checkpoint_every: 2, progress: false, out_dir: OUT}
"""


def config(tmp_path, out="run"):
  path = tmp_path / "c.yaml"
  path.write_text(CONFIG.replace("OUT", str(tmp_path / out)))
  return str(path)


def one_line_error(capsys, argv, *needles):
  """Runs the CLI; asserts exit 2 and one stderr line holding every needle; returns it."""
  rc = cli.main(argv)
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "Traceback" not in err and err.count("\n") == 1, err
  for needle in needles:
    assert needle in err, err
  return err


RUN_ERRORS = [
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier must be >= 0"),
    ("privacy.clip=-1", "privacy.clip must be > 0 (a finite number); got -1"),
    ("model.name=emnist_cnn", "model.name='emnist_cnn' is a convolutional model"),
    ("sampler.cohort_size=50", "sampler.cohort_size=50 exceeds the 30 clients"),
    ("algorithm.batch_size=2.5", "algorithm.batch_size must be a positive int; got 2.5"),
    ("run.seed=-1", "run.seed must be an int in [0, 2**32); got -1"),
    ("run.checkpoint_every=0", "run.checkpoint_every must be a positive int"),
    ("privacy.delta=1e-5", "privacy.delta must lie in (0, 1); got the string '1e-5'"),
    ("algorithm.client_lr='0.1'", "write 1.0e-5"),
    ("privacy.target_quantile=1.5", "privacy.target_quantile must lie in (0, 1)"),
    ("server.momentum=1.5", "server.momentum must lie in [0, 1)"),
    ("run.rounds=true", "run.rounds must be a positive int; got True"),
]


@pytest.mark.parametrize("assignment,needle", RUN_ERRORS, ids=[a for a, _ in RUN_ERRORS])
def test_run_config_errors(tmp_path, capsys, assignment, needle):
  one_line_error(capsys, ["run", config(tmp_path), "--set", assignment], "fedjax-sim run: ",
                 needle)
  assert not (tmp_path / "run").exists()  # refused before anything was written


def test_poisson_q_out_of_range(tmp_path, capsys):
  one_line_error(capsys, ["run", config(tmp_path), "--set", "sampler.cohort_size=null", "--set",
                          "sampler.q=1.5"], "sampler.q must lie in (0, 1]; got 1.5")


PRIVACY = ["privacy", "--num-clients", "100", "--rounds", "10"]
PRIVACY_ERRORS = [
    (["--q", "1.5", "--noise-multiplier", "1"], "--q must be in (0, 1]; got 1.5"),
    (["--q", "0.1", "--noise-multiplier", "-1"], "--noise-multiplier must be >= 0; got -1.0"),
    (["--q", "0.1", "--noise-multiplier", "1", "--delta", "0"], "--delta must be in (0, 1)"),
    (["--cohort-size", "500", "--noise-multiplier", "1"], "--cohort-size 500 exceeds"),
    (["--noise-multiplier", "1"], "exactly one of --cohort-size K"),
    (["--q", "0.1", "--noise-multiplier", "1", "--target-epsilon", "2"],
     "exactly one of --noise-multiplier Z or --target-epsilon"),
    (["--q", "0.1", "--target-epsilon", "0"], "--target-epsilon must be > 0; got 0.0"),
    (["--q", "0.1", "--noise-multiplier", "1", "--max-cohort-size", "0"],
     "--max-cohort-size must be > 0"),
]


@pytest.mark.parametrize("flags,needle", PRIVACY_ERRORS, ids=[n[:24] for _, n in PRIVACY_ERRORS])
def test_privacy_flag_errors(capsys, flags, needle):
  one_line_error(capsys, PRIVACY + flags, "fedjax-sim privacy: ", needle)


@pytest.mark.parametrize("flags,needle", [
    (["--cohort-size", "500"], "--cohort-size 500 exceeds --num-clients 100"),
    (["--noise-multiplier", "-1"], "--noise-multiplier must be >= 0"),
    (["--rounds", "0"], "--rounds must be > 0"),
])
def test_demo_flag_errors(capsys, flags, needle):
  one_line_error(capsys, ["demo", *flags], "fedjax-sim demo: ", needle)


def test_describe_suggests_only_flags_that_exist(capsys):
  err = one_line_error(capsys, ["data", "describe", "--num-clients", "1500"],
                       "fedjax-sim data describe: ", "lower --num-clients or --min-examples")
  flags = [w.strip(".,;()") for w in err.split() if w.startswith("--")]
  parser_flags = {"--num-clients", "--min-examples", "--alpha", "--shards-per-client"}
  assert flags and set(flags) <= parser_flags
  # The suggested flag exists and works: empty clients allowed.
  assert cli.main(["data", "describe", "--num-clients", "1500", "--min-examples", "0",
                   "--partition", "iid"]) == 0


def test_describe_bad_count(capsys):
  one_line_error(capsys, ["data", "describe", "--num-clients", "0"], "--num-clients must be > 0")


def test_plot_of_a_missing_directory(tmp_path, capsys):
  one_line_error(capsys, ["plot", str(tmp_path / "nope")], "fedjax-sim plot: ",
                 "has no metrics.jsonl")


def test_argparse_errors_are_one_line(tmp_path, capsys):
  one_line_error(capsys, ["run", config(tmp_path), "--bogus"], "unrecognized arguments: --bogus",
                 "--help")
  one_line_error(capsys, ["privacy", "--num-clients", "ten", "--rounds", "1"],
                 "--num-clients: invalid int value: 'ten'")


def test_version(capsys):
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out.strip() == f"fedjax-sim {fedjax_sim.__version__}"


def test_out_dir_that_is_a_file(tmp_path, capsys):
  (tmp_path / "run").write_text("x")
  one_line_error(capsys, ["run", config(tmp_path)], "run.out_dir=", "is a file")


# -- one real run directory, then everything that must not damage it -------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("cli_run")
  path = config(tmp_path)
  assert cli.main(["run", path, "--quiet"]) == 0
  return tmp_path, path


def test_run_dir_records_settings_and_eval_metrics(finished):
  tmp_path, _ = finished
  out = tmp_path / "run"
  settings = json.load(open(out / "config.json"))["settings"]
  assert settings["algorithm"]["client_lr"] == 0.1 and settings["algorithm"]["batch_size"] == 8
  assert settings["privacy"]["clip"] == 1.0 and settings["run"]["seed"] == 3
  assert settings["run"]["rounds"] == 4
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert [r.get("eval_accuracy") is not None for r in rows] == [False, True, False, True]
  summary = json.load(open(out / "summary.json"))
  assert summary["eval_accuracy"] == rows[-1]["eval_accuracy"]


def test_rerun_into_a_used_out_dir_is_refused(finished, capsys):
  tmp_path, path = finished
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  one_line_error(capsys, ["run", path], "already holds a run", "--resume", "--overwrite")
  one_line_error(capsys, ["run", path, "--resume", "--overwrite"], "not both")
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_resume_with_other_hyper_parameters_is_refused(finished, capsys):
  tmp_path, path = finished
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  one_line_error(capsys, ["run", path, "--resume", "--set", "algorithm.client_lr=0.05"],
                 "was started with other settings (algorithm.client_lr: 0.1 -> 0.05)")
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.slow  # two CLI runs (~40 s on 2 loaded cores)
def test_overwrite_starts_over_cleanly(tmp_path, capsys):
  path = config(tmp_path)
  out = tmp_path / "run"
  out.mkdir()
  (out / "metrics.jsonl").write_text('{"round": 1, "loss": 9.0}\n' * 300)
  (out / "checkpoints").mkdir()
  assert cli.main(["run", path, "--overwrite", "--quiet", "--set", "run.rounds=2"]) == 0
  assert "--overwrite: deleted checkpoints, metrics.jsonl" in capsys.readouterr().out
  rows = [json.loads(line)["round"] for line in open(out / "metrics.jsonl")]
  assert rows == [1, 2]
  assert sorted(n for n in os.listdir(out / "checkpoints") if n.isdigit()) == ["2"]
  # A crash after round 3 (logged, not checkpointed): --resume continues from the checkpoint,
  # drops the unsaved row with a one-line warning, and the log has every round once.
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"round": 3, "loss": 9.0}\n')
  assert cli.main(["run", path, "--resume", "--quiet"]) == 0
  err = capsys.readouterr().err
  assert "fedjax-sim run: warning: this run starts at round 2: dropped 1 later rows" in err
  assert "Traceback" not in err and err.count("\n") == 1
  assert [json.loads(line)["round"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_config_with_a_string_number_names_the_fix(tmp_path, capsys):
  path = tmp_path / "c.yaml"
  path.write_text(textwrap.dedent(CONFIG.replace("OUT", str(tmp_path / "r")).replace(
      "delta: 1.0e-5", "delta: 1e-5")))
  one_line_error(capsys, ["run", str(path)],
                 "privacy.delta must lie in (0, 1); got the string '1e-5'", "write 1.0e-5")


@pytest.mark.slow  # (~2 s) the nonfinite tests of test_round stay
def test_diverged_training_is_one_line_and_exit_1(tmp_path, capsys):
  # A client learning rate that makes every update NaN: the run stops at round 1 (on_nonfinite
  # "raise"), says so on one line naming the round and the fix, and leaves no traceback.
  rc = cli.main(["run", config(tmp_path), "--quiet", "--set", "algorithm.client_lr=1.0e+30",
                 "--set", "run.rounds=2"])
  err = capsys.readouterr().err
  assert rc == 1, err
  assert "Traceback" not in err and err.count("\n") == 1, err
  assert "round 1 is non-finite" in err and "learning rate" in err, err


@pytest.mark.slow  # (~2 s) the run-dir ownership tests of test_run_integrity stay
def test_demo_refuses_another_runs_directory_and_keeps_its_log(capsys, tmp_path, pop, loss_fn):
  """The demo used to delete metrics.jsonl in --out before anything was checked."""
  import jax
  import jax.numpy as jnp
  import optax

  import fedjax_sim as fs

  out = tmp_path / "theirs"
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=3)
  sim.run(sim.init({"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}, jax.random.key(0)), 2,
          log_dir=str(out))
  before = (out / "metrics.jsonl").read_text()
  one_line_error(capsys, ["demo", "--rounds", "2", "--eval-every", "2", "--out", str(out)],
                 "fedjax-sim demo: ", "holds the log of another run")
  assert (out / "metrics.jsonl").read_text() == before


def test_resume_accepts_a_run_recorded_before_newer_config_keys(tmp_path):
  """A run whose config.json predates a key (privacy.mechanism, privacy.bands,
  sampler.min_separation) ran with that key's default: --resume with the default is accepted,
  with another value it is refused, naming the key."""
  import dataclasses

  from fedjax_sim import config as cfglib

  settings = dataclasses.asdict(cfglib.Config())
  old = json.loads(json.dumps(settings))
  for section, key in (("privacy", "mechanism"), ("privacy", "bands"),
                       ("sampler", "min_separation")):
    del old[section][key]
  (tmp_path / "config.json").write_text(json.dumps({"settings": old}))
  cli._check_resume(str(tmp_path), settings)  # the defaults: accepted
  settings["privacy"]["mechanism"] = "band_mf"
  with pytest.raises(cfglib.ConfigError, match="privacy.mechanism: .gaussian."):
    cli._check_resume(str(tmp_path), settings)
