"""More bad input, refused before compiling: float hyper-parameters given as text (or bools,
arrays), ``memory_budget``, the config's file datasets; and the server optimizers' τ (``eps``)
against a NumPy oracle of Reddi et al. 2021."""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import _validation
from fedjax_sim import config as cfglib
from fedjax_sim.types import MASK_KEY

_LOSS = fs.models.classifier_loss(lambda p, x: x @ p)
_OPT = dict(client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
A, G = fs.algorithms, fs.aggregators

# -- 1. float hyper-parameters: one check (_validation.hyperparameter) -------------------------

# (factory call taking the value, argument name): every float hyper-parameter of the algorithm,
# aggregator and server-optimizer factories.
FLOAT_ARGUMENTS = [
    (lambda v: A.fedprox(_LOSS, mu=v, **_OPT), "mu"),
    (lambda v: A.scaffold(_LOSS, client_learning_rate=v, batch_size=4, local_epochs=1),
     "client_learning_rate"),
    (lambda v: A.fednova(_LOSS, client_learning_rate=v, batch_size=4, local_epochs=1),
     "client_learning_rate"),
    (lambda v: A.fednova(_LOSS, client_learning_rate=0.1, momentum=v, batch_size=4,
                         local_epochs=1), "momentum"),
    (lambda v: A.qffl(_LOSS, q=v, client_learning_rate=0.1, batch_size=4, local_epochs=1), "q"),
    (lambda v: A.qffl(_LOSS, q=1.0, client_learning_rate=v, batch_size=4, local_epochs=1),
     "client_learning_rate"),
    (lambda v: A.ditto(_LOSS, lam=v, **_OPT), "lam"),
    (lambda v: A.feddyn(_LOSS, alpha=v, **_OPT), "alpha"),
    (lambda v: A.fedavgm(v), "learning_rate"),
    (lambda v: A.fedavgm(1.0, momentum=v), "momentum"),
    (lambda v: A.fedadam(v), "learning_rate"),
    (lambda v: A.fedadam(b1=v), "b1"),
    (lambda v: A.fedadam(b2=v), "b2"),
    (lambda v: A.fedadam(eps=v), "eps"),
    (lambda v: A.fedyogi(v), "learning_rate"),
    (lambda v: A.fedyogi(eps=v), "eps"),
    (lambda v: A.fedyogi(initial_accumulator_value=v), "initial_accumulator_value"),
    (lambda v: A.fedadagrad(v), "learning_rate"),
    (lambda v: A.fedadagrad(eps=v), "eps"),
    (lambda v: A.fedadagrad(initial_accumulator_value=v), "initial_accumulator_value"),
    (lambda v: G.dp_mean(clip=v, noise_multiplier=1.0), "clip"),
    (lambda v: G.dp_mean(clip=1.0, noise_multiplier=v), "noise_multiplier"),
    (lambda v: G.dp_mean(clip=1.0, noise_multiplier=1.0, weight_cap=v), "weight_cap"),
    (lambda v: G.dp_mean(clip=1.0, noise_multiplier=1.0, denominator=v), "denominator"),
    (lambda v: G.adaptive_clip_l2(initial_clip=v), "initial_clip"),
    (lambda v: G.adaptive_clip_l2(target_quantile=v), "target_quantile"),
    (lambda v: G.adaptive_clip_l2(learning_rate=v), "learning_rate"),
    (lambda v: G.adaptive_clip_l2(count_noise_stddev=v), "count_noise_stddev"),
    (lambda v: G.adaptive_dp_mean(v), "noise_multiplier"),
    (lambda v: G.local_dp_mean(clip=1.0, noise_multiplier=v), "noise_multiplier"),
    (lambda v: G.clip_l2(v), "clip"),
    (lambda v: G.gaussian_noise(v, 1.0), "noise_multiplier"),
    (lambda v: G.trimmed_mean(v), "beta"),
    (lambda v: G.geometric_median(eps=v), "eps"),
    (lambda v: G.centered_clip(v), "radius"),
    (lambda v: G.norm_bounded_mean(v), "max_norm"),
    (lambda v: G.distributed_dp_mean(clip=v, noise_multiplier=1.0), "clip"),
    (lambda v: G.distributed_dp_mean(clip=1.0, noise_multiplier=v), "noise_multiplier"),
]
_IDS = [f"{i}-{name}" for i, (_, name) in enumerate(FLOAT_ARGUMENTS)]


@pytest.mark.parametrize("make,name", FLOAT_ARGUMENTS, ids=_IDS)
def test_float_given_as_text_is_refused_naming_the_argument(make, name):
  make(0.25)  # the number itself is fine (0.25 lies in every range above)
  with pytest.raises(TypeError, match=rf"^{name} must .*got the string '0.25'\. Pass the number "
                                      rf"itself \({name}=0.25\), not text\."):
    make("0.25")


@pytest.mark.parametrize("make,name", FLOAT_ARGUMENTS, ids=_IDS)
def test_float_given_as_bool_or_vector_is_refused(make, name):
  with pytest.raises(TypeError, match=rf"^{name} must .*got the bool True"):
    make(True)
  with pytest.raises(ValueError, match=rf"^{name} must .*one scalar; got an array of shape \(2,\)"):
    make(np.array([0.25, 0.25]))


@pytest.mark.parametrize("make,name", FLOAT_ARGUMENTS, ids=_IDS)
def test_concrete_numpy_and_jax_scalars_are_range_checked(make, name):
  for ok in (np.float32(0.25), np.array(0.25), jnp.float32(0.25)):
    make(ok)
  for bad in (-1.0, np.float64(-1.0), jnp.float32(-1.0), float("nan"), float("inf")):
    with pytest.raises(ValueError, match=rf"^{name} must "):
      make(bad)


def test_fedprox_mu_string_is_refused():
  with pytest.raises(TypeError, match=r"mu must be >= 0 \(a finite number\); got the string "
                                      r"'0.1'\. Pass the number itself \(mu=0.1\), not text\."):
    A.fedprox(_LOSS, mu="0.1", **_OPT)


@pytest.mark.parametrize("make,message", [
    (lambda: A.fedadam(b2=1.0), r"b2 must lie in \[0, 1\); got 1.0"),
    (lambda: A.fedyogi(b1=-0.1), r"b1 must lie in \[0, 1\); got -0.1"),
    (lambda: A.fedadagrad(eps=0.0), r"eps must be > 0 \(a finite number\); got 0.0"),
    (lambda: A.fedavgm(momentum=1.0), r"momentum must lie in \[0, 1\); got 1.0"),
    (lambda: A.fedadam(learning_rate=0), r"learning_rate must be > 0"),
    (lambda: G.norm_bounded_mean(max_norm=-2.0), r"max_norm must be > 0"),
    (lambda: G.adaptive_clip_l2(target_quantile=1.0), r"target_quantile must lie in \(0, 1\)"),
    (lambda: G.dp_mean(clip=1.0, noise_multiplier=1 + 2j), r"noise_multiplier must .*complex"),
])
def test_out_of_range_hyperparameters_name_the_argument(make, message):
  with pytest.raises((ValueError, TypeError), match=message):
    make()


def test_learning_rate_schedules_and_no_momentum_pass():
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  for opt in (A.fedadam(schedule), A.fedyogi(schedule), A.fedadagrad(schedule),
              A.fedavgm(schedule), A.fedavgm(1.0, momentum=None)):
    assert isinstance(opt, optax.GradientTransformation)


def test_traced_scalars_pass_unchecked_and_traced_vectors_are_refused():
  # fs.sweep builds each lane with traced float32 scalars (after the concrete check).
  check = lambda v: _validation.hyperparameter("mu", v, low=0)  # noqa: E731
  out = jax.jit(lambda v: check(v) * 2.0)(jnp.float32(-1.0))  # value unknown when traced
  assert float(out) == -2.0
  np.testing.assert_array_equal(jax.vmap(check)(jnp.array([0.5, 1.5])), [0.5, 1.5])
  with pytest.raises(ValueError, match=r"mu must .*one scalar; got an array of shape \(3,\)"):
    jax.jit(check)(jnp.zeros(3))
  with pytest.raises(TypeError, match=r"mu must .*dtype bool"):
    jax.jit(check)(jnp.bool_(True))


def test_server_optimizers_take_traced_hyperparameters():
  g = {"w": jnp.array([0.5, -2.0])}

  def step(lr, eps, b):
    outs = []
    for opt in (A.fedadagrad(lr, eps=eps), A.fedadam(lr, b1=b, eps=eps),
                A.fedyogi(lr, b1=b, eps=eps), A.fedavgm(lr, momentum=b)):
      outs.append(opt.update(g, opt.init(g))[0]["w"])
    return outs

  traced = jax.jit(step)(0.1, 1e-3, 0.9)
  for got, want in zip(traced, step(0.1, 1e-3, 0.9), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)


# -- 2. memory_budget ----------------------------------------------------------------------------


def test_memory_budget_passes_ints_and_none():
  assert _validation.memory_budget(None) is None
  assert _validation.memory_budget(2 * 2**30) == 2 * 2**30
  got = _validation.memory_budget(np.int64(1024))
  assert got == 1024 and type(got) is int
  assert _validation.memory_budget(1) == 1


@pytest.mark.parametrize("value,exc,message", [
    (0, ValueError, r"memory_budget must be >= 1 byte .*; got 0"),
    (-5, ValueError, r"memory_budget must be >= 1 byte .*; got -5"),
    (np.int32(-1), ValueError, r"memory_budget must be >= 1 byte"),
    (2e9, TypeError, r"memory_budget must be an int number of bytes >= 1 \(memory_budget="
                     r"2000000000, or e\.g\. 2 \* 2\*\*30 for 2 GiB\).*got float 2000000000.0"),
    (0.5, TypeError, r"memory_budget must be an int number of bytes >= 1, or None .*got float"),
    (True, TypeError, r"memory_budget must be an int .*got bool True"),
    (np.bool_(False), TypeError, r"memory_budget must be an int"),
    ("2GB", TypeError, r"memory_budget must be an int .*got str '2GB'"),
    (float("nan"), TypeError, r"memory_budget must be an int .*got float nan"),
])
def test_memory_budget_refuses_non_positive_floats_bools(value, exc, message):
  with pytest.raises(exc, match=message):
    _validation.memory_budget(value)


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-1, ValueError), (2e9, TypeError)])
def test_simulation_refuses_a_bad_memory_budget(value, exc):
  pop = fs.Population.from_arrays({"x": np.zeros((8, 2), np.float32)}, np.arange(8) % 4)
  algo = fs.algorithms.fedavg(lambda p, b, k: (jnp.sum(p * 0.0), {}),
                              client_optimizer=optax.sgd(0.1), batch_size=2, local_steps=1)
  with pytest.raises(exc, match="memory_budget must be"):
    fs.Simulation(algo, pop, cohort_size=2, memory_budget=value)


