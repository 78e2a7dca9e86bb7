"""Asynchronous FedBuff (fedjax_sim.asynchronous): equivalences, a Python event-loop oracle,
chunk-size invariance, bad input and checkpoints."""

import heapq
import json
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import asynchronous as fa
from fedjax_sim import core
from fedjax_sim.client import ClientData
from fedjax_sim.types import DURATION_SALT

N = 12


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(150, 3)).astype(np.float32)
  y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, N, 150))
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
                              client_optimizer=optax.sgd(0.3), batch_size=4, local_steps=2)
  params = jnp.asarray(rng.normal(size=(3, 2)).astype(np.float32) * 0.1)
  return pop, algo, params


def _sync(algo, pop, params, key, cohort, rounds):
  plan = core.plan_for(algo, fs.sampling.uniform(cohort), pop, params, chunk_size=cohort)
  state = core.initial_state(plan, params, key)
  step = jax.jit(lambda s, p: core.round_step(plan, s, p))
  for _ in range(rounds):
    state, _ = step(state, pop)
  return state.params


@pytest.mark.parametrize("c", [4, 1])
def test_equal_durations_concurrency_equals_buffer_is_sync_fedavg_bit_for_bit(setup, c):
  """C = K, equal durations, no staleness: synchronous FedAvg (same keys), bit for bit; C = K
  = 1 is sequential FedAvg, one client at a time."""
  pop, algo, params = setup
  key = jax.random.key(3)
  sim = fs.AsyncSimulation(algo, pop, concurrency=c, buffer_size=c, max_staleness=0)
  state = sim.init(params, key)
  state, m = sim.run(state, 3)
  chex.assert_trees_all_equal(state.server.params, _sync(algo, pop, params, key, c, 3))
  np.testing.assert_array_equal(m["virtual_time"], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(m["staleness_max"], 0)
  np.testing.assert_array_equal(m["clients"], c)


def _oracle(algo, pop, params, key, seconds, jitter, c, k, max_s, weight, steps):
  """FedBuff one client at a time: a heap of finish times, every model version kept."""
  words = [int(w) for w in np.asarray(jax.random.key_data(key)).ravel()]
  n = pop.num_clients
  update = jax.jit(algo.client_update)
  versions, version, heap, seq = {0: params}, 0, [], 0
  in_flight, launched = set(), {}
  sizes = np.asarray(pop.num_examples)

  def launch(m, t):
    nonlocal seq
    scores = fa.version_scores(key, version, n)
    dur = seconds * (np.random.default_rng([*words, DURATION_SALT, version]).lognormal(
        0.0, jitter, n) if jitter else 1.0)
    done = launched.setdefault(version, set())
    eligible = sorted((i for i in range(n) if i not in in_flight and i not in done),
                      key=lambda i: (-scores[i], i))
    for i in eligible[:m]:
      heapq.heappush(heap, (t + dur[i], seq, i, version))
      seq += 1
      in_flight.add(i)
      done.add(i)

  launch(c, 0.0)
  buffer, times, stale_seen = [], [], []
  while version < steps:
    t = heap[0][0]
    finished = 0
    while heap and heap[0][0] == t:
      _, _, cid, v = heapq.heappop(heap)
      in_flight.discard(cid)
      finished += 1
      if version - v > max_s:
        continue
      buffer.append((cid, v))
      if len(buffer) == k:
        num, den = jnp.zeros_like(params), 0.0
        for cid_, v_ in buffer:
          s = version - v_
          stale_seen.append(s)
          data = ClientData(pop.features, pop.offsets[cid_], pop.num_examples[cid_],
                            pop.max_examples, jnp.float32(1.0), jnp.int32(2**30))
          out = update(versions[v_], data, (),
                       jax.random.fold_in(core.round_keys(key, v_).client, cid_))
          num = num + float(weight(np.float64(s))) * sizes[cid_] * out.delta
          den += float(sizes[cid_])
        version += 1
        versions[version] = versions[version - 1] - num / den  # server sgd(1.0)
        buffer = []
        times.append(t)
    launch(finished, t)
  return versions[steps], np.asarray(times), stale_seen


def test_matches_python_event_loop_oracle_with_staleness_weights(setup):
  pop, algo, params = setup
  rng = np.random.default_rng(1)
  speed = rng.lognormal(0.0, 1.0, N)
  timing = fa.Timing(steps_per_second=speed, local_steps=2, comm_seconds=0.5, jitter=0.3)
  weight = fa.polynomial(0.5)
  key = jax.random.key(7)
  sim = fs.AsyncSimulation(algo, pop, concurrency=6, buffer_size=2, timing=timing,
                           staleness=weight, max_staleness=3, chunk_size=2, block_size=4)
  state = sim.init(params, key)
  state, m = sim.run(state, 10)
  want, times, stale = _oracle(algo, pop, params, key, timing.seconds(N), 0.3, 6, 2, 3,
                               weight, 10)
  np.testing.assert_allclose(m["virtual_time"], times)
  assert max(stale) > 0  # the test exercises staleness weights
  np.testing.assert_allclose(np.asarray(state.server.params), np.asarray(want),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_results_do_not_depend_on_chunk_size(setup):
  pop, algo, params = setup
  timing = fa.Timing(steps_per_second=np.random.default_rng(2).lognormal(0, 1, N))
  out = []
  for chunk in (1, 2, 4):
    sim = fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=4, timing=timing,
                             staleness=fa.hinge(1.0, 1.0), max_staleness=5, chunk_size=chunk)
    state, _ = sim.run(sim.init(params, jax.random.key(0)), 6)
    out.append(np.asarray(state.server.params))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[0], out[2], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_resumes_bit_identically_with_clients_in_flight(setup, tmp_path):
  pop, algo, params = setup
  timing = fa.Timing(steps_per_second=np.random.default_rng(4).lognormal(0, 1, N), jitter=0.2)
  make = lambda **kw: fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=3, timing=timing,
                                         staleness=fa.polynomial(0.5), max_staleness=4,
                                         block_size=3, **kw)
  key = jax.random.key(5)
  sim = make()
  state, full = sim.run(sim.init(params, key), 8)
  sim2 = make()
  half, _ = sim2.run(sim2.init(params, key), 5, log_dir=str(tmp_path / "log"))
  sim2.save(half, str(tmp_path))
  sim3 = make()  # a fresh process's view: the clock is replayed, not restarted
  resumed = sim3.restore(str(tmp_path), params, jax.random.key(0))
  assert int(resumed.server.round) == 5
  resumed, rest = sim3.run(resumed, 3, log_dir=str(tmp_path / "log"))
  log = fs.checkpoint.read_log(str(tmp_path / "log"))
  np.testing.assert_array_equal(log["round"], np.arange(1, 9))
  np.testing.assert_allclose(log["virtual_time"], full["virtual_time"])
  assert "staleness_hist_0" in log
  chex.assert_trees_all_equal(resumed.server.params, state.server.params)
  np.testing.assert_array_equal(rest["virtual_time"], full["virtual_time"][5:])
  other = fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=3, timing=timing,
                             max_staleness=4)
  with pytest.raises(ValueError, match="staleness"):
    other.restore(str(tmp_path), params, key)


