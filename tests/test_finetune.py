"""Federated fine-tuning (trainable=), LoRA adapters, pretrained loading and shared data."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import oracle_round, round_keys

import fedjax_sim as fs

RTOL, ATOL = 2e-5, 2e-6


def two_layer_apply(p, x):
  return jnp.tanh(x @ p["body"]["w"] + p["body"]["b"]) @ p["head"]["w"] + p["head"]["b"]


def two_layer_params(dim=5, hidden=6, classes=3, seed=1):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)  # noqa: E731
  return {"body": {"w": f(dim, hidden), "b": f(hidden)},
          "head": {"w": f(hidden, classes), "b": jnp.zeros(classes, jnp.float32)}}


HEAD = lambda path: path[0] == "head"  # noqa: E731


@pytest.fixture(scope="module")
def loss_fn():
  return fs.models.classifier_loss(two_layer_apply)


def run(algo, pop, params, rounds=2, chunk=3, cohort=7, seed=42):
  sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=chunk)
  state = sim.init(params, jax.random.key(seed))
  state, metrics = sim.run(state, rounds)
  return sim, state, metrics


def _algos(loss_fn, trainable, aggregator=None):
  kw = dict(batch_size=4, local_epochs=1, trainable=trainable)
  return {
      "fedavg": fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2),
                                     aggregator=aggregator, **kw),
      "fedadam": fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2),
                                      server_optimizer=fs.algorithms.fedadam(0.05), **kw),
      "fedprox": fs.algorithms.fedprox(loss_fn, mu=0.3, client_optimizer=optax.sgd(0.2), **kw),
      "scaffold": fs.algorithms.scaffold(loss_fn, client_learning_rate=0.2, **kw),
      "ditto": fs.algorithms.ditto(loss_fn, lam=0.5, client_optimizer=optax.sgd(0.2), **kw),
  }


@pytest.mark.parametrize("name", ["fedavg", "scaffold"] + [  # stateless and stateful here
    pytest.param(n, marks=pytest.mark.slow) for n in ("fedadam", "fedprox", "ditto")])
def test_everything_trainable_equals_no_partition_bit_for_bit(name, pop, loss_fn):
  params = two_layer_params()
  _, base, m_base = run(_algos(loss_fn, None)[name], pop, params)
  _, all_, m_all = run(_algos(loss_fn, lambda path: True)[name], pop, params)
  chex.assert_trees_all_equal(base.params, all_.params)
  chex.assert_trees_all_equal(base.client_states, all_.client_states)
  chex.assert_trees_all_equal(m_base, m_all)


# Both slow (~25 s at load): the trainable / frozen checks below stay in the default tier.
@pytest.mark.parametrize("dp", [pytest.param(None, marks=pytest.mark.slow),
                                pytest.param((0.05, 0.7), marks=pytest.mark.slow)])
def test_frozen_part_matches_oracle_that_trains_only_the_head(dp, pop, loss_fn):
  """The oracle trains a model whose frozen body is a closed-over constant: the same clip norm,
  noise draws and server step on the head alone. Frozen leaves stay bit-identical."""
  params = two_layer_params()
  agg = None if dp is None else fs.aggregators.dp_mean(*dp)
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, aggregator=agg, trainable=HEAD)
  sim = fs.Simulation(algo, pop, cohort_size=7, chunk_size=3)
  key = jax.random.key(42)
  state = sim.init(params, key)
  body = params["body"]
  head_loss = lambda h, b, k: loss_fn({"body": body, "head": h}, b, k)  # noqa: E731
  server = optax.sgd(1.0)
  o_head, o_opt = params["head"], server.init(params["head"])
  for r in range(2):
    ids = np.asarray(sim.sampler.sample(round_keys(key, r)[0], pop.num_clients).ids)
    o_head, o_opt = oracle_round(pop, o_head, o_opt, server, key, r, ids, loss_fn=head_loss,
                                 client_opt=optax.sgd(0.2), batch_size=4, epochs=1, dp=dp)
    state, _ = sim.round(state)
  chex.assert_trees_all_equal(state.params["body"], body)
  chex.assert_trees_all_close(state.params["head"], o_head, rtol=RTOL, atol=ATOL)
  # The server optimizer's state has no slot for the frozen part.
  assert all(x is None or "body" not in str(p) for p, x in
             jax.tree_util.tree_leaves_with_path(state.opt_state, is_leaf=lambda v: v is None))


@pytest.mark.slow  # (~4 s) test_frozen_part_matches_oracle_that_trains_only_the_head stays
def test_frozen_part_not_in_per_client_state_or_upload(pop, loss_fn):
  params = two_layer_params()
  _, state, _ = run(_algos(loss_fn, HEAD)["scaffold"], pop, params)
  head_shapes = [x.shape for x in jax.tree.leaves(params["head"])]
  assert [x.shape[1:] for x in jax.tree.leaves(state.client_states)] == head_shapes
  assert [x.shape for x in jax.tree.leaves(state.server_extra)] == head_shapes
  _, ditto, _ = run(_algos(loss_fn, HEAD)["ditto"], pop, params)
  assert [x.shape[1:] for x in jax.tree.leaves(ditto.client_states)] == head_shapes
  view = fs.peft.trainable_view(params, HEAD)
  assert fs.peft.upload_bits(view) == 32 * sum(int(np.prod(s)) for s in head_shapes)
  chex.assert_trees_all_equal(ditto.params["body"], params["body"])


@pytest.mark.slow  # (~2 s) the engine's chunk invariance stays in test_round / test_systems
def test_result_invariant_to_chunk_size(pop, loss_fn):
  params = two_layer_params()
  algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=0.2, batch_size=4,
                                local_epochs=1, trainable=HEAD)
  _, a, _ = run(algo, pop, params, chunk=1)
  _, b, _ = run(algo, pop, params, chunk=7)
  chex.assert_trees_all_close(a.params, b.params, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(a.client_states, b.client_states, rtol=RTOL, atol=ATOL)


# Slow (default tier budget): two DP runs; the partition checks below stay.
@pytest.mark.slow
def test_dp_accounting_does_not_depend_on_the_partition(pop, loss_fn):
  params = two_layer_params()
  eps = []
  for trainable in (None, HEAD):
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                                local_epochs=1, aggregator=fs.aggregators.dp_mean(0.1, 1.0),
                                trainable=trainable)
    sim = fs.Simulation(algo, pop, cohort_size=4)
    _, metrics = sim.run(sim.init(params, jax.random.key(0)), 10, delta=1e-5)
    eps.append(metrics["epsilon"])
  np.testing.assert_array_equal(eps[0], eps[1])


def _round_memory(vocab, trainable, chunk=8, cohort=8):
  """Temporaries of the compiled round for a frozen embedding table [vocab, 8] (a gather: the
  activations do not grow with vocab) under a trainable head."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 16, size=(160,)).astype(np.int32)
  pop = fs.Population.from_arrays({"x": tokens, "y": (tokens % 2).astype(np.int32)},
                                  np.repeat(np.arange(16), 10))

  def apply(p, x):
    return jnp.tanh(p["body"]["emb"][x]) @ p["head"]["w"]

  params = {"body": {"emb": jnp.full((vocab, 8), 0.01)}, "head": {"w": jnp.zeros((8, 2))}}
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(apply),
                              client_optimizer=optax.sgd(0.1), batch_size=5, local_steps=2,
                              trainable=trainable)
  sim = fs.Simulation(algo, pop, cohort_size=cohort, chunk_size=chunk)
  state = sim.init(params, jax.random.key(0))
  return fs.memory.round_memory(sim, state).temp_bytes, vocab * 8 * 4


