"""Run configurations for ``fedjax-sim run CONFIG.yaml``: typed dataclasses at the edge.

A YAML file maps one-to-one onto these dataclasses. Every key has one rule (:data:`RULES`,
checked with :mod:`fedjax_sim._validation`, the library's own argument checks); names resolve
through registries (:data:`DATASETS`, :data:`PARTITIONS`, :data:`MODELS`, :data:`ALGORITHMS`,
:data:`SERVER_OPTIMIZERS`: name -> builder) into the Python API objects (the library itself
takes values, not names). Unknown keys are errors that suggest the nearest valid key; a key
given twice in one mapping (a duplicate section or key) is an error naming its line, as are YAML
syntax errors; a bool must be written unquoted (``"false"`` is text, and truthy);
``--set section.key=value`` overrides a value.

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
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from fedjax_sim import _validation as _v

#: Datasets read from ``data.path``, and the features each needs in the file.
FILE_DATASETS = {"emnist_h5": ("EMNIST-62", ["pixels", "label"]),
                 "shakespeare_h5": ("Shakespeare", ["snippets"]),
                 "stackoverflow_nwp": ("Stack Overflow", ["tokens"])}
#: Stack Overflow next-word prediction: FedJAX's vocabulary size and train sequence length.
SO_VOCAB_SIZE, SO_SEQ_LEN = 10_000, 20
#: Notes on keys for the generated config reference (docs/cli.md).
KEY_NOTES = {
    "data.path": "for `emnist_h5` / `shakespeare_h5` / `stackoverflow_nwp`: a TFF h5, FedJAX "
                 "SQLite or TFF SQLite file (detected from the file; of TFF SQLite the `train` "
                 "split); for `cifar10_pfl`: pfl-research's `cifar10_train.p` pickle",
    "sampler.min_separation": "b: cyclic Poisson (with `sampler.q`; `q: 1.0` is balls-in-bins), "
                              "each client at most once in any b rounds",
    "sampler.max_participations": "k: each client joins at most k of the `run.rounds` rounds "
                                  "(with `sampler.q`; docs/dp-ftrl.md)",
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
  mechanism: str = "gaussian"
  bands: int = 1


@dataclasses.dataclass
class SamplerConfig:
  cohort_size: int | None = 10
  q: float | None = None
  max_cohort_size: int | None = None
  min_separation: int | None = None
  max_participations: int | None = None


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


# -- the registries: name -> builder -------------------------------------------------------------


def _sklearn_data(cfg: Config):
  import fedjax_sim as fs

  d = cfg.data
  alpha = None if d.partition == "iid" else d.alpha
  return fs.datasets.sklearn_dataset(d.name, d.num_clients, alpha=alpha, seed=cfg.run.seed)


def _leaf_data(cfg: Config):
  import fedjax_sim as fs

  d = cfg.data
  return fs.datasets.leaf_synthetic(d.alpha, d.alpha, num_clients=d.num_clients,
                                    seed=cfg.run.seed), None


def _emnist_data(cfg: Config):
  import fedjax_sim as fs

  d = cfg.data
  return _read_data_file(d.name, d.path,
                         lambda: fs.datasets.emnist(d.path, max_clients=d.max_clients)), None


def _shakespeare_data(cfg: Config):
  import fedjax_sim as fs

  d = cfg.data
  return _read_data_file(d.name, d.path, lambda: fs.datasets.shakespeare(
      d.path, seq_len=d.seq_len, max_clients=d.max_clients)), None


def _stackoverflow_nwp_data(cfg: Config):
  import fedjax_sim as fs

  d = cfg.data
  return _read_data_file(d.name, d.path, lambda: fs.datasets.stackoverflow_nwp(
      d.path, vocab_size=SO_VOCAB_SIZE, seq_len=SO_SEQ_LEN, max_clients=d.max_clients)[0]), None


def _cifar10_pfl_data(cfg: Config):
  import fedjax_sim as fs

  d = cfg.data
  try:
    pop, stats = fs.datasets.cifar10_pfl(d.path, seed=cfg.run.seed)
    test_path = os.path.join(os.path.dirname(d.path), "cifar10_test.p")
    test = None
    if os.path.exists(test_path) and os.path.abspath(test_path) != os.path.abspath(d.path):
      t, _ = fs.datasets.cifar10_pfl(test_path, channel_stats=stats)
      test = {k: np.asarray(v) for k, v in t.features.items()}
  except ValueError as e:
    raise ConfigError(f"data.name='cifar10_pfl': {e}") from None
  return pop, test


#: ``data.name`` -> ``builder(cfg) -> (population, test_data or None)``.
DATASETS: dict[str, Callable] = {
    "digits": _sklearn_data, "iris": _sklearn_data, "wine": _sklearn_data,
    "breast_cancer": _sklearn_data, "leaf_synthetic": _leaf_data, "emnist_h5": _emnist_data,
    "shakespeare_h5": _shakespeare_data, "stackoverflow_nwp": _stackoverflow_nwp_data,
    "cifar10_pfl": _cifar10_pfl_data}


def _as_loaded(cfg: Config, pop, test):
  return pop  # the dataset builder split it (Dirichlet with data.alpha, or IID)


def _shards(cfg: Config, pop, test):
  import fedjax_sim as fs

  if test is None:  # a federated file keeps its natural clients
    return pop
  x, y = np.asarray(pop.features["x"]), np.asarray(pop.features["y"])
  ids = fs.partition.shards(y, cfg.data.num_clients, cfg.data.shards_per_client,
                            seed=cfg.run.seed)
  return fs.Population.from_arrays({"x": x, "y": y}, ids, num_clients=cfg.data.num_clients)


#: ``data.partition`` -> ``builder(cfg, population, test) -> population`` (how a bundled
#: dataset's examples are split over clients; federated files keep their natural clients).
PARTITIONS: dict[str, Callable] = {"dirichlet": _as_loaded, "iid": _as_loaded, "shards": _shards}

#: ``model.name`` -> ``builder(model_config, num_classes) -> flax module``.
MODELS: dict[str, Callable] = {
    "logistic": lambda m, n: _zoo().LogisticRegression(n),
    "mlp": lambda m, n: _zoo().MLP(n, tuple(m.hidden)),
    "emnist_cnn": lambda m, n: _zoo().EmnistCNN(n),
    "cifar_cnn": lambda m, n: _zoo().CifarCNN(n),
    "char_lstm": lambda m, n: _zoo().CharLSTM(_vocab(), hidden=m.hidden[0]),
    "stackoverflow_lstm": lambda m, n: _zoo().StackOverflowLSTM(SO_VOCAB_SIZE),
}
_IMAGE_MODELS = ("emnist_cnn", "cifar_cnn")
#: text model -> the data it reads.
_TEXT_DATA = {"char_lstm": "shakespeare_h5", "stackoverflow_lstm": "stackoverflow_nwp"}
_TEXT_MODELS = tuple(_TEXT_DATA)


def _zoo():
  from fedjax_sim import zoo

  return zoo


def _vocab() -> int:
  from fedjax_sim.data import datasets

  return datasets.SHAKESPEARE_VOCAB_SIZE


def _optax():
  import optax

  return optax


def _algorithms():
  from fedjax_sim import algorithms

  return algorithms


#: ``server.optimizer`` -> ``builder(server_config) -> optax transformation``.
SERVER_OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda s: _optax().sgd(s.lr),
    "momentum": lambda s: _optax().sgd(s.lr, s.momentum),
    "adam": lambda s: _algorithms().fedadam(s.lr),
    "yogi": lambda s: _algorithms().fedyogi(s.lr),
    "adagrad": lambda s: _algorithms().fedadagrad(s.lr),
}

#: ``algorithm.name`` -> ``builder(algorithm_config, loss, client_optimizer, server_optimizer,
#: aggregator, work) -> Algorithm`` (``work``: batch size and local epochs / steps).
ALGORITHMS: dict[str, Callable] = {
    "fedavg": lambda a, loss, opt, server, agg, work: _algorithms().fedavg(
        loss, client_optimizer=opt, server_optimizer=server, aggregator=agg, **work),
    "fedprox": lambda a, loss, opt, server, agg, work: _algorithms().fedprox(
        loss, mu=a.mu, client_optimizer=opt, server_optimizer=server, aggregator=agg, **work),
    "ditto": lambda a, loss, opt, server, agg, work: _algorithms().ditto(
        loss, lam=a.lam, client_optimizer=opt, server_optimizer=server, aggregator=agg, **work),
    "scaffold": lambda a, loss, opt, server, agg, work: _algorithms().scaffold(
        loss, client_learning_rate=a.client_lr, server_optimizer=server, **work),
    "fednova": lambda a, loss, opt, server, agg, work: _algorithms().fednova(
        loss, client_learning_rate=a.client_lr, server_optimizer=server, **work),
    "feddyn": lambda a, loss, opt, server, agg, work: _algorithms().feddyn(
        loss, alpha=a.alpha, client_optimizer=opt, **work),
    "qffl": lambda a, loss, opt, server, agg, work: _algorithms().qffl(
        loss, q=a.q, client_learning_rate=a.client_lr, **work),
}
#: ``privacy.mechanism`` -> what it is: the noise the DP aggregator adds each round.
MECHANISMS: dict[str, str] = {
    "gaussian": "independent Gaussian noise (DP-FedAvg: fs.aggregators.dp_mean)",
    "band_mf": "BandMF correlated noise with privacy.bands bands (fs.aggregators.band_mf_mean)",
    "tree": "DP-FTRL tree-aggregation noise over run.rounds (fs.aggregators.dp_ftrl_mean)",
}
#: Algorithms that take the DP aggregator (the others send values that bypass it).
_DP_ALGORITHMS = ("fedavg", "fedprox", "ditto")


# -- one rule per key (fedjax_sim._validation) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one key is checked: ``check(path, value)`` raises; ``text`` is the docs' wording."""

  text: str
  check: Callable[[str, Any], Any]
  numeric: bool = False  # a float: text such as 1e-5 gets YAML's hint