def test_checkpoint_and_log_of_other_prng_settings_are_refused_naming_the_fix(setup, tmp_path,
                                                                              partitionable):
  """jax_threefry_partitionable changes every draw (durations, cohorts) without changing the
  program: a checkpoint or log of the other setting is another run."""
  pop, algo, params = setup
  make = lambda: fs.AsyncSimulation(algo, pop, concurrency=4, buffer_size=2, block_size=2)
  d, log, key = str(tmp_path / "ck"), str(tmp_path / "log"), jax.random.key(3)
  partitionable(True)
  sim = make()
  state, _ = sim.run(sim.init(params, key), 2, log_dir=log)
  sim.save(state, d)
  partitionable(False)
  fix = re.escape("jax_threefry_partitionable=True (now False)") + ".*" + re.escape(
      "jax.config.update('jax_threefry_partitionable', True)")
  with pytest.raises(ValueError, match="comes from another run.*" + fix):
    make().restore(d, params, key)
  with pytest.raises(ValueError, match="holds the log of another run.*" + fix):
    other = make()
    other.run(other.init(params, key), 2, log_dir=log)
  partitionable(True)  # the saved setting: it resumes (with a key of the saved implementation)
  with pytest.raises(ValueError, match=r"a threefry2x32 run key; key is a rbg key.*"
                                       r"jax.random.key\(0, impl='threefry2x32'\)"):
    make().restore(d, params, jax.random.key(0, impl="rbg"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    resumed = make().restore(d, params, key)
  chex.assert_trees_all_equal(resumed.server.params, state.server.params)


def test_checkpoint_and_log_without_the_prng_field_resume_with_a_warning(setup, tmp_path):
  pop, algo, params = setup
  make = lambda: fs.AsyncSimulation(algo, pop, concurrency=4, buffer_size=2, block_size=2)
  d, log, key = str(tmp_path / "ck"), str(tmp_path / "log"), jax.random.key(3)
  old = make()
  fingerprint = old.fingerprint
  old.fingerprint = lambda: {k: v for k, v in fingerprint().items() if k not in ("prng", "x64")}
  state, _ = old.run(old.init(params, key), 2, log_dir=log)
  old.save(state, d)
  sim = make()
  with pytest.warns(UserWarning, match=r"older version without the JAX settings \['prng', 'x64'\]"):
    resumed = sim.restore(d, params, key)
  chex.assert_trees_all_equal(resumed.server.params, state.server.params)
  with pytest.warns(UserWarning, match=r"log in .* older version without the JAX settings"):
    sim.run(resumed, 2, log_dir=log)
  np.testing.assert_array_equal(fs.checkpoint.read_log(log)["round"], np.arange(1, 5))


def test_bad_input_is_refused_before_compiling(setup):
  pop, algo, params = setup
  make = lambda **kw: fs.AsyncSimulation(algo, pop, **{"concurrency": 4, "buffer_size": 2, **kw})
  with pytest.raises(ValueError, match="buffer_size=5 exceeds concurrency=4"):
    make(buffer_size=5)
  with pytest.raises(ValueError, match="concurrency=13 exceeds the population"):
    make(concurrency=13)
  with pytest.raises(ValueError, match="max_staleness"):
    make(max_staleness=-1)
  with pytest.raises(ValueError, match="weights must be finite and >= 0"):
    make(staleness=lambda s: 1.0 - s)
  with pytest.raises(ValueError, match="steps_per_second"):
    make(timing=fa.Timing(steps_per_second=np.r_[np.ones(N - 1), np.nan]))
  with pytest.raises(ValueError, match="comm_seconds"):
    make(timing=fa.Timing(steps_per_second=1.0, comm_seconds=-1.0))
  with pytest.raises(ValueError, match="local_steps has shape"):
    make(timing=fa.Timing(steps_per_second=1.0, local_steps=np.ones(N + 1)))
  with pytest.raises(ValueError, match="client ids must match the population"):
    make(timing=fa.Timing(1.0, availability=fa.Availability([0, 1], [0, 0], [1, 1], N + 3)))
  with pytest.raises(ValueError, match="client ids must match"):
    fa.Availability([0, N], [0, 0], [1, 1], N)
  with pytest.raises(ValueError, match="no accountant"):
    make(delta=1e-5)
  # Fewer clients available at time 0 than the concurrency: refused at init, before compiling.
  few = fa.Availability(np.arange(3), np.zeros(3), np.full(3, 10.0), N)
  sim = make(timing=fa.Timing(1.0, availability=few))
  with pytest.raises(ValueError, match="only 3 clients are available"):
    sim.init(params, jax.random.key(0))


def test_scheduler_availability_and_histogram():
  """Host clock alone: clients start only when available, in-flight never exceeds C."""
  n = 10
  avail = fa.Availability(np.r_[np.arange(n), np.arange(5)], np.r_[np.zeros(n), np.full(5, 5.0)],
                          np.r_[np.full(n, 2.5), np.full(5, 100.0)], n)
  sched = fa.Scheduler(jax.random.key(0), np.linspace(1.0, 2.0, n), concurrency=4,
                       buffer_size=2, max_staleness=10, staleness=fa.constant(),
                       availability=avail, retry_seconds=0.5)
  s = sched.next_steps(12)
  assert (s.in_flight <= 4).all()
  late = s.time > 5.0 + 2.0  # clients that started after t = 5 are among the 5 available
  assert set(s.ids[late].ravel()) <= set(range(5))
  assert np.all(np.diff(s.time) >= 0)
  assert fa.staleness_bins(5) == ["0", "1", "2-3", "4-5"]
  h = fa._histogram(np.array([[0, 1, 2, 3, 4, 5]]), 5)
  np.testing.assert_array_equal(h, [[1, 1, 2, 2]])
  np.testing.assert_allclose(fa.hinge(1.0, 2.0)(np.arange(5)), [1, 1, 1, 0.5, 1 / 3])
  np.testing.assert_allclose(fa.polynomial(1.0)(np.arange(3)), [1, 0.5, 1 / 3])
  ended = fa.Availability(np.arange(n), np.zeros(n), np.full(n, 1.5), n)  # no period
  sched = fa.Scheduler(jax.random.key(0), np.ones(n), concurrency=4, buffer_size=4,
                       max_staleness=1, staleness=fa.constant(), availability=ended)
  with pytest.raises(RuntimeError, match="no client can ever start again"):
    sched.next_steps(5)


def test_fedscale_traces_written_in_its_pickle_format(tmp_path):
  import pickle

  n = 4
  cap = {k + 1: {"computation": 10.0 * (k + 1), "communication": 1000.0} for k in range(n)}
  behave = {k + 1: {"active": [0.0, 50.0], "inactive": [10.0 * (k + 1), 60.0],
                    "finish_time": 100.0, "duration": 100.0} for k in range(n)}
  for name, table in (("client_device_capacity", cap), ("client_behave_trace", behave)):
    with open(tmp_path / name, "wb") as f:
      pickle.dump(table, f)
  c = fs.systems.load_fedscale_capacity(str(tmp_path / "client_device_capacity"), n)
  np.testing.assert_allclose(c["ms_per_sample"], [10, 20, 30, 40])
  timing = fs.asynchronous.fedscale_timing(c, batch_size=5, local_steps=2, model_kbits=500.0)
  # FedScale: 3 * batch * steps * ms / 1000 s compute + (up + down) / kbps communication.
  np.testing.assert_allclose(timing.seconds(n), 3 * 5 * 2 * np.array([10, 20, 30, 40]) / 1000
                             + 1000.0 / 1000.0)
  avail = fs.asynchronous.load_fedscale_behavior(str(tmp_path / "client_behave_trace"), n)
  np.testing.assert_array_equal(avail.active(15.0), [False, True, True, True])
  np.testing.assert_array_equal(avail.active(115.0), [False, True, True, True])  # periodic
  np.testing.assert_array_equal(avail.active(55.0), [True] * 4)
  np.testing.assert_array_equal(avail.active(45.0), [False] * 4)
  with pytest.raises(ValueError, match="trace's client ids must match the population"):
    fs.asynchronous.load_fedscale_behavior(str(tmp_path / "client_behave_trace"), n + 1)
  with pytest.raises(ValueError, match="not in the"):
    fs.systems.load_fedscale_capacity(str(tmp_path / "client_device_capacity"), 2,
                                      client_ids=[1, 9])


@pytest.mark.slow
def test_async_vs_sync_example_runs_tiny(run_with_package):
  out = run_with_package("async_vs_sync", "--clients", "30", "--cohort", "4", "--local-steps",
                         "2", "--horizon", "40", "--seeds", "1", "--eval-every", "4")
  assert "FedBuff (async)" in out and "sync FedAvg + deadline" in out


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["dp_mean", "median"])
def test_aggregator_pipeline_runs_per_buffer(setup, aggregator):
  """DP noise and a robust (stacked) rule run per buffer: equal to the synchronous round with the
  same aggregator (same noise keys) when C = K with equal durations (to 1 ulp: XLA fuses the
  clip differently inside the async step); with stale, weighted updates the run stays finite
  and reports no epsilon."""
  pop, _, params = setup
  agg = (fs.aggregators.dp_mean(0.5, 0.3) if aggregator == "dp_mean"
         else fs.aggregators.median())
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
                              client_optimizer=optax.sgd(0.3), batch_size=4, local_steps=2,
                              aggregator=agg)
  key = jax.random.key(11)
  sim = fs.AsyncSimulation(algo, pop, concurrency=4, buffer_size=4, max_staleness=0)
  state, _ = sim.run(sim.init(params, key), 3)
  chex.assert_trees_all_close(state.server.params, _sync(algo, pop, params, key, 4, 3),
                              rtol=1e-6, atol=1e-7)
  timing = fa.Timing(steps_per_second=np.random.default_rng(3).lognormal(0, 1, N))
  sim = fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=4, timing=timing,
                           staleness=fa.polynomial(0.5), max_staleness=4)
  state, m = sim.run(sim.init(params, key), 6)
  assert np.isfinite(np.asarray(state.server.params)).all()
  assert "epsilon" not in m and m["staleness_max"].max() > 0


