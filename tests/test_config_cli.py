"""fedjax-sim run / plot / data describe, configs and their error messages."""

import json
import os
import textwrap

import pytest

from fedjax_sim import cli
from fedjax_sim import config as cfglib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "examples", "configs", "digits_dp.yaml")


def run_cli(*args):
  return cli.main(list(args))


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_run_resume_and_plot(tmp_path, capsys):
  out = str(tmp_path / "run")
  sets = ["--set", f"run.out_dir={out}", "--set", "run.eval_every=2", "--set",
          "data.num_clients=30", "--set", "sampler.cohort_size=10", "--set",
          "run.checkpoint_every=2"]
  assert run_cli("run", DIGITS, *sets, "--set", "run.rounds=4", "--quiet") == 0
  assert run_cli("run", DIGITS, *sets, "--set", "run.rounds=6", "--resume", "--quiet") == 0
  text = capsys.readouterr().out
  assert "resumed from round 4" in text
  rounds = [json.loads(line)["round"] for line in open(os.path.join(out, "metrics.jsonl"))]
  assert rounds == [1, 2, 3, 4, 5, 6]
  straight = str(tmp_path / "straight")
  assert run_cli("run", DIGITS, *sets, "--set", f"run.out_dir={straight}", "--set",
                 "run.rounds=6", "--quiet") == 0
  a = json.load(open(os.path.join(out, "summary.json")))
  b = json.load(open(os.path.join(straight, "summary.json")))
  assert a == b  # resumed run == uninterrupted run, to the last digit
  assert os.path.exists(os.path.join(out, "learning_curves.png"))
  assert run_cli("plot", out) == 0


def test_data_describe(tmp_path, capsys):
  assert run_cli("data", "describe", "--dataset", "iris", "--num-clients", "5",
                 "--plot", str(tmp_path / "p.png")) == 0
  assert "label_tv_distance_mean" in capsys.readouterr().out
  assert (tmp_path / "p.png").exists()


def write(tmp_path, text):
  path = tmp_path / "c.yaml"
  path.write_text(textwrap.dedent(text))
  return str(path)


BAD_CONFIGS = [
    ("modle: {name: mlp}", "unknown key 'modle'. Did you mean 'model'"),
    ("algorithm: {clinet_lr: 0.1}", "unknown key 'algorithm.clinet_lr'. Did you mean 'client_lr'"),
    ("model: {name: resnet}", "model.name='resnet' is not one of"),
    ("data: {name: digts}", "Did you mean 'digits'"),
    ("data: {partition: dirichlet, alpha: 0}", "data.alpha must be > 0"),
    ("data: {partition: dirichlet, alpha: .inf}", "data.alpha must be > 0"),
    ("algorithm: {client_lr: .inf}", "algorithm.client_lr must be > 0"),
    ("privacy: {clip: 1.0, noise_multiplier: .inf}", "privacy.noise_multiplier must be >= 0"),
    ("algorithm: {local_epochs: 1, local_steps: 5}", "exactly one of algorithm.local_epochs"),
    ("sampler: {cohort_size: 10, q: 0.1}", "exactly one of sampler.cohort_size"),
    ("privacy: {noise_multiplier: 1.0}", "needs privacy.clip"),
    ("privacy: {clip: 1.0, delta: 2.0}", "privacy.delta must lie in"),
    ("server: {optimizer: adamw}", "server.optimizer='adamw' is not one of"),
    ("data: {name: emnist_h5}", "set data.path"),
    ("data: {name: emnist_h5, path: /nonexistent.h5}", "does not exist"),
    ("run: {rounds: -3}", "run.rounds must be a positive"),
    ("model: [1, 2]", "model must be a mapping"),
    ("model: {name: char_lstm}", "needs text data"),
    ("algorithm: {batch_size: 0}", "algorithm.batch_size must be a positive"),
    ("privacy: {clip: 1.0, mechanism: bandmf}", "privacy.mechanism='bandmf' is not one of"),
    ("privacy: {clip: 1.0, mechanism: band_mf, bands: 0}", "privacy.bands must be a positive"),
    ("privacy: {clip: 1.0, bands: 4}", "needs privacy.mechanism: band_mf"),
    ("privacy: {mechanism: tree, adaptive: true, noise_multiplier: 1.0}", "set privacy.clip"),
    ("privacy: {clip: 1.0, noise_multiplier: 1.0, mechanism: band_mf, bands: 4, delta: 1.0e-5}",
     "set sampler.min_separation >= 4"),
    ("sampler: {cohort_size: 10, min_separation: 4}", "min_separation is cyclic Poisson"),
    ("sampler: {cohort_size: null, q: 0.1, min_separation: 0}",
     "sampler.min_separation must be a positive"),
]


