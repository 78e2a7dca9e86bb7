"""Federated self-supervised learning (FedAlignUniform, SSD): losses against NumPy loop oracles,
SSD with zero DSR/PD weights against the base, the vmapped round against a loop over clients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import round_keys

import fedjax_sim as fs
from fedjax_sim import ssl
from fedjax_sim.client import ClientData


def unit(v):
  return v / max(np.sqrt(np.sum(v * v)), 1e-12)


def np_align(z1, z2, m):
  tot, n = 0.0, 0
  for i in range(len(z1)):
    if m[i]:
      tot += np.sum((unit(z1[i]) - unit(z2[i])) ** 2)
      n += 1
  return tot / n


def np_unif(z, m, t=2.0):
  vals = []
  for i in range(len(z)):
    for j in range(i + 1, len(z)):
      if m[i] and m[j]:
        vals.append(np.exp(-t * np.sum((unit(z[i]) - unit(z[j])) ** 2)))
  return np.log(np.mean(vals))


def np_dsr(z, q, s, m, mode):
  rows, n = [], 0
  for i in range(len(z)):
    if not m[i]:
      continue
    zi = unit(z[i])
    target = q @ (s * (q.T @ zi))  # zi Q diag(s) Q^T, as a column
    if mode == "code":
      target = unit(target)
    rows.append(np.sum((zi - target) ** 2))
    n += 1
  return np.sqrt(np.sum(rows)) / n if mode == "code" else np.mean(rows)


def np_softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def np_pd(h, z, m, temp, direction):
  vals = []
  for i in range(len(h)):
    if m[i]:
      ph, pz = np_softmax(h[i] / temp), np_softmax(z[i] / temp)
      p, q = (pz, ph) if direction == "code" else (ph, pz)
      vals.append(np.sum(p * (np.log(p) - np.log(q))))
  return np.mean(vals)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(7, 6)).astype(np.float32)
  z2 = rng.normal(size=(7, 6)).astype(np.float32)
  h = rng.normal(size=(7, 6)).astype(np.float32) * 2
  m = np.array([1, 1, 0, 1, 1, 1, 0], np.float32)
  return z1, z2, h, m


def test_loss_terms_equal_numpy_oracles(batch):
  z1, z2, h, m = batch
  np.testing.assert_allclose(ssl.alignment_loss(z1, z2, m), np_align(z1, z2, m), rtol=1e-5)
  np.testing.assert_allclose(ssl.uniformity_loss(z1, m), np_unif(z1, m), rtol=1e-5)
  np.testing.assert_allclose(ssl.uniformity_loss(z1, m, t=0.7), np_unif(z1, m, 0.7), rtol=1e-5)
  basis = ssl.dsr_basis(6, 3, alpha=10.0, seed=3)
  q, s = np.asarray(basis.q, np.float64), np.asarray(basis.scales[1], np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
  for mode in ("code", "paper"):
    np.testing.assert_allclose(ssl.dsr_loss(z1, basis.q, basis.scales[1], m, mode=mode),
                               np_dsr(z1, q, s, m, mode), rtol=1e-4)
  for direction in ("code", "paper"):
    np.testing.assert_allclose(
        ssl.distillation_loss(h, z1, m, temperature=0.5, direction=direction),
        np_pd(h, z1, m, 0.5, direction), rtol=1e-4, atol=1e-6)
  mse = np.mean([np.mean((h[i] - z1[i]) ** 2) for i in range(7) if m[i]])
  np.testing.assert_allclose(ssl.distillation_loss(h, z1, m, method="mse"), mse, rtol=1e-5)


def test_dsr_geometry_and_stop_gradient(batch):
  z1, _, _, m = batch
  basis = ssl.dsr_basis(6, 3, alpha=10.0, seed=0)
  scales = np.asarray(basis.scales)
  assert ((scales == 10).sum(1) == 2).all()  # 6 // 3 directions per block
  assert ((scales == 10).sum(0) <= 1).all()  # disjoint blocks
  # Paper form with Q = I is E ||ẑ - ẑ ⊙ d||² on the sphere.
  d = scales[2]
  eye = jnp.eye(6)
  want = np.mean([np.sum((unit(z1[i]) - unit(z1[i]) * d) ** 2) for i in range(7) if m[i]])
  np.testing.assert_allclose(ssl.dsr_loss(z1, eye, d, m, mode="paper"), want, rtol=1e-5)
  # The target is a constant: the gradient equals that of the loss with a precomputed target.
  target = ssl.dsr_target(z1, basis.q, basis.scales[0])
  fixed = lambda z: jnp.sqrt(jnp.sum(jnp.sum((ssl.normalize(z) - target) ** 2, -1) * m)) / m.sum()
  g = jax.grad(lambda z: ssl.dsr_loss(z, basis.q, basis.scales[0], m))(jnp.asarray(z1))
  np.testing.assert_allclose(g, jax.grad(fixed)(jnp.asarray(z1)), rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(g)[m == 0]).max() == 0.0  # padded rows get no gradient


def test_augment_is_a_keyed_shift_flip_noise():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32))
  same = ssl.image_augment((8, 8), pad=0, flip_prob=0.0, noise_std=0.0)
  np.testing.assert_array_equal(same(jax.random.key(0), x), x)
  flip = ssl.image_augment((8, 8), pad=0, flip_prob=1.0, noise_std=0.0)
  np.testing.assert_array_equal(flip(jax.random.key(0), x).reshape(5, 8, 8),
                                np.asarray(x).reshape(5, 8, 8)[:, :, ::-1])
  shift = ssl.image_augment((8, 8), pad=1, flip_prob=0.0, noise_std=0.0)
  out = np.asarray(shift(jax.random.key(1), x)).reshape(5, 8, 8)
  padded = np.pad(np.asarray(x).reshape(5, 8, 8), ((0, 0), (1, 1), (1, 1)))
  for i in range(5):
    assert any(np.array_equal(out[i], padded[i, a:a + 8, b:b + 8])
               for a in range(3) for b in range(3))
  full = ssl.image_augment((8, 8))
  np.testing.assert_array_equal(full(jax.random.key(2), x), full(jax.random.key(2), x))
  assert not np.allclose(full(jax.random.key(2), x), full(jax.random.key(3), x))


def test_metrics_equal_oracles():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(30, 4))
  ids = rng.integers(0, 3, 30)
  np.testing.assert_allclose(ssl.uniformity(f), -np_unif(f, np.ones(30)), rtol=1e-6)
  dec = ssl.uniformity_decomposition(f, ids)
  g = [[np.exp(-2 * np.sum((unit(a) - unit(b)) ** 2)) for b in f] for a in f]
  intra = sum(g[a][b] for a in range(30) for b in range(30) if a != b and ids[a] == ids[b])
  inter = sum(g[a][b] for a in range(30) for b in range(30) if ids[a] != ids[b])
  np.testing.assert_allclose([dec["intra"], dec["inter"]], np.array([intra, inter]) / 870,
                             rtol=1e-6)
  np.testing.assert_allclose(dec["global"], ssl.uniformity(f), rtol=1e-6)  # same pairs
  local = [(np.sum(ids == k), ssl.uniformity(f[ids == k])) for k in range(3)]
  np.testing.assert_allclose(dec["local"], sum(n * u for n, u in local) / 30, rtol=1e-6)
  sv = np.linalg.svd(f, compute_uv=False)
  p = sv / sv.sum()
  np.testing.assert_allclose(ssl.effective_rank(f), np.exp(-np.sum(p * np.log(p))), rtol=1e-6)
  y = (f[:, 0] > 0).astype(int)
  assert ssl.linear_probe_accuracy(f, y, f, y, steps=300, learning_rate=0.05) == 1.0


def _setup(num_clients=4, dim=6):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 16)).astype(np.float32)
  ids = np.concatenate([np.arange(num_clients), rng.integers(0, num_clients, 60 - num_clients)])
  pop = ssl.with_client_ids(fs.Population.from_arrays({"x": x}, ids, num_clients=num_clients))
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"encoder": ssl.mlp_init(k1, [16, 12, dim]),
            "projector": ssl.mlp_init(k2, [dim, 12, dim])}
  return pop, params


AUG = ssl.image_augment((4, 4), pad=1, flip_prob=0.5, noise_std=0.0)
KW = dict(client_optimizer=optax.sgd(0.05, momentum=0.9), batch_size=8, local_epochs=1,
          augment=AUG)


def _run(algo, pop, params, rounds, cohort=None):
  sim = fs.Simulation(algo, pop, cohort_size=cohort or pop.num_clients, chunk_size=3)
  state, metrics = sim.run(sim.init(params, jax.random.key(1)), num_rounds=rounds)
  return state.params, metrics


@pytest.mark.slow  # two SSD programs compiled with full optimizations (~20 s of CPU)
@pytest.mark.full_opt  # bit-for-bit across two programs: XLA's simplifier drops the zero terms
def test_ssd_with_zero_weights_equals_the_base():
  pop, params = _setup()
  base = ssl.fed_align_uniform(ssl.mlp_apply, ssl.mlp_apply, **KW)
  zero = ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=4, gamma=0.0, delta=0.0, **KW)
  p_base, m_base = _run(base, pop, params, 2)
  p_zero, m_zero = _run(zero, pop, params, 2)
  chex.assert_trees_all_equal(p_base, p_zero)
  np.testing.assert_array_equal(m_base["loss"], m_zero["loss"])


def test_vmapped_round_equals_loop_over_clients():
  pop, params = _setup()
  algo = ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=4, **KW)
  ours, metrics = _run(algo, pop, params, 1)
  assert metrics["dsr"][0] > 0 and metrics["pd"][0] > 0
  # Oracle: a Python loop over the clients, each with the engine's key for its global id.
  _, client_key, _, _ = round_keys(jax.random.key(1), 0)
  update = jax.jit(algo.client_update)
  deltas, weights = [], []
  for cid in range(pop.num_clients):
    data = ClientData(pop.features, pop.offsets[cid], pop.num_examples[cid], pop.max_examples)
    out = update(params, data, (), jax.random.fold_in(client_key, cid))
    deltas.append(out.delta)
    weights.append(float(out.weight))
  want = jax.tree.map(
      lambda p, *ds: p - sum(w * d for w, d in zip(weights, ds)) / sum(weights), params, *deltas)
  chex.assert_trees_all_close(ours, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # SSD end to end; test_vmapped_round_equals_loop_over_clients stays
def test_slot_assignment_cross_device():
  # Blocks 0..num_slots-1 only, reassigned between rounds.
  blocks = [np.asarray(ssl.slot_blocks(jax.random.key(0), r, 8, 3)) for r in range(4)]
  assert all(b.min() >= 0 and b.max() < 3 and np.bincount(b, minlength=3).min() >= 2
             for b in blocks)
  assert any(not np.array_equal(blocks[0], b) for b in blocks[1:])
  pop, params = _setup(num_clients=8, dim=8)
  slot = ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=8, num_clients=8, dsr_assign="slot",
                 num_slots=3, **KW)
  sim = fs.Simulation(slot, pop, cohort_size=3)
  state, m = sim.run(sim.init(params, jax.random.key(1)), num_rounds=2)
  assert int(state.server_extra) == 2 and np.all(np.isfinite(m["loss"])) and np.all(m["dsr"] > 0)


def test_bad_input_is_clear_before_compiling():
  pop, params = _setup()
  with pytest.raises(ValueError, match="dim // num_clients"):
    ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=3, num_clients=4, **KW)
  # PD needs equal encoder / projector dims: caught at Simulation.init, before compiling.
  k1, k2 = jax.random.split(jax.random.key(0))
  bad = {"encoder": ssl.mlp_init(k1, [16, 12, 5]), "projector": ssl.mlp_init(k2, [5, 12, 6])}
  algo = ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=4, **KW)
  with pytest.raises(ValueError, match="delta=0"):
    fs.Simulation(algo, pop, cohort_size=4).init(bad, jax.random.key(0))
  no_pd = ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=4, delta=0.0, **KW)
  fs.Simulation(no_pd, pop, cohort_size=4).init(bad, jax.random.key(0))  # fine without PD
  with pytest.raises(ValueError, match="with_client_ids"):
    raw = fs.Population.from_arrays({"x": np.asarray(pop.features["x"])},
                                    np.asarray(pop.features["client_id"]))
    fs.Simulation(algo, raw, cohort_size=4).init(params, jax.random.key(0))
  small = ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=2, **KW)
  with pytest.raises(ValueError, match="num_clients=4"):
    fs.Simulation(small, pop, cohort_size=4).init(params, jax.random.key(0))
  with pytest.raises(ValueError, match="num_slots"):
    ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=4, dsr_assign="slot", **KW)
  with pytest.raises(ValueError, match="gamma"):
    ssl.ssd(ssl.mlp_apply, ssl.mlp_apply, dim=6, num_clients=4, gamma=-1.0, **KW)
  with pytest.raises(ValueError, match="image_shape"):
    ssl.image_augment((8,))


def test_metric_bad_inputs_and_probe_reuses_its_program():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  with pytest.raises(ValueError, match="non-negative integer class ids"):
    ssl.linear_probe_accuracy(x, y - 1, x, y)
  with pytest.raises(ValueError, match="same width"):
    ssl.linear_probe_accuracy(x, y, x[:, :3], y)
  with pytest.raises(ValueError, match="at least 2 rows"):
    ssl.uniformity(x[:1])
  with pytest.raises(ValueError, match="one id per feature row"):
    ssl.uniformity_decomposition(x, np.zeros(3, int))
  before = ssl._fit_probe._cache_size()
  ssl.linear_probe_accuracy(x, y, x, y)
  ssl.linear_probe_accuracy(x + 1.0, y, x, y)  # new data, same shapes: no new program
  assert ssl._fit_probe._cache_size() - before <= 1


def test_normalize_gradient_is_finite_at_zero():
  g = jax.grad(lambda z: ssl.alignment_loss(z, z + 1.0))(jnp.zeros((2, 3)))
  assert np.all(np.isfinite(np.asarray(g)))