@pytest.mark.slow  # a memory check compiling two rounds
def test_frozen_weights_are_not_replicated_per_client():
  """Growing the frozen part grows the compiled round's temporaries by at most its size once
  (measured: not at all), not chunk times; trained per client, it grows chunk times."""
  chunk = 8
  t_small, f_small = _round_memory(256, HEAD, chunk)
  t_big, f_big = _round_memory(8192, HEAD, chunk)
  grown = f_big - f_small
  assert t_big - t_small <= grown, (t_big - t_small, grown)
  full_small, _ = _round_memory(256, None, chunk)
  full_big, _ = _round_memory(8192, None, chunk)
  assert full_big - full_small > chunk * grown, (full_big - full_small, grown)


def test_auto_chunk_counts_frozen_params_once():
  full = fs.round.auto_chunk_size(10_000, 1_000_000, 4, 8, 2**30, "gpu")
  head = fs.round.auto_chunk_size(10_000, 1_000_000, 4, 8, 2**30, "gpu",
                                  frozen_params=990_000)
  assert head > 50 * full


# -- LoRA ------------------------------------------------------------------------------------


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    x = nn.DenseGeneral((2, 4))(x)  # an attention-projection-shaped layer
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_lora_starts_equal_and_merge_equals_adapted_outputs():
  model = fs.peft.lora(Tiny(), rank=2, alpha=4.0)
  x = jax.random.normal(jax.random.key(1), (5, 6))
  params = model.init(jax.random.key(0), x)["params"]
  assert set(params["Dense_0"]) == {"kernel", "bias", "lora_a", "lora_b"}
  assert params["DenseGeneral_0"]["lora_b"].shape == (2, 2, 4)
  base = {k: {n: v for n, v in d.items() if not n.startswith("lora")} for k, d in params.items()}
  # B = 0 at init: the adapted model is the base model.
  chex.assert_trees_all_close(model.apply({"params": params}, x),
                              Tiny().apply({"params": base}, x))
  assert float(jnp.abs(params["Dense_0"]["lora_a"]).sum()) > 0
  trained = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 * jnp.ones_like(v) if "lora_b" in str(p) else v, params)
  adapted = model.apply({"params": trained}, x)
  merged = model.merge(trained)
  chex.assert_trees_all_close(Tiny().apply({"params": merged}, x), adapted, rtol=1e-5,
                              atol=1e-5)
  assert not jnp.allclose(adapted, model.apply({"params": params}, x))
  # Hand check of one layer: W + (alpha / r) A B.
  d0 = trained["Dense_0"]
  want = d0["kernel"] + 2.0 * d0["lora_a"] @ d0["lora_b"]
  chex.assert_trees_all_close(merged["Dense_0"]["kernel"], want, rtol=1e-6)