def _optional(rule: Rule) -> Rule:
  return Rule(f"{rule.text}, or null",
              lambda path, v: None if v is None else rule.check(path, v), rule.numeric)


def _one_of(registry) -> Rule:
  return Rule("one of " + ", ".join(f"`{k}`" for k in registry),
              lambda path, v: _v.choice(path, v, registry))


_POSITIVE = Rule("> 0", _v.positive, True)
_NON_NEGATIVE = Rule(">= 0", _v.non_negative, True)
_COUNT = Rule("an int >= 1", _v.positive_int)
_BOOL = Rule("true or false", _v.boolean)
_TEXT = Rule("a non-empty string", _v.text)

#: ``section.key`` -> its rule. Combinations (exactly one of two keys, a file dataset's path,
#: ...) are checked by :func:`validate` after every key.
RULES: dict[str, Rule] = {
    "data.name": _one_of(DATASETS),
    "data.path": _optional(_TEXT),
    "data.num_clients": _COUNT,
    "data.partition": _one_of(PARTITIONS),
    "data.alpha": _POSITIVE,
    "data.shards_per_client": _COUNT,
    "data.max_clients": _optional(_COUNT),
    "data.seq_len": _COUNT,
    "model.name": _one_of(MODELS),
    "model.hidden": Rule("a non-empty list of ints >= 1", _v.positive_ints),
    "algorithm.name": _one_of(ALGORITHMS),
    "algorithm.client_lr": _POSITIVE,
    "algorithm.local_epochs": _optional(_COUNT),
    "algorithm.local_steps": _optional(_COUNT),
    "algorithm.batch_size": _COUNT,
    "algorithm.mu": _NON_NEGATIVE,
    "algorithm.q": _NON_NEGATIVE,
    "algorithm.lam": _NON_NEGATIVE,
    "algorithm.alpha": _POSITIVE,
    "server.optimizer": _one_of(SERVER_OPTIMIZERS),
    "server.lr": _POSITIVE,
    "server.momentum": Rule("in [0, 1)", lambda p, v: _v.hyperparameter(
        p, v, low=0, high=1, high_open=True), True),
    "privacy.clip": _optional(_POSITIVE),
    "privacy.noise_multiplier": Rule(">= 0 (0: no noise)", _v.non_negative, True),
    "privacy.adaptive": _BOOL,
    "privacy.target_quantile": Rule("in (0, 1)", lambda p, v: _v.hyperparameter(
        p, v, low=0, high=1, low_open=True, high_open=True), True),
    "privacy.delta": _optional(Rule("in (0, 1)", lambda p, v: _v.hyperparameter(
        p, v, low=0, high=1, low_open=True, high_open=True), True)),
    "sampler.cohort_size": _optional(_COUNT),
    "sampler.q": _optional(Rule("in (0, 1]", lambda p, v: _v.hyperparameter(
        p, v, low=0, high=1, low_open=True), True)),
    "sampler.max_cohort_size": _optional(_COUNT),
    "sampler.min_separation": _optional(_COUNT),
    "sampler.max_participations": _optional(_COUNT),
    "privacy.mechanism": _one_of(MECHANISMS),
    "privacy.bands": _COUNT,
    "run.rounds": _COUNT,
    "run.eval_every": _COUNT,
    "run.seed": Rule("an int in [0, 2**32)", _v.seed),
    "run.out_dir": _TEXT,
    "run.checkpoint_every": _optional(_COUNT),
    "run.progress": _BOOL,
}