def test_scheduler_fast_path_equals_the_population_pass():
  """Without availability, starts come from a heap of free clients; with an always-on trace,
  from a pass over the population: the same rule, the same schedule."""
  n = 30
  sec = np.random.default_rng(2).lognormal(0.0, 1.0, n)
  kw = dict(concurrency=12, buffer_size=3, max_staleness=4, staleness=fa.polynomial(0.5),
            jitter=0.3)
  always = fa.Availability(np.arange(n), np.zeros(n), np.full(n, 1e9), n)
  a = fa.Scheduler(jax.random.key(7), sec, **kw).next_steps(40)
  b = fa.Scheduler(jax.random.key(7), sec, availability=always, **kw).next_steps(40)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


def _resolved_chunk(algo, pop, params, buffer_size, max_staleness):
  """The oracle: fs.Simulation's automatic rule (fs.memory.chunk_size_for) for a cohort of K,
  with the device budget after the population, the server state and the ring."""
  from fedjax_sim.runs import planning

  sampler = fs.sampling.uniform(buffer_size)
  plan = core.plan_for(algo, sampler, pop, params)
  server = jax.eval_shape(lambda p: core.initial_state(plan, p, jax.random.key(0)), params)
  ring = (max_staleness + 1) * fs.memory.tree_bytes(params) if max_staleness else 0
  budget = fs.memory.device_memory_budget(fs.memory.resident_bytes(pop, server) + ring)
  bsz, spec = planning.batch_spec(algo, pop)
  steps = None  # on CPU a light model's chunk is weighed against one cohort's padding
  if jax.default_backend() == "cpu":
    steps = fs.autotune.cohort_steps(np.asarray(pop.num_examples), buffer_size, bsz)
  return fs.memory.chunk_size_for(buffer_size, params, None, spec, bsz, budget, steps=steps)


