"""Run configurations for ``fedjax-sim run CONFIG.yaml``: typed dataclasses at the edge.

A YAML file maps one-to-one onto these dataclasses, which build the Python API objects (the
library itself has no string registries). Unknown keys are errors that suggest the nearest valid
key; YAML syntax errors report their line; ``--set section.key=value`` overrides a value.

Example (``examples/configs/digits_dp.yaml``)::

  data: {name: digits, num_clients: 100, partition: dirichlet, alpha: 0.5}
  model: {name: mlp, hidden: [64]}
  algorithm: {name: fedavg, client_lr: 0.1, local_epochs: 2, batch_size: 8}
  server: {optimizer: momentum, lr: 1.0}
  privacy: {clip: 1.0, noise_multiplier: 0.3, delta: 1.0e-5}
  sampler: {cohort_size: 50}
  run: {rounds: 200, eval_every: 25, seed: 0, out_dir: runs/digits_dp}

Federated files: ``data.name: emnist_h5`` / ``shakespeare_h5`` read ``data.path`` with
:func:`fedjax_sim.datasets.emnist` / :func:`~fedjax_sim.datasets.shakespeare`, which take a TFF
h5, a FedJAX SQLite (``~/.cache/fedjax/federated_emnist_train.sqlite``, ...) or a TFF SQLite file
alike: the format is detected from the file's first bytes (:mod:`fedjax_sim.data.sqlite`), so
the ``_h5`` in the name names the dataset family, not the only format. Of a TFF SQLite file,
which holds both splits, the ``train`` split is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any

import numpy as np

DATASETS = ("digits", "iris", "wine", "breast_cancer", "leaf_synthetic", "emnist_h5",
            "shakespeare_h5")
PARTITIONS = ("dirichlet", "iid", "shards")
MODELS = ("logistic", "mlp", "emnist_cnn", "cifar_cnn", "char_lstm")
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova", "feddyn", "qffl", "ditto")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")
#: Datasets read from ``data.path``, and the features each needs in the file.
FILE_DATASETS = {"emnist_h5": ("EMNIST-62", ["pixels", "label"]),
                 "shakespeare_h5": ("Shakespeare", ["snippets"])}
#: Notes on keys for the generated config reference (docs/cli.md).
KEY_NOTES = {
    "data.path": "for `emnist_h5` / `shakespeare_h5`: a TFF h5, FedJAX SQLite or TFF SQLite "
                 "file (detected from the file; of TFF SQLite the `train` split)",
}


@dataclasses.dataclass
class DataConfig:
  name: str = "digits"
  path: str | None = None
  num_clients: int = 100
  partition: str = "dirichlet"
  alpha: float = 0.5
  shards_per_client: int = 2
  max_clients: int | None = None
  seq_len: int = 80


@dataclasses.dataclass
class ModelConfig:
  name: str = "mlp"
  hidden: list[int] = dataclasses.field(default_factory=lambda: [64])


@dataclasses.dataclass
class AlgorithmConfig:
  name: str = "fedavg"
  client_lr: float = 0.1
  local_epochs: int | None = 1
  local_steps: int | None = None
  batch_size: int = 10
  mu: float = 0.01
  q: float = 1.0
  lam: float = 0.1
  alpha: float = 0.01


@dataclasses.dataclass
class ServerConfig:
  optimizer: str = "sgd"
  lr: float = 1.0
  momentum: float = 0.9


@dataclasses.dataclass
class PrivacyConfig:
  clip: float | None = None
  noise_multiplier: float = 0.0
  adaptive: bool = False
  target_quantile: float = 0.5
  delta: float | None = None


@dataclasses.dataclass
class SamplerConfig:
  cohort_size: int | None = 10
  q: float | None = None
  max_cohort_size: int | None = None


@dataclasses.dataclass
class RunSettings:
  rounds: int = 100
  eval_every: int = 10
  seed: int = 0
  out_dir: str = "runs/run"
  checkpoint_every: int | None = None
  progress: bool = True


@dataclasses.dataclass
class Config:
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
  server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
  run: RunSettings = dataclasses.field(default_factory=RunSettings)


class ConfigError(ValueError):
  """A configuration problem, with the key and the fix in the message."""


def _suggest(key: str, valid) -> str:
  close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
  return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {sorted(valid)}."


def _build(cls, values: Any, where: str):
  if values is None:
    values = {}
  if not isinstance(values, dict):
    raise ConfigError(f"{where or 'the config'} must be a mapping; got {values!r}.")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    path = f"{where}.{key}" if where else str(key)
    if key not in fields:
      raise ConfigError(f"unknown key {path!r}.{_suggest(str(key), fields)}")
    target = _NESTED.get((cls, key))
    kwargs[key] = _build(target, value, path) if target is not None else value
  return cls(**kwargs)


_NESTED = {(Config, "data"): DataConfig, (Config, "model"): ModelConfig,
           (Config, "algorithm"): AlgorithmConfig, (Config, "server"): ServerConfig,
           (Config, "privacy"): PrivacyConfig, (Config, "sampler"): SamplerConfig,
           (Config, "run"): RunSettings}


def _choice(path: str, value, options) -> None:
  if value not in options:
    hint = _suggest(str(value), options)
    raise ConfigError(f"{path}={value!r} is not one of {list(options)}.{hint}")


def _text_hint(value) -> str:
  if isinstance(value, str):
    return (" (YAML reads a number without a dot, like 1e-5, as text: write 1.0e-5; "
            "a number in quotes is text too)")
  return ""


def _positive(path: str, value, allow_none=False) -> None:
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
      or not math.isfinite(value)):  # .inf would train to NaN (a learning rate) or never split
    raise ConfigError(f"{path} must be a positive number; got {value!r}.{_text_hint(value)}")


def _positive_int(path: str, value, allow_none=False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{path} must be a positive integer; got {value!r}.")


def _in_range(path: str, value, lo, hi, *, lo_open=True, hi_open=False, allow_none=False):
  if value is None and allow_none:
    return
  ok = (not isinstance(value, bool) and isinstance(value, (int, float))
        and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi))
  if not ok:
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    raise ConfigError(f"{path} must lie in {lb}{lo}, {hi}{rb}; got {value!r}.{_text_hint(value)}")


def _check_data_file(name: str, path: str) -> None:
  """The format of ``data.path`` (its header only; the features are checked when read)."""
  from fedjax_sim.data import sqlite as _sqlite

  try:
    _sqlite.detect_format(path)
  except (ValueError, OSError) as e:
    raise ConfigError(f"data.path={path!r} cannot be read for data.name={name!r}: {e}") from None


def _read_data_file(name: str, path: str, read):
  """``read()`` with a file whose contents do not fit ``data.name`` reported as a ConfigError."""
  try:
    return read()
  except ValueError as e:
    family, features = FILE_DATASETS[name]
    others = [f"{k!r} ({v[0]}: {', '.join(v[1])})" for k, v in FILE_DATASETS.items() if k != name]
    raise ConfigError(
        f"data.path={path!r} does not hold the {family} features {features} that "
        f"data.name={name!r} reads: {e} Other file datasets: {'; '.join(others)}."
    ) from None


def validate(cfg: Config) -> Config:
  """Checks names, ranges and combinations; raises :class:`ConfigError` naming the key."""
  _choice("data.name", cfg.data.name, DATASETS)
  _choice("data.partition", cfg.data.partition, PARTITIONS)
  _choice("model.name", cfg.model.name, MODELS)
  _choice("algorithm.name", cfg.algorithm.name, ALGORITHMS)
  _choice("server.optimizer", cfg.server.optimizer, SERVER_OPTIMIZERS)
  if cfg.data.name in FILE_DATASETS and not cfg.data.path:
    raise ConfigError(f"data.name={cfg.data.name!r} reads a file: set data.path (a TFF h5, "
                      "FedJAX SQLite or TFF SQLite file).")
  if cfg.data.path and not os.path.exists(cfg.data.path):
    raise ConfigError(f"data.path={cfg.data.path!r} does not exist.")
  if cfg.data.name in FILE_DATASETS:
    _check_data_file(cfg.data.name, cfg.data.path)
  for path, value, none_ok in [
      ("data.num_clients", cfg.data.num_clients, False),
      ("data.shards_per_client", cfg.data.shards_per_client, False),
      ("data.max_clients", cfg.data.max_clients, True),
      ("data.seq_len", cfg.data.seq_len, False),
      ("algorithm.batch_size", cfg.algorithm.batch_size, False),
      ("algorithm.local_epochs", cfg.algorithm.local_epochs, True),
      ("algorithm.local_steps", cfg.algorithm.local_steps, True),
      ("sampler.cohort_size", cfg.sampler.cohort_size, True),
      ("sampler.max_cohort_size", cfg.sampler.max_cohort_size, True),
      ("run.rounds", cfg.run.rounds, False),
      ("run.eval_every", cfg.run.eval_every, False),
      ("run.checkpoint_every", cfg.run.checkpoint_every, True)]:
    _positive_int(path, value, none_ok)
  if isinstance(cfg.run.seed, bool) or not isinstance(cfg.run.seed, int) or cfg.run.seed < 0:
    raise ConfigError(f"run.seed must be an integer >= 0; got {cfg.run.seed!r}.")
  _positive("data.alpha", cfg.data.alpha)
  _positive("algorithm.client_lr", cfg.algorithm.client_lr)
  _positive("server.lr", cfg.server.lr)
  _in_range("server.momentum", cfg.server.momentum, 0, 1, lo_open=False, hi_open=True)
  _positive("privacy.clip", cfg.privacy.clip, allow_none=True)
  if (isinstance(cfg.privacy.noise_multiplier, bool)
      or not isinstance(cfg.privacy.noise_multiplier, (int, float))
      or not cfg.privacy.noise_multiplier >= 0 or not math.isfinite(cfg.privacy.noise_multiplier)):
    raise ConfigError(f"privacy.noise_multiplier must be a number >= 0 (0: no noise); got "
                      f"{cfg.privacy.noise_multiplier!r}.{_text_hint(cfg.privacy.noise_multiplier)}")
  _in_range("privacy.target_quantile", cfg.privacy.target_quantile, 0, 1, hi_open=True)
  _in_range("sampler.q", cfg.sampler.q, 0, 1, allow_none=True)
  if not isinstance(cfg.run.out_dir, str) or not cfg.run.out_dir:
    raise ConfigError(f"run.out_dir must be a directory path; got {cfg.run.out_dir!r}.")
  if (cfg.algorithm.local_epochs is None) == (cfg.algorithm.local_steps is None):
    raise ConfigError("set exactly one of algorithm.local_epochs and algorithm.local_steps "
                      "(set the other to null).")
  if (cfg.sampler.cohort_size is None) == (cfg.sampler.q is None):
    raise ConfigError("set exactly one of sampler.cohort_size (fixed-size) and sampler.q "
                      "(Poisson; set cohort_size: null).")
  if cfg.privacy.noise_multiplier and cfg.privacy.clip is None and not cfg.privacy.adaptive:
    raise ConfigError("privacy.noise_multiplier > 0 needs privacy.clip (or adaptive: true).")
  _in_range("privacy.delta", cfg.privacy.delta, 0, 1, hi_open=True, allow_none=True)
  if cfg.model.name == "char_lstm" and cfg.data.name != "shakespeare_h5":
    raise ConfigError("model.name='char_lstm' needs text data (data.name='shakespeare_h5').")
  return cfg


def _set(raw: dict, assignment: str) -> None:
  import yaml

  if "=" not in assignment:
    raise ConfigError(f"--set expects section.key=value; got {assignment!r}.")
  path, value = assignment.split("=", 1)
  keys = path.strip().split(".")
  node = raw
  fields = {f.name: _NESTED.get((Config, f.name)) for f in dataclasses.fields(Config)}
  if keys[0] not in fields:
    raise ConfigError(f"--set {path}: unknown section {keys[0]!r}.{_suggest(keys[0], fields)}")
  if len(keys) != 2:
    raise ConfigError(f"--set {path}: expected section.key (e.g. run.rounds=10).")
  section_fields = {f.name for f in dataclasses.fields(fields[keys[0]])}
  if keys[1] not in section_fields:
    raise ConfigError(f"--set {path}: unknown key {keys[1]!r} in {keys[0]!r}."
                      f"{_suggest(keys[1], section_fields)}")
  node = raw.setdefault(keys[0], {}) or {}
  raw[keys[0]] = node
  node[keys[1]] = yaml.safe_load(value)


def load(path: str, overrides: list[str] = ()) -> Config:
  """Reads a YAML config (plus ``section.key=value`` overrides) into a validated Config."""
  import yaml

  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} not found.")
  try:
    with open(path) as f:
      raw = yaml.safe_load(f) or {}
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
    raise ConfigError(f"{path}: YAML syntax error at {where}: {e.problem}.") from None
  for assignment in overrides:
    _set(raw, assignment)
  return validate(_build(Config, raw, ""))


# -- building the run ----------------------------------------------------------------------------


def build(cfg: Config):
  """Turns a config into ``(simulation, params, eval_fn, loss_fn)`` with the Python API."""
  import flax.linen as nn
  import jax
  import optax

  import fedjax_sim as fs

  d = cfg.data
  test = None
  if d.name in ("digits", "iris", "wine", "breast_cancer"):
    alpha = None if d.partition == "iid" else d.alpha
    pop, test = fs.datasets.sklearn_dataset(d.name, d.num_clients, alpha=alpha, seed=cfg.run.seed)
  elif d.name == "leaf_synthetic":
    pop = fs.datasets.leaf_synthetic(d.alpha, d.alpha, num_clients=d.num_clients,
                                     seed=cfg.run.seed)
  elif d.name == "emnist_h5":
    pop = _read_data_file(d.name, d.path,
                          lambda: fs.datasets.emnist(d.path, max_clients=d.max_clients))
  else:
    pop = _read_data_file(d.name, d.path, lambda: fs.datasets.shakespeare(
        d.path, seq_len=d.seq_len, max_clients=d.max_clients))
  if d.partition == "shards" and test is not None:
    x, y = np.asarray(pop.features["x"]), np.asarray(pop.features["y"])
    ids = fs.partition.shards(y, d.num_clients, d.shards_per_client, seed=cfg.run.seed)
    pop = fs.Population.from_arrays({"x": x, "y": y}, ids, num_clients=d.num_clients)
  labels = np.asarray(pop.features["y"])
  num_classes = int(labels.max()) + 1
  m = cfg.model
  module: nn.Module
  if m.name == "logistic":
    module = fs.zoo.LogisticRegression(num_classes)
  elif m.name == "mlp":
    module = fs.zoo.MLP(num_classes, tuple(m.hidden))
  elif m.name == "emnist_cnn":
    module = fs.zoo.EmnistCNN(num_classes)
  elif m.name == "cifar_cnn":
    module = fs.zoo.CifarCNN(num_classes)
  else:
    module = fs.zoo.CharLSTM(fs.datasets.SHAKESPEARE_VOCAB_SIZE, hidden=m.hidden[0])
  x0 = np.asarray(pop.features["x"][:1])
  if m.name in ("emnist_cnn", "cifar_cnn") and x0.ndim < 3:
    raise ConfigError(
        f"model.name={m.name!r} is a convolutional model for images; data.name={d.name!r} has "
        f"flat feature vectors (shape {x0.shape[1:]}). Use model.name='mlp' or 'logistic', or "
        "image data (data.name='emnist_h5' with model.name='emnist_cnn').")
  try:
    params = module.init(jax.random.key(cfg.run.seed), x0)["params"]
  except Exception as e:  # noqa: BLE001 - a shape mismatch deep in flax
    raise ConfigError(f"model.name={m.name!r} does not fit the features of data.name="
                      f"{d.name!r} (shape {x0.shape[1:]}): {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}") from None
  make_loss = fs.models.sequence_loss if m.name == "char_lstm" else fs.models.classifier_loss
  loss_fn = make_loss(fs.models.linen_apply(module, train=True))
  eval_loss = make_loss(fs.models.linen_apply(module))

  s = cfg.server
  server = {
      "sgd": lambda: optax.sgd(s.lr),
      "momentum": lambda: optax.sgd(s.lr, s.momentum),
      "adam": lambda: fs.algorithms.fedadam(s.lr),
      "yogi": lambda: fs.algorithms.fedyogi(s.lr),
      "adagrad": lambda: fs.algorithms.fedadagrad(s.lr),
  }[s.optimizer]()
  p = cfg.privacy
  if p.adaptive:
    aggregator = fs.aggregators.adaptive_dp_mean(p.noise_multiplier,
                                                 target_quantile=p.target_quantile)
  elif p.clip is not None:
    aggregator = fs.aggregators.dp_mean(p.clip, p.noise_multiplier)
  else:
    aggregator = None
  a = cfg.algorithm
  work = dict(batch_size=a.batch_size, local_epochs=a.local_epochs, local_steps=a.local_steps)
  opt = optax.sgd(a.client_lr)
  if a.name == "fedavg":
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=opt, server_optimizer=server,
                                aggregator=aggregator, **work)
  elif a.name == "fedprox":
    algo = fs.algorithms.fedprox(loss_fn, mu=a.mu, client_optimizer=opt,
                                 server_optimizer=server, aggregator=aggregator, **work)
  elif a.name == "ditto":
    algo = fs.algorithms.ditto(loss_fn, lam=a.lam, client_optimizer=opt,
                               server_optimizer=server, aggregator=aggregator, **work)
  else:
    if aggregator is not None:
      raise ConfigError(f"algorithm.name={a.name!r} cannot run with privacy settings: it sends "
                        "values that bypass the DP aggregator. Use fedavg, fedprox or ditto.")
    if a.name == "scaffold":
      algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=a.client_lr,
                                    server_optimizer=server, **work)
    elif a.name == "fednova":
      algo = fs.algorithms.fednova(loss_fn, client_learning_rate=a.client_lr,
                                   server_optimizer=server, **work)
    elif a.name == "feddyn":
      algo = fs.algorithms.feddyn(loss_fn, alpha=a.alpha, client_optimizer=opt, **work)
    else:
      algo = fs.algorithms.qffl(loss_fn, q=a.q, client_learning_rate=a.client_lr, **work)
  sm = cfg.sampler
  if sm.cohort_size is not None and sm.cohort_size > pop.num_clients:
    raise ConfigError(
        f"sampler.cohort_size={sm.cohort_size} exceeds the {pop.num_clients} clients of the "
        f"data; set sampler.cohort_size <= {pop.num_clients} (or raise data.num_clients).")
  if sm.cohort_size is not None:
    sim = fs.Simulation(algo, pop, cohort_size=sm.cohort_size)
  else:
    cap = sm.max_cohort_size or pop.num_clients
    sim = fs.Simulation(algo, pop, sampler=fs.sampling.poisson(sm.q, cap))
  eval_data = test if test is not None else {k: np.asarray(v) for k, v in pop.features.items()}
  eval_fn = fs.evaluation.make_eval_fn(eval_loss, eval_data)
  return sim, params, eval_fn, eval_loss