def _text_hint(value) -> str:
  if isinstance(value, str):
    return (" (YAML reads a number without a dot, like 1e-5, as text: write 1.0e-5; "
            "a number in quotes is text too)")
  return ""


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
  """Checks every key by its rule (:data:`RULES`), then the combinations; raises
  :class:`ConfigError` naming the key."""
  for key, rule in RULES.items():
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    try:
      rule.check(key, value)
    except (ValueError, TypeError) as e:
      hint = _text_hint(value) if rule.numeric else ""
      raise ConfigError(f"{e}{hint}") from None
  if cfg.data.name == "cifar10_pfl" and not cfg.data.path:
    raise ConfigError("data.name='cifar10_pfl' reads a file: set data.path to pfl-research's "
                      "cifar10_train.p (its `python -m dataset.cifar10.download_preprocess`).")
  if cfg.data.name in FILE_DATASETS and not cfg.data.path:
    raise ConfigError(f"data.name={cfg.data.name!r} reads a file: set data.path (a TFF h5, "
                      "FedJAX SQLite or TFF SQLite file).")
  if cfg.data.path and not os.path.exists(cfg.data.path):
    raise ConfigError(f"data.path={cfg.data.path!r} does not exist.")
  if cfg.data.name in FILE_DATASETS:
    _check_data_file(cfg.data.name, cfg.data.path)
  if (cfg.algorithm.local_epochs is None) == (cfg.algorithm.local_steps is None):
    raise ConfigError("set exactly one of algorithm.local_epochs and algorithm.local_steps "
                      "(set the other to null).")
  if (cfg.sampler.cohort_size is None) == (cfg.sampler.q is None):
    raise ConfigError("set exactly one of sampler.cohort_size (fixed-size) and sampler.q "
                      "(Poisson; set cohort_size: null).")
  if cfg.privacy.noise_multiplier and cfg.privacy.clip is None and not cfg.privacy.adaptive:
    raise ConfigError("privacy.noise_multiplier > 0 needs privacy.clip (or adaptive: true).")
  _check_mechanism(cfg)
  if cfg.model.name in _TEXT_MODELS and cfg.data.name != _TEXT_DATA[cfg.model.name]:
    raise ConfigError(f"model.name={cfg.model.name!r} needs text data "
                      f"(data.name={_TEXT_DATA[cfg.model.name]!r}).")
  if cfg.data.name == "stackoverflow_nwp" and cfg.model.name != "stackoverflow_lstm":
    raise ConfigError("data.name='stackoverflow_nwp' is next-word text: set "
                      "model.name='stackoverflow_lstm'.")
  return cfg