# Slow (default tier budget): three LoRA/FFA runs;
# test_lora_starts_equal_and_merge_equals_adapted_outputs stays.
@pytest.mark.slow
def test_lora_trainable_and_ffa_train_only_the_adapters():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  pop = fs.Population.from_arrays({"x": x, "y": (x[:, 0] > 0).astype(np.int32)},
                                  np.repeat(np.arange(12), 10))
  model = fs.peft.lora(fs.zoo.MLP(2, (8,)), rank=2)
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = fs.models.classifier_loss(fs.models.linen_apply(model))
  for freeze_a in (False, True):
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.5), batch_size=5,
                                local_epochs=1,
                                aggregator=fs.aggregators.dp_mean(0.5, 0.1),
                                trainable=fs.peft.lora_trainable(freeze_a=freeze_a))
    _, state, _ = run(algo, pop, params, rounds=2, cohort=4, chunk=2)
    for layer in ("Dense_0", "Dense_1"):
      for name in ("kernel", "bias") + (("lora_a",) if freeze_a else ()):
        chex.assert_trees_all_equal(state.params[layer][name], params[layer][name])
      assert not jnp.array_equal(state.params[layer]["lora_b"], params[layer]["lora_b"])


def test_load_pretrained_from_msgpack_file(tmp_path):
  from flax import serialization

  x = jnp.ones((2, 6))
  pretrained = Tiny().init(jax.random.key(7), x)["params"]
  path = tmp_path / "weights.msgpack"
  path.write_bytes(serialization.msgpack_serialize(jax.device_get(pretrained)))
  model = fs.peft.lora(Tiny(), rank=2)
  init = model.init(jax.random.key(0), x)["params"]
  loaded = fs.peft.load_pretrained(init, str(path))
  for layer, d in pretrained.items():
    chex.assert_trees_all_equal(loaded[layer]["kernel"], d["kernel"])
    chex.assert_trees_all_equal(loaded[layer]["lora_a"], init[layer]["lora_a"])
  chex.assert_trees_all_close(model.apply({"params": loaded}, x),
                              Tiny().apply({"params": pretrained}, x))
  with pytest.raises(ValueError, match="shape"):
    fs.peft.load_pretrained(init, {"Dense_0": {"kernel": jnp.ones((3, 3))}}, strict=False)
  with pytest.raises(ValueError, match="lack"):
    fs.peft.load_pretrained(init, {"Dense_0": pretrained["Dense_0"]})
  with pytest.raises(ValueError, match="no counterpart"):
    fs.peft.load_pretrained(init, {"Conv_9": {"kernel": jnp.ones(3)}}, strict=False)