@pytest.mark.parametrize("text,match", BAD_CONFIGS, ids=[b[1][:30] for b in BAD_CONFIGS])
def test_bad_config_messages(tmp_path, text, match):
  with pytest.raises(cfglib.ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
    cfglib.load(write(tmp_path, text))


def test_yaml_syntax_error_has_line(tmp_path):
  path = write(tmp_path, """\
      data: {name: digits}
      model: {name: mlp
      run: {rounds: 3}
      """)
  with pytest.raises(cfglib.ConfigError, match="line 3"):
    cfglib.load(path)


def test_missing_file_and_bad_set(tmp_path, capsys):
  with pytest.raises(cfglib.ConfigError, match="not found"):
    cfglib.load(str(tmp_path / "nope.yaml"))
  with pytest.raises(cfglib.ConfigError, match="Did you mean 'rounds'"):
    cfglib.load(DIGITS, ["run.roudns=3"])
  with pytest.raises(cfglib.ConfigError, match="unknown section"):
    cfglib.load(DIGITS, ["runn.rounds=3"])
  assert run_cli("run", DIGITS, "--set", "run.roudns=3") == 2
  assert "Did you mean 'rounds'" in capsys.readouterr().err


def test_dp_with_extras_algorithm_refused():
  cfg = cfglib.load(DIGITS, ["algorithm.name=scaffold"])
  with pytest.raises(cfglib.ConfigError, match="cannot run with privacy settings"):
    cfglib.build(cfg)


def test_dp_ftrl_keys_build_the_mechanism_and_the_schedule():
  """privacy.mechanism band_mf / tree and sampler.min_separation build the same aggregator and
  sampler as the Python API (fs.aggregators.band_mf_mean / dp_ftrl_mean, cyclic_poisson)."""
  import fedjax_sim as fs

  common = ["data.num_clients=40", "sampler.cohort_size=null", "sampler.q=0.2",
            "sampler.max_cohort_size=16", "privacy.noise_multiplier=1.0", "run.rounds=8"]
  cfg = cfglib.load(DIGITS, common + ["privacy.mechanism=band_mf", "privacy.bands=4",
                                      "sampler.min_separation=4"])
  sim = cfglib.build(cfg)[0]
  want = fs.aggregators.band_mf_mean(cfg.privacy.clip, 1.0, bands=4)
  assert sim.algorithm.aggregator.num_bands == want.num_bands == 4
  assert sim.sampler == fs.sampling.cyclic_poisson(0.2, 4, 16)
  tree = cfglib.build(cfglib.load(DIGITS, common + ["privacy.mechanism=tree"]))[0]
  assert tree.algorithm.aggregator.horizon == 8 == fs.aggregators.dp_ftrl_mean(
      1.0, 1.0, num_rounds=8).horizon
  assert isinstance(tree.sampler, fs.sampling.PoissonSampler)


BANDMF = os.path.join(ROOT, "examples", "configs", "digits_bandmf.yaml")
_SMALL = ["data.num_clients=30", "data.partition=iid", "run.rounds=4", "privacy.bands=2",
          "sampler.max_participations=1", "model.hidden=[8]"]


def test_bandmf_config_with_a_participation_cap_builds_the_api_objects():
  """examples/configs/digits_bandmf.yaml (BandMF, cyclic Poisson, at most k participations)
  builds the Python API's sampler (the cap over run.rounds) and aggregator; bad keys named."""
  import fedjax_sim as fs

  with pytest.raises(cfglib.ConfigError, match="bands=2 .*set sampler.min_separation >= 2"):
    cfglib.load(BANDMF, _SMALL + ["sampler.min_separation=1"])  # 2 bands need min-sep 2
  sim = cfglib.build(cfglib.load(BANDMF, _SMALL + ["sampler.min_separation=2"]))[0]
  assert sim.sampler == fs.sampling.cyclic_poisson(0.8, 2, 50, max_participations=1,
                                                   num_rounds=4)
  assert sim.algorithm.aggregator.num_bands == 2
  balls = cfglib.build(cfglib.load(BANDMF, _SMALL + ["sampler.min_separation=2",
                                                     "sampler.q=1.0"]))[0]
  assert balls.sampler == fs.sampling.balls_in_bins(2, 50, max_participations=1, num_rounds=4)
  with pytest.raises(cfglib.ConfigError, match="max_participations caps a cyclic Poisson"):
    cfglib.load(BANDMF, ["sampler.cohort_size=10", "sampler.q=null", "sampler.min_separation=null",
                         "privacy.bands=1"])
  with pytest.raises(cfglib.ConfigError, match="sampler.max_participations must be a positive"):
    cfglib.load(BANDMF, ["sampler.max_participations=0"])
  with pytest.raises(cfglib.ConfigError, match="Did you mean 'max_participations'"):
    cfglib.load(BANDMF, ["sampler.max_participation=3"])


@pytest.mark.slow  # a digits MLP compiled and run (about 5 s on 2 cores)
def test_bandmf_config_with_a_participation_cap_runs(tmp_path):
  """The example config, shrunk to 30 devices and 4 rounds (2 cycles of 2, each device in at
  most one): the run reports the library's ε (jax_privacy's amplified BandMF event over the
  capped participations)."""
  import dp_accounting as dpa
  import jax
  from jax_privacy.experimental import accounting as jpa

  cfg = cfglib.load(BANDMF, _SMALL + ["sampler.min_separation=2", f"run.out_dir={tmp_path}"])
  sim, params, _, _ = cfglib.build(cfg)
  _, m = sim.run(sim.init(params, jax.random.key(0)), 4, delta=1e-3, progress=False)
  acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
  acc.compose(jpa.amplified_bandmf_event(1.0, 2, num_bands=2, sampling_prob=0.8))  # k b = 2
  assert m["epsilon"][-1] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9)
  assert m["clients"].sum() > 0 and not m["schedule_violations"].any()