def _check_mechanism(cfg: Config) -> None:
  """The DP-FTRL keys (``privacy.mechanism``/``bands``, ``sampler.min_separation``) together."""
  p, sm = cfg.privacy, cfg.sampler
  if sm.min_separation is not None and sm.q is None:
    raise ConfigError("sampler.min_separation is cyclic Poisson sampling (each client in one of "
                      "b bins, a bin's clients joining with probability q): set sampler.q and "
                      "cohort_size: null.")
  if sm.max_participations is not None and sm.q is None:
    raise ConfigError("sampler.max_participations caps a cyclic Poisson schedule (sampler.q, "
                      "with sampler.min_separation or without: min-separation 1): set sampler.q "
                      "and cohort_size: null.")
  if p.mechanism == "gaussian":
    if p.bands != 1:
      raise ConfigError(f"privacy.bands={p.bands} needs privacy.mechanism: band_mf.")
    return
  if p.clip is None or p.adaptive:
    raise ConfigError(f"privacy.mechanism={p.mechanism!r} clips at a fixed bound: set "
                      "privacy.clip and adaptive: false.")
  if p.mechanism == "tree" and p.bands != 1:
    raise ConfigError("privacy.bands is BandMF's band count; the tree (mechanism: tree) has none.")
  if p.mechanism == "band_mf" and p.bands > 1 and p.delta is not None and (
      sm.min_separation is None or sm.min_separation < p.bands):
    raise ConfigError(
        f"privacy.mechanism='band_mf' with bands={p.bands} is accounted (privacy.delta) only "
        f"under min-separation >= bands: set sampler.min_separation >= {p.bands} "
        "(cyclic Poisson), or privacy.delta: null.")