def test_load_pretrained_safetensors(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  pretrained = Tiny().init(jax.random.key(7), jnp.ones((1, 6)))["params"]
  flat = {f"{layer}.{name}": np.asarray(v) for layer, d in pretrained.items()
          for name, v in d.items()}
  path = tmp_path / "w.safetensors"
  st.save_file(flat, str(path))
  init = fs.peft.lora(Tiny(), rank=2).init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  loaded = fs.peft.load_pretrained(init, str(path))
  chex.assert_trees_all_equal(loaded["Dense_1"]["kernel"], pretrained["Dense_1"]["kernel"])


# -- shared data -------------------------------------------------------------------------------


def _sum_loss(p, batch, key):
  del key
  return fs.models.masked_mean(batch["x"][:, 0] * p["w"][0], batch[fs.MASK_KEY]), {}


def test_shared_data_mixes_the_fraction_into_every_batch():
  """Own examples have x = 0 and shared ones x = 1: every step's gradient is exactly the
  shared fraction of the batch, so after S steps of SGD(lr) w = -lr * S * m / B."""
  own = {"x": np.zeros((40, 1), np.float32), "y": np.zeros(40, np.int32)}
  pop = fs.Population.from_arrays(own, np.repeat(np.arange(4), 10))
  shared = {"x": np.ones((5, 1), np.float32), "y": np.ones(5, np.int32)}
  algo = fs.algorithms.fedavg(_sum_loss, client_optimizer=optax.sgd(1.0), batch_size=4,
                              local_steps=3, shared_data=shared, shared_fraction=0.5)
  sim = fs.Simulation(algo, pop, cohort_size=4)
  state = sim.init({"w": jnp.zeros(1)}, jax.random.key(0))
  state, _ = sim.round(state)
  np.testing.assert_allclose(np.asarray(state.params["w"]), [-3 * 2 / 4], rtol=1e-6)


@pytest.mark.slow  # (~4 s) test_shared_data_mixes_the_fraction_into_every_batch stays
def test_shared_data_draws_with_client_key_in_jit():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 3)).astype(np.float32)
  pop = fs.Population.from_arrays({"x": x, "y": (x[:, 0] > 0).astype(np.int32)},
                                  np.repeat(np.arange(6), 10))
  shared = {"x": rng.normal(size=(9, 3)).astype(np.float32), "y": np.arange(9) % 2}
  loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"])
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.3), batch_size=4,
                              local_epochs=1, shared_data=shared, shared_fraction=0.25)
  outs = []
  for chunk in (1, 3):
    sim = fs.Simulation(algo, pop, cohort_size=6, chunk_size=chunk)
    state, _ = sim.run(sim.init({"w": jnp.zeros((3, 2))}, jax.random.key(3)), 2)
    outs.append(state.params)
  chex.assert_trees_all_close(outs[0], outs[1], rtol=RTOL, atol=ATOL)
  plain = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.3), batch_size=4,
                               local_epochs=1)
  sim = fs.Simulation(plain, pop, cohort_size=6)
  state, _ = sim.run(sim.init({"w": jnp.zeros((3, 2))}, jax.random.key(3)), 2)
  assert not np.allclose(np.asarray(state.params["w"]), np.asarray(outs[0]["w"]))


# -- bad input ---------------------------------------------------------------------------------


def test_bad_trainable_specs_raise_before_compiling(pop, loss_fn):
  params = two_layer_params()

  def init(trainable):
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                                local_epochs=1, trainable=trainable)
    sim = fs.Simulation(algo, pop, cohort_size=3)
    sim.init(params, jax.random.key(0))
    return sim

  with pytest.raises(ValueError, match="selects no parameter"):
    init(lambda path: False)
  with pytest.raises(ValueError, match="selects no parameter"):
    init(jax.tree.map(lambda _: False, params))
  with pytest.raises(ValueError, match="label function's output does not match"):
    init(lambda p: {"body": "frozen", "head": {"w": "trainable"}})
  with pytest.raises(ValueError, match="params' structure"):
    init({"head": True})
  with pytest.raises(ValueError, match="'trainable' / 'frozen'"):
    init(lambda p: jax.tree.map(lambda _: "train", p))
  with pytest.raises(ValueError, match="ambiguous"):
    fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                         local_epochs=1, trainable=True)
  # Label functions (optax style) work.
  sim = init(lambda p: {"body": jax.tree.map(lambda _: "frozen", p["body"]),
                        "head": jax.tree.map(lambda _: "trainable", p["head"])})
  assert sim.plan.trainable_mask == (False, False, True, True)
  for factory in (fs.algorithms.feddyn, fs.algorithms.fednova, fs.algorithms.qffl):
    kw = dict(alpha=0.1) if factory is fs.algorithms.feddyn else dict(client_learning_rate=0.1)
    if factory is fs.algorithms.feddyn:
      kw["client_optimizer"] = optax.sgd(0.1)
      del kw["alpha"]
      kw["alpha"] = 0.1
    if factory is fs.algorithms.qffl:
      kw["q"] = 1.0
    with pytest.raises(ValueError, match="does not support trainable"):
      factory(loss_fn, batch_size=4, local_epochs=1, trainable=HEAD, **kw)


