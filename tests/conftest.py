"""Shared fixtures, and the test session's compile settings.

Compile settings: the suite compiles several hundred small XLA:CPU programs (each test builds
its own Simulation), and compiling, not running, is most of its CPU time. Unless
``FEDJAX_SIM_TEST_FULL_OPT=1``, this process compiles with jax's
``jax_disable_most_optimizations`` (LLVM -O0) and, on the jaxlib versions it was measured on,
XLA:CPU's classic emitters (``--xla_cpu_use_fusion_emitters=false``). Measured on a 2-core
machine at load ~2-3, jaxlib 0.10.2: the first ``run`` of test_round.py's FedAvg/FedProx block
took 3.0 s of CPU with the defaults, 1.1 s with both; ``time pytest tests/test_round.py`` took
103 s of user CPU with ``FEDJAX_SIM_TEST_FULL_OPT=1`` and 47 s without. The semantics are XLA's
either way (results agree to float rounding; tests compare against oracles with tolerances, and
bit-for-bit tests compare two runs compiled alike). A bit-for-bit test of two *different*
programs that relies on XLA's simplifier is marked ``full_opt`` (jax's optimizations back on).
The flag is set for this process only: ``XLA_FLAGS`` is restored once the backend has started,
so child processes (examples, CLI, host-device scenarios) see the user's environment.

Fixtures: the small random population and linear model most tests use, as session fixtures
(``clients``, ``pop``, ``loss_fn``) and as factories (``make_population``, ``init_params``,
``linear_apply``) for tests that need other sizes. Nothing imports this file (sharded_worker.py,
which runs in fresh processes, has its own copy of the three functions).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

#: XLA:CPU flags that shorten compiles, and the jaxlib versions they were measured on (XLA
#: aborts the process on a flag it does not know). One LLVM module per program: on 2 cores,
#: splitting the codegen costs more than it overlaps (a small FedAvg block: 0.41 s of CPU to
#: compile instead of 0.54 s, 4 trials each, jaxlib 0.10.2).
FAST_COMPILE_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                          "--xla_cpu_parallel_codegen_split_count=1")
FAST_COMPILE_TESTED_ON = ("0.10.2",)


def _fast_compile():
  import jaxlib

  if os.environ.get("FEDJAX_SIM_TEST_FULL_OPT", "0") == "1":
    return
  jax.config.update("jax_disable_most_optimizations", True)
  try:  # a private jax helper: if it moves, leave XLA_FLAGS alone (only slower compiles)
    from jax._src import xla_bridge

    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = True
  if started or jaxlib.__version__ not in FAST_COMPILE_TESTED_ON:
    return
  import fedjax_sim  # noqa: F401 - adds its own XLA flags first (and records the user's)

  before = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = " ".join([before or "", *FAST_COMPILE_XLA_FLAGS]).strip()
  try:
    jax.devices()  # the backend reads XLA_FLAGS now, once
  finally:
    if before is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = before


_fast_compile()
# Exact float32 matmuls, so results compare with the oracles' and other processes' (the same
# setting as tests/sharded_worker.py's fresh processes).
jax.config.update("jax_default_matmul_precision", "highest")

import fedjax_sim as fs  # noqa: E402


def _make_population(num_clients=12, dim=5, classes=3, seed=0, min_size=1, max_size=17):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(min_size, max_size + 1, num_clients)
  return [{"x": rng.normal(size=(n, dim)).astype(np.float32),
           "y": rng.integers(0, classes, n).astype(np.int32)} for n in sizes]


def _linear_apply(p, x):
  return x @ p["w"] + p["b"]


def _init_params(dim=5, classes=3, seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(dim, classes)).astype(np.float32) * 0.1),
          "b": jnp.zeros(classes, jnp.float32)}


@pytest.fixture(scope="session")
def make_population():
  """``make_population(num_clients=12, dim=5, classes=3, seed=0, min_size=1, max_size=17)``:
  a list of client dicts ``{"x": float32[n, dim], "y": int32[n]}`` with random sizes."""
  return _make_population


@pytest.fixture(scope="session")
def init_params():
  """``init_params(dim=5, classes=3, seed=1)``: ``{"w", "b"}`` for ``linear_apply``."""
  return _init_params


@pytest.fixture(scope="session")
def linear_apply():
  """``linear_apply(p, x) = x @ p["w"] + p["b"]``."""
  return _linear_apply


@pytest.fixture(autouse=True)
def _full_optimizations(request):
  """Tests marked ``full_opt`` compile with jax's default optimizations (see the docstring)."""
  if request.node.get_closest_marker("full_opt") is None:
    yield
    return
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def run_with_package():
  """A function that runs ``examples/<name>.py *args`` with this checkout's package importable
  (also when not installed) and returns its stdout; it fails the test on a non-zero exit."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(name, *args):
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(root, "examples", f"{name}.py"), *args],
                         capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout

  return run


@pytest.fixture(scope="session")
def clients():
  return _make_population()


@pytest.fixture(scope="session")
def pop(clients):
  return fs.Population.from_clients(clients)


@pytest.fixture(scope="session")
def loss_fn():
  return fs.models.classifier_loss(_linear_apply)


@pytest.fixture
def partitionable():
  """``partitionable(value)`` sets ``jax_threefry_partitionable`` for one test; restored after."""
  before = jax.config.jax_threefry_partitionable
  yield lambda value: jax.config.update("jax_threefry_partitionable", value)
  jax.config.update("jax_threefry_partitionable", before)