def _set(raw: dict, assignment: str) -> None:
  import yaml

  if "=" not in assignment:
    raise ConfigError(f"--set expects section.key=value; got {assignment!r}.")
  path, value = assignment.split("=", 1)
  keys = path.strip().split(".")
  fields = {f.name: _NESTED.get((Config, f.name)) for f in dataclasses.fields(Config)}
  if keys[0] not in fields:
    raise ConfigError(f"--set {path}: unknown section {keys[0]!r}.{_suggest(keys[0], fields)}")
  if len(keys) != 2:
    raise ConfigError(f"--set {path}: expected section.key (e.g. run.rounds=10).")
  section_fields = {f.name for f in dataclasses.fields(fields[keys[0]])}
  if keys[1] not in section_fields:
    raise ConfigError(f"--set {path}: unknown key {keys[1]!r} in {keys[0]!r}."
                      f"{_suggest(keys[1], section_fields)}")
  if not isinstance(raw.get(keys[0]) or {}, dict):
    raise ConfigError(f"{keys[0]} must be a mapping; got {raw[keys[0]]!r}.")
  node = raw.setdefault(keys[0], {}) or {}
  raw[keys[0]] = node
  try:
    node[keys[1]] = yaml.load(value, Loader=_loader())
  except yaml.YAMLError as e:
    raise ConfigError(f"--set {path}: the value {value!r} is not valid YAML "
                      f"({' '.join(str(e).split())}).") from None


