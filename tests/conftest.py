"""Shared fixtures. Plain helpers (and the matmul-precision setting) live in helpers.py, which
test modules import directly; nothing imports this file."""

import pytest
from helpers import linear_apply, make_population

import fedjax_sim as fs


@pytest.fixture(scope="session")
def clients():
  return make_population()


@pytest.fixture(scope="session")
def pop(clients):
  return fs.Population.from_clients(clients)


@pytest.fixture(scope="session")
def loss_fn():
  return fs.models.classifier_loss(linear_apply)
