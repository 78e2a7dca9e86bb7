"""The automatic chunk on CPU: light dense models are vmapped in chunks weighed against their
exact padding; convolutional and heavy models run one client at a time (fs.memory)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import memory


def _slots_oracle(steps, chunk):
  """Step slots of ``steps`` sorted descending and cut into chunks (padded with zero steps),
  by a plain loop."""
  s = sorted(steps, reverse=True)
  slots = 0
  for i in range(0, len(s), chunk):
    slots += chunk * max(s[i:i + chunk])
  return slots / sum(s)


def _modelled(steps, c, step_flops):
  """The modelled time per step of chunk ``c``, written out plainly."""
  overhead = 0.0 if step_flops is None else memory.CPU_VMAP_STEP_OVERHEAD_FLOPS / step_flops
  gain = 1 + memory.CPU_VMAP_GAIN * math.log2(min(c, memory.CPU_VMAP_GAIN_CHUNK))
  return _slots_oracle(steps, c) * (overhead / c + 1 / gain)


@pytest.mark.parametrize("seed", range(6))
def test_cpu_vmap_chunk_minimises_the_modelled_time(seed):
  rng = np.random.default_rng(seed)
  steps = rng.integers(1, 30, size=int(rng.integers(5, 600)))
  k = len(steps)
  for step_flops in (None, 3e4, 1e6, 3e7):
    for limit in (1, 3, 8, 64, 10_000):
      got = memory.cpu_vmap_chunk(steps, limit, step_flops=step_flops)
      powers = [c for c in (2 ** i for i in range(12)) if c <= min(limit, memory.CPU_MAX_CHUNK)]
      cands = {math.ceil(k / math.ceil(k / c)) for c in powers}  # balanced over the cohort
      cost = {c: _modelled(steps, c, step_flops) for c in cands}
      best = min(cost.values())
      near = [c for c in cands if cost[c] <= best * (1 + memory.CPU_VMAP_MARGIN) + 1e-12]
      assert got == min(near)  # the smallest chunk within the margin of the fastest


def test_cpu_vmap_chunk_extremes():
  # no padding at all: a light step gains from batching up to the gain's last measured chunk
  assert memory.cpu_vmap_chunk([3] * 512, 10_000, step_flops=2e7) == memory.CPU_VMAP_GAIN_CHUNK
  # a tiny step also shares the step's fixed cost: up to the largest chunk measured
  assert memory.cpu_vmap_chunk([3] * 512, 10_000, step_flops=1e4) == memory.CPU_MAX_CHUNK
  assert memory.cpu_vmap_chunk([3] * 100, 32, step_flops=2e7) == 25  # 4 balanced chunks, not 32s
  assert memory.cpu_vmap_chunk([3] * 512, 5) == 4  # the memory bound holds
  assert memory.cpu_vmap_chunk([50] + [1] * 9, 64) == 1  # any chunk pays the big client
  assert memory.cpu_vmap_chunk([0] * 64, 64) == memory.CPU_VMAP_GAIN_CHUNK  # no steps, no padding
  # the fixed cost moves a tiny model to larger chunks than a light one on the same cohort
  lognormal = np.ceil(np.random.default_rng(0).lognormal(1.5, 0.6, 1000)).astype(int)
  assert (memory.cpu_vmap_chunk(lognormal, 10_000, step_flops=4e4)
          > memory.cpu_vmap_chunk(lognormal, 10_000, step_flops=2e7) > 1)


def test_padding_factor_matches_the_loop():
  rng = np.random.default_rng(5)
  for _ in range(20):
    steps = rng.integers(1, 12, size=int(rng.integers(1, 40)))
    for c in (1, 2, 3, 7, 16):
      assert math.isclose(memory.padding_factor(steps, c), _slots_oracle(steps, c))
  assert fs.autotune.padding_factor is memory.padding_factor


def test_auto_chunk_size_cpu_branches():
  kw = dict(cohort_size=1000, example_bytes=4 * 784, batch_size=20, memory_budget=2**28,
            platform="cpu")
  equal = [5] * 1000
  light = 200_000  # 24 MFLOP per step: vmapped
  assert memory.auto_chunk_size(num_params=light, steps=equal, **kw) == 32
  assert memory.auto_chunk_size(num_params=light, **kw) == 1  # steps unknown: one client
  assert memory.auto_chunk_size(num_params=light, steps=equal, convolutional=True, **kw) == 1
  heavy = int(memory.CPU_VMAP_STEP_FLOPS / (6 * 20)) + 1  # just above the vmap threshold
  assert memory.auto_chunk_size(num_params=heavy, steps=equal, **kw) == 1
  # a tiny model (120 kFLOP per step): the FLOPs rule's chunk where steps are unknown ...
  tiny = 1_000
  assert memory.auto_chunk_size(num_params=tiny, **kw) == 8
  # ... and with steps, the chunk weighed against the padding: one huge client in the cohort
  # makes any chunk pay its 200 steps for every client sharing it
  skewed = [200] + [1] * 999
  got = memory.auto_chunk_size(num_params=tiny, steps=skewed, **kw)
  assert got == memory.cpu_vmap_chunk(skewed, 10**6, step_flops=6 * tiny * 20) < 8
  # the population workload's shape: 10^4 one-step clients of a 38 kFLOP step
  pop = dict(kw, cohort_size=10_000)
  assert memory.auto_chunk_size(num_params=610, steps=[1] * 10_000, step_flops=3.83e4,
                                **pop) == 250  # the cap, 256, balanced: 40 chunks of 250
  # the accelerator rule does not look at steps
  gpu = dict(kw, platform="gpu")
  assert (memory.auto_chunk_size(num_params=light, steps=equal, **gpu)
          == memory.auto_chunk_size(num_params=light, **gpu))


def _population(sizes, dim=784, seed=0):
  rng = np.random.default_rng(seed)
  n = int(np.sum(sizes))
  return fs.Population.from_arrays(
      {"x": rng.random((n, dim), np.float32), "y": rng.integers(0, 10, n).astype(np.int32)},
      np.repeat(np.arange(len(sizes)), sizes))


def _dense_algo(hidden):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(hidden)(x)))

  module = MLP()
  params = module.init(jax.random.key(0), jnp.ones((1, 784)))["params"]
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(module)),
                              client_optimizer=optax.sgd(0.1), batch_size=20, local_epochs=1)
  return algo, params


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_simulation_resolves_the_cpu_rule_from_the_populations_sizes():
  algo, params = _dense_algo(64)  # ~51k params: a light step
  equal = _population([40] * 120)
  sim = fs.Simulation(algo, equal, cohort_size=100)
  sim.init(params, jax.random.key(0))
  steps = fs.autotune.cohort_steps(np.asarray(equal.num_examples), 100, 20)
  want = memory.chunk_size_for(100, params, None, {"x": jax.ShapeDtypeStruct((784,), np.float32),
                                                   "y": jax.ShapeDtypeStruct((), np.int32)},
                               20, memory.CPU_BUDGET_BYTES, steps=steps)
  assert sim.chunk_size == want > 1  # equal clients: vmapped without padding
  # one huge client in every cohort of 12: any chunk > 1 pays its steps for all its clients
  skewed = _population([2000] + [1] * 11)
  sim = fs.Simulation(algo, skewed, cohort_size=12)
  sim.init(params, jax.random.key(0))
  assert sim.chunk_size == 1
  # a chunk the user asked for is kept
  sim = fs.Simulation(algo, equal, cohort_size=100, chunk_size=3)
  sim.init(params, jax.random.key(0))
  assert sim.chunk_size == 3


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_convolutional_models_stay_at_one_client_on_cpu():
  model = fs.zoo.EmnistCNN(10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  assert any(np.ndim(x) == 4 for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  pop = fs.Population.from_arrays(
      {"x": rng.random((60, 28, 28, 1), np.float32), "y": rng.integers(0, 10, 60)},
      np.repeat(np.arange(20), 3))
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(model)),
                              client_optimizer=optax.sgd(0.1), batch_size=3, local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=16)
  sim.init(params, jax.random.key(0))
  assert sim.chunk_size == 1



def test_counted_step_flops_decide_not_the_parameter_count():
  kw = dict(cohort_size=1000, num_params=200_000, example_bytes=4 * 784, batch_size=20,
            memory_budget=2**28, platform="cpu", steps=[5] * 1000)
  assert memory.auto_chunk_size(**kw) == 32  # 6 x params x batch: 24 MFLOP, light
  # the same parameter count run over a long sequence: its counted step is heavy
  assert memory.auto_chunk_size(step_flops=80 * 24e6, **kw) == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_a_sequence_model_is_counted_by_its_jaxpr():
  """A character LSTM has few parameters but runs them over every token: the plan counts its
  step from the loss's jaxpr (scan bodies times their length) and keeps it at one client."""
  from fedjax_sim.runs import planning

  model = fs.zoo.ShakespeareLSTM()
  rng = np.random.default_rng(0)
  n = 24 * 8
  pop = fs.Population.from_arrays(
      {"x": rng.integers(1, 80, (n, 80)).astype(np.int32),
       "y": rng.integers(1, 80, (n, 80)).astype(np.int32)}, np.repeat(np.arange(24), 8))
  params = model.init(jax.random.key(0), jnp.ones((1, 80), jnp.int32))["params"]
  algo = fs.algorithms.fedavg(fs.models.sequence_loss(fs.models.linen_apply(model)),
                              client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
  bsz, spec = planning.batch_spec(algo, pop)
  flops, conv = planning._step_flops(algo, params, spec, jax.random.key(0))
  by_params = 6 * sum(int(np.size(p)) for p in jax.tree.leaves(params)) * bsz
  assert not conv and flops > 20 * by_params and flops > memory.CPU_VMAP_STEP_FLOPS
  assert by_params < memory.CPU_VMAP_STEP_FLOPS  # the parameter estimate would have vmapped it
  sim = fs.Simulation(algo, pop, cohort_size=16)
  sim.init(params, jax.random.key(0))
  assert sim.chunk_size == 1


def test_an_uncountable_loss_falls_back_to_the_parameter_estimate():
  from fedjax_sim.runs import planning

  def loss(params, batch, key):  # a while loop has no static trip count
    w = jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * 2.0, c[1] + 1),
                           (params["w"], 0))[0]
    return (batch["x"] @ w).mean(), {}

  algo = fs.algorithms.fedavg(loss, client_optimizer=optax.sgd(0.1), batch_size=2,
                              local_epochs=1)
  spec = {"x": jax.ShapeDtypeStruct((2, 3), np.float32)}
  assert planning._step_flops(algo, {"w": jnp.ones(3)}, spec, jax.random.key(0)) == (None, None)
  with pytest.raises(ValueError, match="while loop"):
    fs.flops.count_flops(loss, {"w": jnp.ones(3)}, spec, jax.random.key(0))