def _loader():
  """A YAML SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""
  import yaml

  class Loader(yaml.SafeLoader):
    pass

  def mapping(loader, node, deep=False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
      key = loader.construct_object(key_node, deep=deep)
      line = key_node.start_mark.line + 1
      if key in seen:
        raise ConfigError(
            f"duplicate key {key!r} at line {line} (first at line {seen[key]}): YAML would keep "
            "only the last value. Merge the two into one mapping.")
      seen[key] = line
    return loader.construct_mapping(node, deep=deep)

  Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
  return Loader


def load(path: str, overrides: list[str] = ()) -> Config:
  """Reads a YAML config (plus ``section.key=value`` overrides) into a validated Config."""
  import yaml

  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} not found.")
  try:
    with open(path) as f:
      raw = yaml.load(f, Loader=_loader()) or {}
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
    raise ConfigError(f"{path}: YAML syntax error at {where}: {e.problem}.") from None
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  for assignment in overrides:
    _set(raw, assignment)
  return validate(_build(Config, raw, ""))


# -- building the run ----------------------------------------------------------------------------


def build(cfg: Config):
  """Turns a config into ``(simulation, params, eval_fn, loss_fn)`` with the Python API, each
  name resolved through its registry."""
  import flax.linen as nn
  import jax
  import optax

  import fedjax_sim as fs

  d, m, a, p, sm = cfg.data, cfg.model, cfg.algorithm, cfg.privacy, cfg.sampler
  pop, test = DATASETS[d.name](cfg)
  pop = PARTITIONS[d.partition](cfg, pop, test)
  labels = np.asarray(pop.features["y"])
  num_classes = int(labels.max()) + 1
  module: nn.Module = MODELS[m.name](m, num_classes)
  x0 = np.asarray(pop.features["x"][:1])
  if m.name in _IMAGE_MODELS and x0.ndim < 3:
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
  make_loss = fs.models.sequence_loss if m.name in _TEXT_MODELS else fs.models.classifier_loss
  loss_fn = make_loss(fs.models.linen_apply(module, train=True))
  eval_loss = make_loss(fs.models.linen_apply(module))

  server = SERVER_OPTIMIZERS[cfg.server.optimizer](cfg.server)
  if p.adaptive:
    aggregator = fs.aggregators.adaptive_dp_mean(p.noise_multiplier,
                                                 target_quantile=p.target_quantile)
  elif p.clip is not None and p.mechanism == "band_mf":
    aggregator = fs.aggregators.band_mf_mean(p.clip, p.noise_multiplier, bands=p.bands)
  elif p.clip is not None and p.mechanism == "tree":
    aggregator = fs.aggregators.dp_ftrl_mean(p.clip, p.noise_multiplier,
                                             num_rounds=cfg.run.rounds)
  elif p.clip is not None:
    aggregator = fs.aggregators.dp_mean(p.clip, p.noise_multiplier)
  else:
    aggregator = None
  if aggregator is not None and a.name not in _DP_ALGORITHMS:
    raise ConfigError(f"algorithm.name={a.name!r} cannot run with privacy settings: it sends "
                      "values that bypass the DP aggregator. Use fedavg, fedprox or ditto.")
  work = dict(batch_size=a.batch_size, local_epochs=a.local_epochs, local_steps=a.local_steps)
  algo = ALGORITHMS[a.name](a, loss_fn, optax.sgd(a.client_lr), server, aggregator, work)
  if sm.cohort_size is not None and sm.cohort_size > pop.num_clients:
    raise ConfigError(
        f"sampler.cohort_size={sm.cohort_size} exceeds the {pop.num_clients} clients of the "
        f"data; set sampler.cohort_size <= {pop.num_clients} (or raise data.num_clients).")
  if sm.cohort_size is not None:
    sim = fs.Simulation(algo, pop, cohort_size=sm.cohort_size)
  else:
    cap = sm.max_cohort_size or pop.num_clients
    if sm.min_separation is None and sm.max_participations is None:
      sampler = fs.sampling.poisson(sm.q, cap)
    else:  # q: 1.0 is balls-in-bins; the cap covers run.rounds
      sampler = fs.sampling.cyclic_poisson(
          sm.q, sm.min_separation or 1, cap, max_participations=sm.max_participations,
          num_rounds=None if sm.max_participations is None else cfg.run.rounds)
    sim = fs.Simulation(algo, pop, sampler=sampler)
  eval_data = test if test is not None else {k: np.asarray(v) for k, v in pop.features.items()}
  eval_fn = fs.evaluation.make_eval_fn(eval_loss, eval_data)
  return sim, params, eval_fn, eval_loss