def test_default_chunk_is_simulations_automatic_rule(setup):
  """chunk_size=None resolves as fs.Simulation's does: a convolutional model gets chunk 1 on
  CPU (where a vmapped chunk of it is slower), the small linear model the whole buffer; an int
  above K is capped at K."""
  pop, algo, params = setup
  rng = np.random.default_rng(0)
  images = fs.Population.from_arrays(
      {"x": rng.random((36, 28, 28, 1), np.float32), "y": rng.integers(0, 62, 36)},
      np.repeat(np.arange(N), 3))
  model = fs.zoo.EmnistCNN()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  cnn = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(model)),
                             client_optimizer=optax.sgd(0.1), batch_size=4, local_steps=1)
  cnn_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  for a, p, x in ((algo, pop, params), (cnn, images, cnn_params)):
    sim = fs.AsyncSimulation(a, p, concurrency=8, buffer_size=6, max_staleness=3)
    assert sim.chunk_size is None  # fixed by init, once the model is known
    sim.init(x, jax.random.key(0))
    assert sim.chunk_size == _resolved_chunk(a, p, x, 6, 3)
  if jax.default_backend() == "cpu":
    assert sim.chunk_size == 1  # the CNN
  sim = fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=4, chunk_size=10)
  assert sim.chunk_size == 4
  sim.init(params, jax.random.key(0))
  assert sim.chunk_size == 4


