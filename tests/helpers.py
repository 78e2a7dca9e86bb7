"""Plain helpers shared by the tests (and by sharded_worker.py): a small random population and
a linear model. Fixtures built from them live in conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np

# Exact float32 matmuls in every process that builds these workloads (the test process through
# conftest.py, and sharded_worker.py's fresh processes), so their results are comparable.
jax.config.update("jax_default_matmul_precision", "highest")


def make_population(num_clients=12, dim=5, classes=3, seed=0, min_size=1, max_size=17):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(min_size, max_size + 1, num_clients)
  clients = []
  for n in sizes:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    clients.append({"x": x, "y": y})
  return clients


def linear_apply(p, x):
  return x @ p["w"] + p["b"]


def init_params(dim=5, classes=3, seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(dim, classes)).astype(np.float32) * 0.1),
          "b": jnp.zeros(classes, jnp.float32)}
