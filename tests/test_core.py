"""The pure round core (fedjax_sim.core), the one place that compiles (fedjax_sim.programs), and
the layout rules that keep them so."""

import ast
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import core, programs, types
from fedjax_sim.sweep import compile_sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(pop, loss_fn):
  return pop, loss_fn, {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}


def _algo(loss_fn, lr=0.2, **kw):
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), batch_size=4,
                              local_steps=2, **kw)


def test_round_step_runs_under_eval_shape_with_shape_structs(setup):
  pop, loss_fn, params = setup
  algo = _algo(loss_fn, aggregator=fs.aggregators.dp_mean(1.0, 0.5))
  plan = core.plan_for(algo, fs.sampling.uniform(4), pop, params, chunk_size=2)
  spec = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)
  state_spec = jax.eval_shape(lambda p, k: core.initial_state(plan, p, k), spec(params),
                              jax.random.key(0))
  new_state, metrics = jax.eval_shape(lambda s, p: core.round_step(plan, s, p), state_spec,
                                      spec(pop))
  assert isinstance(new_state, core.ServerState)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state_spec)
  assert metrics["loss"].shape == () and metrics["clients"].dtype == jnp.float32


def test_round_step_is_the_simulations_round(setup):
  """The pure core, jitted by hand, equals Simulation.round bit for bit."""
  pop, loss_fn, params = setup
  algo = _algo(loss_fn)
  sim = fs.Simulation(algo, pop, cohort_size=4, chunk_size=2)
  state = sim.init(params, jax.random.key(3))
  plan = sim.plan
  mine = core.initial_state(plan, params, jax.random.key(3))
  chex.assert_trees_all_equal(jax.random.key_data(mine.key), jax.random.key_data(state.key))
  mine, m1 = jax.jit(lambda s, p: core.round_step(plan, s, p))(mine, pop)
  state, m2 = sim.round(state)
  chex.assert_trees_all_equal(mine.params, state.params)
  assert float(m1["loss"]) == m2["loss"]


def test_sample_cohort_depends_only_on_key_and_round(setup):
  pop, loss_fn, params = setup
  plan = core.plan_for(_algo(loss_fn), fs.sampling.uniform(4), pop, params, chunk_size=4)
  key = jax.random.key(5)
  a, _ = core.sample_cohort(plan, key, jnp.int32(7))
  b, _ = core.sample_cohort(plan.with_performance(chunk_size=1, sort_by_size=False), key, 7)
  c, _ = core.sample_cohort(plan, key, jnp.int32(8))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(np.asarray(a.ids), np.asarray(c.ids))
  # The cohort key is the first of the round key's three splits (the oracle's scheme).
  round_key = jax.random.fold_in(key, 7)
  chex.assert_trees_all_equal(jax.random.key_data(core.round_keys(key, 7).cohort),
                              jax.random.key_data(jax.random.split(round_key, 3)[0]))
  chex.assert_trees_all_equal(
      jax.random.key_data(core.round_keys(key, 7).shared),
      jax.random.key_data(jax.random.fold_in(round_key, types.SHARED_SALT)))


def test_sweep_compiles_once_for_every_lane(setup):
  pop, loss_fn, params = setup
  run = compile_sweep(
      lambda lr: _algo(loss_fn, lr), pop, params, seeds=[0, 1, 2, 3], num_rounds=3,
      hyperparameters={"lr": [0.01, 0.1, 0.3, 1.0]}, cohort_size=3)
  assert run.num_compiles == 0
  states, metrics = run()
  states2, _ = run()
  assert run.num_compiles == 1  # four lanes, four values, two calls: one program
  chex.assert_trees_all_equal(states.params, states2.params)
  assert metrics["loss"].shape == (4, 3)
  # Lanes differ (their learning rates reached the program as values, not constants).
  w = np.asarray(states.params["w"])
  assert not np.allclose(w[0], w[3])