def test_bad_lora_and_shared_data_raise_clearly(pop, loss_fn):
  for rank in (0, -1, 2.5):
    with pytest.raises(ValueError, match="rank must be a positive int"):
      fs.peft.lora(Tiny(), rank=rank)
  with pytest.raises(ValueError, match="exceeds the layer"):
    fs.peft.lora(Tiny(), rank=7).init(jax.random.key(0), jnp.ones((1, 6)))
  kw = dict(client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
  shared = {"x": np.zeros((3, 5), np.float32), "y": np.zeros(3, np.int32)}
  for fraction in (-0.1, 1.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"shared_fraction must lie in \[0, 1\)"):
      fs.algorithms.fedavg(loss_fn, shared_data=shared, shared_fraction=fraction, **kw)
  fs.algorithms.fedavg(loss_fn, shared_data=shared, shared_fraction=np.float32(0.25), **kw)
  for alpha in (float("inf"), 0.0, -1.0):  # an inf scale would make every output NaN
    with pytest.raises(ValueError, match="lora: alpha"):
      fs.peft.lora(Tiny(), rank=2, alpha=alpha)
  with pytest.raises(ValueError, match="needs shared_data"):
    fs.algorithms.fedavg(loss_fn, shared_fraction=0.5, **kw)
  for bad, match in (({"x": shared["x"]}, "features"),
                     ({"x": np.zeros((3, 4), np.float32), "y": shared["y"]}, "shape"),
                     ({"x": shared["x"], "y": shared["y"].astype(np.float32)}, "dtype")):
    algo = fs.algorithms.fedavg(loss_fn, shared_data=bad, shared_fraction=0.5, **kw)
    sim = fs.Simulation(algo, pop, cohort_size=3)
    with pytest.raises(ValueError, match=match):  # at init, before anything is compiled
      sim.init(two_layer_params(), jax.random.key(0))


def test_nnx_lora_linear_trains_only_its_adapters():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.LoRALinear(6, 8, lora_rank=2, rngs=rngs)
      self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  apply_fn, params = fs.models.nnx_apply(Model(nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 6)).astype(np.float32)
  pop = fs.Population.from_arrays({"x": x, "y": (x[:, 0] > 0).astype(np.int32)},
                                  np.repeat(np.arange(6), 10))
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(apply_fn),
                              client_optimizer=optax.sgd(0.5), batch_size=5, local_epochs=1,
                              trainable=fs.peft.lora_trainable())
  _, state, _ = run(algo, pop, params, rounds=2, cohort=3, chunk=3)
  before = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    changed = not np.array_equal(np.asarray(leaf), np.asarray(before[path]))
    assert changed == ("lora_" in jax.tree_util.keystr(path)), path


def test_checkpoint_round_trip_with_a_frozen_part(tmp_path, loss_fn, pop):
  params = two_layer_params()
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.adam(0.01), batch_size=5, local_epochs=1,
                              trainable=HEAD)
  sim = fs.Simulation(algo, pop, cohort_size=3)
  state, _ = sim.run(sim.init(params, jax.random.key(0)), 2, checkpoint_dir=str(tmp_path))
  restored = sim.restore(str(tmp_path), params)
  chex.assert_trees_all_equal(restored.params, state.params)
  chex.assert_trees_all_equal(restored.opt_state, state.opt_state)


@pytest.mark.parametrize("make_agg,keeps_state", [
    (lambda: fs.aggregators.process(per_client=fs.aggregators.top_k(fraction=0.5)), True),
    (lambda: fs.aggregators.secure_mean(), False)])
def test_compression_and_secure_aggregation_see_only_the_trainable_part(make_agg, keeps_state,
                                                                         pop, loss_fn):
  params = two_layer_params()
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=1, aggregator=make_agg(), trainable=HEAD)
  sim, state, metrics = run(algo, pop, params)
  chex.assert_trees_all_equal(state.params["body"], params["body"])
  assert not np.array_equal(np.asarray(state.params["head"]["w"]), params["head"]["w"])
  head_shapes = [x.shape for x in jax.tree.leaves(params["head"])]
  # top-k error feedback keeps a residual per client: for the head only.
  want = head_shapes if keeps_state else []
  assert [x.shape[1:] for x in jax.tree.leaves(state.agg_client_states)] == want
  assert [x.shape for x in jax.tree.leaves(sim.context.params_template)] == head_shapes


def test_a_broken_label_function_names_both_failures(pop, loss_fn):
  def labels(p):
    return p["nonexistent"]  # a bug in the user's label function

  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1, trainable=labels)
  sim = fs.Simulation(algo, pop, cohort_size=3)
  with pytest.raises(ValueError, match=r"label function fn\(params\) it raised KeyError"):
    sim.init({"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}, jax.random.key(0))