# -- 3. server optimizers: τ (eps) added to √v, against Reddi et al. 2021 -----------------------
# The pseudo-gradient g is ``server - client``; the server steps x <- x - η · scaled(g). Values of
# |g| near τ make τ's place (outside or inside the root) change the step by tens of percent.

_G1 = np.array([3e-3, -2e-3, 2e-4, 0.0, 0.5], np.float64)
_G2 = np.array([-1.5e-3, 4e-3, 2e-4, 3e-3, -0.2], np.float64)


def _steps(opt, grads):
  state = opt.init({"w": jnp.zeros(5, jnp.float32)})
  out = []
  for g in grads:
    upd, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state)
    out.append(np.asarray(upd["w"], np.float64))
  return out


def adagrad_oracle(grads, lr, tau, v0):
  v, out = np.full(5, v0), []
  for g in grads:
    v = v + g * g
    out.append(-lr * g / (np.sqrt(v) + tau))
  return out


def adam_oracle(grads, lr, b1, b2, tau):
  m, v, out = np.zeros(5), np.zeros(5), []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + tau))
  return out


def yogi_oracle(grads, lr, b1, b2, tau, init):
  m, v, out = np.full(5, init), np.full(5, init), []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = v - (1 - b2) * g * g * np.sign(v - g * g)
    out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + tau))
  return out