def test_simulation_counts_compiles_on_the_host(setup):
  pop, loss_fn, params = setup
  sim = fs.Simulation(_algo(loss_fn), pop, cohort_size=3)
  state = sim.init(params, jax.random.key(0))
  state, _ = sim.run(state, 5, block_size=2)  # blocks of 2, 2 and 1: one program
  state, _ = sim.round(state)
  state, _ = sim.round(state)
  assert sim.num_compiles == {"round": 1, "block": 1}
  sim.init(params, jax.random.key(1))  # same plan: the programs are kept
  assert sim.num_compiles == {"round": 1, "block": 1}


def test_program_compiles_once_per_signature():
  f = programs.Program(lambda x, y: x * y, donate_argnums=())
  f(jnp.ones(3), jnp.float32(2.0))
  f(jnp.zeros(3), jnp.float32(3.0))
  assert f.num_compiles == 1
  f(jnp.ones(3, jnp.int32), jnp.int32(2))
  assert f.num_compiles == 2


def test_key_salts_are_named_once_and_distinct():
  salts = {n: v for n, v in vars(types).items() if n.endswith("_SALT")}
  assert {"SHARED_SALT", "SYSTEM_SALT", "STACK_SALT", "LOSS_EVAL_SALT",
          "PERSONAL_SALT"} <= set(salts)
  # Salts folded into the same parent key must differ.
  for group in (("SHARED_SALT", "SYSTEM_SALT"), ("AVAILABILITY_SALT", "OUTCOME_SALT"),
                ("ATTACK_SALT", "ROBUST_SALT"), ("LOSS_EVAL_SALT", "PERSONAL_SALT")):
    assert len({salts[n] for n in group}) == len(group)
  # No bare salt literal is folded in anywhere in the package.
  for path in (ROOT / "fedjax_sim").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("fold_in")
          and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
          and isinstance(node.args[1].value, int) and node.args[1].value > 0xFF):
        pytest.fail(f"{path.name}:{node.lineno}: a bare salt {hex(node.args[1].value)}; name "
                    "it in fedjax_sim/types.py")


def _class_privates() -> dict[str, str]:
  """Private attributes and methods defined by the package's classes: name -> defining file."""
  out = {}
  for path in (ROOT / "fedjax_sim").rglob("*.py"):
    for cls in ast.walk(ast.parse(path.read_text())):
      if not isinstance(cls, ast.ClassDef):
        continue
      for node in ast.walk(cls):
        name = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          name = node.name
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "self" and isinstance(node.ctx, ast.Store)):
          name = node.attr
        if name and name.startswith("_") and not name.startswith("__"):
          out.setdefault(name, path.relative_to(ROOT).as_posix())
  return out


def test_no_module_reaches_into_another_modules_class_privates():
  privates = _class_privates()
  offenders = []
  for root in ("fedjax_sim", "benchmarks", "examples", "tests", "tools"):
    for path in (ROOT / root).rglob("*.py"):
      rel = path.relative_to(ROOT).as_posix()
      for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr in privates
            and privates[node.attr] != rel
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
          offenders.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
  assert not offenders, offenders


@pytest.mark.parametrize("settings,exc,match", [
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({"chunk_size": 2.0}, ValueError, "chunk_size must be a positive int"),
    ({"sort_by_size": "no"}, TypeError, "sort_by_size must be True or False"),
    ({"unbatched_single_client": 1}, TypeError, "unbatched_single_client must be True or False"),
])
def test_round_plan_refuses_bad_settings_before_tracing(setup, settings, exc, match):
  pop, loss_fn, params = setup
  with pytest.raises(exc, match=match):
    core.plan_for(_algo(loss_fn), fs.sampling.uniform(4), pop, params, **settings)
  if "chunk_size" not in settings:
    with pytest.raises(exc, match=match):
      fs.Simulation(_algo(loss_fn), pop, cohort_size=4, **settings)


def test_round_plan_refuses_a_sampler_or_algorithm_of_another_kind(setup):
  pop, loss_fn, params = setup
  with pytest.raises(TypeError, match="RoundPlan.sampler"):
    core.plan_for(_algo(loss_fn), 4, pop, params)
  with pytest.raises(TypeError, match="RoundPlan.algorithm"):
    core.RoundPlan(loss_fn, fs.sampling.uniform(4), core.base_context(fs.sampling.uniform(4),
                                                                      pop))