def test_measured_chunk_is_recorded_and_changes_no_result(setup, tmp_path):
  """chunk_size="auto" (here two candidates) times one server step per candidate at init; the
  choice and its times go to config.json like fs.Simulation's, and the run equals the runs at
  fixed chunks (the default included) to float tolerance."""
  pop, algo, params = setup
  timing = fa.Timing(steps_per_second=np.random.default_rng(2).lognormal(0, 1, N))
  make = lambda chunk: fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=4, timing=timing,  # noqa: E731
                                          staleness=fa.polynomial(0.5), max_staleness=4,
                                          chunk_size=chunk)
  sim = make(fs.autotune.AutoChunk(candidates=[1, 4], cache_dir="off", timed_calls=1))
  state = sim.init(params, jax.random.key(0))
  tuning = sim.plan.performance.tuning
  assert sorted(tuning.candidates) == [1, 4] and sim.chunk_size == tuning.choice
  assert all(s is not None and s > 0 for s in tuning.seconds)
  state, _ = sim.run(state, 4, log_dir=str(tmp_path))
  with open(tmp_path / "config.json") as f:
    session = json.load(f)["sessions"][-1]
  assert session["chunk_size"] == sim.chunk_size
  assert session["chunk_tuning"]["choice"] == tuning.choice
  assert sorted(session["chunk_tuning"]["candidates"]) == [1, 4]
  for chunk in (1, 4, None):
    other = make(chunk)
    s, _ = other.run(other.init(params, jax.random.key(0)), 4)
    np.testing.assert_allclose(np.asarray(s.server.params), np.asarray(state.server.params),
                               rtol=1e-5, atol=1e-6)
  fixed = make(2)
  fixed.run(fixed.init(params, jax.random.key(0)), 1, log_dir=str(tmp_path / "fixed"))
  with open(tmp_path / "fixed" / "config.json") as f:
    session = json.load(f)["sessions"][-1]
  assert session["chunk_size"] == 2 and "chunk_tuning" not in session


@pytest.mark.parametrize("chunk,match", [
    (0, "chunk_size must be a positive int"), (-2, "chunk_size must be a positive int"),
    (True, "chunk_size must be a positive int"), (2.0, "chunk_size must be a positive int"),
    ({"size": 2}, "chunk_size must be a positive int"),
    ("fast", "chunk_size must be a positive int"), ([], "chunk_size: the candidate list"),
    ([0, 2], "chunk_size: candidates must be positive ints"),
    ([1, 5], "chunk_size: candidate 5 exceeds the buffer size 4"),
])
def test_bad_chunk_size_is_refused_at_construction(setup, chunk, match):
  pop, algo, _ = setup
  with pytest.raises(ValueError, match=match):
    fs.AsyncSimulation(algo, pop, concurrency=8, buffer_size=4, chunk_size=chunk)