@pytest.mark.parametrize("v0", [0.0, 1e-6])
def test_fedadagrad_matches_the_paper(v0):
  lr, tau = 0.1, 1e-3
  got = _steps(A.fedadagrad(lr, eps=tau, initial_accumulator_value=v0), [_G1, _G2])
  want = adagrad_oracle([_G1, _G2], lr, tau, v0)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-9)
  # τ inside the root (the old eps**2 in optax.adagrad) gives another step: the test can fail.
  inside = -lr * _G1 / np.sqrt(v0 + _G1**2 + tau**2)
  assert not np.allclose(got[0], inside, rtol=1e-2)


def test_fedadam_matches_the_paper_tau():
  lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
  got = _steps(A.fedadam(lr, b1=b1, b2=b2, eps=tau), [_G1, _G2])
  for g, w in zip(got, adam_oracle([_G1, _G2], lr, b1, b2, tau), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-9)


def test_fedyogi_matches_the_paper_tau():
  lr, b1, b2, tau, init = 0.01, 0.9, 0.99, 1e-3, 1e-6
  got = _steps(A.fedyogi(lr, b1=b1, b2=b2, eps=tau, initial_accumulator_value=init), [_G1, _G2])
  for g, w in zip(got, yogi_oracle([_G1, _G2], lr, b1, b2, tau, init), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-9)


