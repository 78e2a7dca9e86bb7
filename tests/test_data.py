"""Population (CSR), partitioners and in-jit samplers."""

import jax
import numpy as np
from scipy import stats

import fedjax_sim as fs


def test_from_arrays_csr_roundtrip():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3))
  y = rng.integers(0, 4, 50)
  ids = rng.choice([10, 20, 35, 99], 50)
  pop = fs.Population.from_arrays({"x": x, "y": y}, ids)
  assert pop.features["x"].dtype == np.float32 and pop.features["y"].dtype == np.int32
  assert pop.labels.tolist() == [10, 20, 35, 99]
  for i, label in enumerate(pop.labels):
    c = pop.client(i)
    np.testing.assert_allclose(c["x"], x[ids == label].astype(np.float32))
    np.testing.assert_array_equal(c["y"], y[ids == label])
  assert pop.total_examples == 50 and pop.max_examples == int(np.bincount(ids).max())


def test_from_arrays_keeps_empty_clients_with_num_clients():
  pop = fs.Population.from_arrays({"x": np.ones((3, 1))}, np.array([0, 2, 2]), num_clients=4)
  assert pop.num_examples.tolist() == [1, 0, 2, 0]


def test_from_clients_matches_inputs():
  clients = [{"x": np.full((n, 2), i, np.float32)} for i, n in enumerate([3, 0, 5])]
  pop = fs.Population.from_clients(clients)
  assert pop.num_examples.tolist() == [3, 0, 5]
  np.testing.assert_array_equal(pop.client(2)["x"], clients[2]["x"])


def test_uniform_sampler_distinct_and_uniform():
  sampler = fs.sampling.uniform(5)
  counts = np.zeros(20)
  for r in range(400):
    c = sampler.sample(jax.random.key(r), 20)
    ids = np.asarray(c.ids)
    assert len(set(ids.tolist())) == 5 and bool(c.mask.all())
    counts[ids] += 1
  assert stats.chisquare(counts).pvalue > 1e-3


def test_uniform_sampler_weights_zero_means_unavailable():
  w = np.zeros(10)
  w[[1, 4, 7]] = 1.0
  c = fs.sampling.uniform(5, weights=w).sample(jax.random.key(0), 10)
  real = np.asarray(c.ids)[np.asarray(c.mask)]
  assert sorted(real.tolist()) == [1, 4, 7]


def test_poisson_sizes_are_binomial_and_truncation_counted():
  n, q = 200, 0.1
  sampler = fs.sampling.poisson(q, max_cohort_size=60)
  sizes = np.array([int(sampler.sample(jax.random.key(r), n).mask.sum()) for r in range(600)])
  lo, hi = 12, 28
  bins = [np.sum(sizes < lo)] + [np.sum(sizes == s) for s in range(lo, hi)] + [np.sum(sizes >= hi)]
  probs = ([stats.binom.cdf(lo - 1, n, q)] + [stats.binom.pmf(s, n, q) for s in range(lo, hi)]
           + [stats.binom.sf(hi - 1, n, q)])
  assert stats.chisquare(bins, np.asarray(probs) * len(sizes)).pvalue > 1e-3
  capped = fs.sampling.poisson(0.5, max_cohort_size=10).sample(jax.random.key(0), 100)
  assert int(capped.mask.sum()) == 10 and int(capped.truncated) > 20


def test_dirichlet_partition_is_seeded_and_skewed():
  labels = np.repeat(np.arange(10), 100)
  a = fs.partition.dirichlet(labels, 20, alpha=0.1, seed=3)
  b = fs.partition.dirichlet(labels, 20, alpha=0.1, seed=3)
  np.testing.assert_array_equal(a, b)
  classes_per_client = [len(np.unique(labels[a == c])) for c in range(20)]
  assert np.mean(classes_per_client) < 6
  assert sorted(np.bincount(fs.partition.iid(10, 3))) == [3, 3, 4]
