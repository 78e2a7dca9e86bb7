import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs

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


@pytest.fixture(scope="session")
def clients():
  return make_population()


@pytest.fixture(scope="session")
def pop(clients):
  return fs.Population.from_clients(clients)


@pytest.fixture(scope="session")
def loss_fn():
  return fs.models.classifier_loss(linear_apply)