def test_fedadagrad_server_step_in_a_round():
  """One FedSGD round with FedAdagrad: the server step is the oracle's on the mean gradient."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 3)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, np.repeat(np.arange(4), 3))
  params = jnp.asarray(rng.normal(size=(3, 2)) * 0.1, jnp.float32)
  lr, tau = 0.5, 1e-2
  sim = fs.Simulation(A.fedsgd(_LOSS, server_optimizer=A.fedadagrad(lr, eps=tau)), pop,
                      cohort_size=4, chunk_size=2)
  state, _ = sim.run(sim.init(params, jax.random.key(0)), num_rounds=1)
  batch = {"x": x, "y": y, MASK_KEY: np.ones(12, np.float32)}
  grad = jax.grad(lambda p: _LOSS(p, batch, None)[0])(params)
  g = np.asarray(grad, np.float64)
  want = np.asarray(params, np.float64) - lr * g / (np.sqrt(g * g) + tau)
  np.testing.assert_allclose(np.asarray(state.params), want, rtol=1e-4, atol=1e-6)


# -- 4. the config's file datasets read FedJAX / TFF SQLite as documented ----------------------

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "federated")


def _config(tmp_path, name, path, model="logistic"):
  text = f"""
  data: {{name: {name}, path: {path}}}
  model: {{name: {model}, hidden: [8]}}
  sampler: {{cohort_size: 2}}
  run: {{rounds: 1, eval_every: 1, out_dir: {tmp_path / 'run'}}}
  """
  p = tmp_path / "c.yaml"
  p.write_text(textwrap.dedent(text))
  return str(p)


@pytest.mark.parametrize("name,file,model,reader", [
    ("emnist_h5", "fedjax_emnist.sqlite", "logistic", fs.datasets.emnist),
    ("emnist_h5", "tff_emnist.sqlite", "logistic", fs.datasets.emnist),
    ("shakespeare_h5", "fedjax_shakespeare.sqlite", "char_lstm", fs.datasets.shakespeare),
    ("shakespeare_h5", "tff_shakespeare.sqlite", "char_lstm", fs.datasets.shakespeare),
])
def test_file_datasets_accept_fedjax_and_tff_sqlite(tmp_path, name, file, model, reader):
  path = os.path.join(FIXTURES, file)
  cfg = cfglib.load(_config(tmp_path, name, path, model))
  sim = cfglib.build(cfg)[0]
  want = reader(path, split="train")  # a TFF file's train split, as documented
  assert sim.population.num_clients == want.num_clients
  np.testing.assert_array_equal(np.asarray(sim.population.num_examples),
                                np.asarray(want.num_examples))


@pytest.mark.parametrize("name,file,model,other", [
    ("emnist_h5", "fedjax_shakespeare.sqlite", "logistic", "shakespeare_h5"),
    ("shakespeare_h5", "tff_emnist.sqlite", "char_lstm", "emnist_h5"),
])
def test_file_of_another_dataset_is_refused_naming_the_keys(tmp_path, name, file, model, other):
  path = os.path.join(FIXTURES, file)
  cfg = cfglib.load(_config(tmp_path, name, path, model))
  with pytest.raises(cfglib.ConfigError, match=rf"data.path='.*{file}' does not hold the .* "
                                               rf"features .* that data.name='{name}' reads: "
                                               rf".*lacks features.*'{other}'"):
    cfglib.build(cfg)


def test_non_federated_file_is_refused_when_loading(tmp_path):
  path = os.path.join(FIXTURES, "fedjax_emnist.json")
  with pytest.raises(cfglib.ConfigError, match=r"data.path='.*fedjax_emnist.json' cannot be read "
                                               r"for data.name='emnist_h5': .*neither a SQLite "
                                               r"file"):
    cfglib.load(_config(tmp_path, "emnist_h5", path))


def test_config_reference_documents_sqlite_for_data_path():
  import importlib.util

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("hooks", os.path.join(root, "tools",
                                                                      "mkdocs_hooks.py"))
  hooks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hooks)
  row = next(line for line in hooks.config_reference().splitlines()
             if line.startswith("| `path` |"))
  assert "FedJAX SQLite" in row and "TFF SQLite" in row and "`train` split" in row
