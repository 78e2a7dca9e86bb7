"""``Simulation(chunk_size="auto")``: a measured chunk that is speed only (same run id, same
results within float tolerance as a fixed chunk), recorded in config.json, cached on disk, and
refused before compiling when the request is bad."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import autotune


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 3)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 12, 120))
  loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.5), batch_size=8,
                              local_epochs=1)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  return algo, pop, params


# slow tier: times 2 candidates and 2 runs (~5 s); the cache, candidates and refusal tests stay
@pytest.mark.slow
def test_measured_chunk_is_speed_only_and_recorded_in_config(setup, tmp_path):
  algo, pop, params = setup
  # budget ~0: the first candidate is timed, the second skipped (recorded as None). Candidates
  # are timed nearest-first around the model's own chunk (chunk_size=None).
  request = autotune.AutoChunk(candidates=[1, 3], budget_s=1e-9, cache_dir=str(tmp_path / "c"))
  auto = fs.Simulation(algo, pop, cohort_size=4, chunk_size=request)
  sa = auto.init(params, jax.random.key(1))
  model = fs.Simulation(algo, pop, cohort_size=4)
  model.init(params, jax.random.key(1))
  first, other = auto.plan.performance.tuning.candidates
  assert sorted((first, other)) == [1, 3]
  assert abs(np.log2(first / model.chunk_size)) <= abs(np.log2(other / model.chunk_size))
  fixed = fs.Simulation(algo, pop, cohort_size=4, chunk_size=other)
  sf = fixed.init(params, jax.random.key(1))
  assert auto.chunk_size == first and fixed.chunk_size == other
  assert auto.fingerprint(sa)["run_id"] == fixed.fingerprint(sf)["run_id"]
  sa, ma = auto.run(sa, 2, log_dir=str(tmp_path / "log"))
  sf, mf = fixed.run(sf, 2)
  chex.assert_trees_all_close(sa.params, sf.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ma["loss"], mf["loss"], rtol=1e-5)
  session = json.loads((tmp_path / "log" / "config.json").read_text())["sessions"][-1]
  t = session["chunk_tuning"]
  assert session["chunk_size"] == first and t["choice"] == first
  assert t["candidates"] == [first, other]
  assert t["seconds"][0] > 0 and t["compile_seconds"][0] > 0 and t["seconds"][1] is None
  assert t["padding"][t["candidates"].index(1)] == 1.0
  assert t["padding"][t["candidates"].index(3)] >= 1.0 and not t["from_cache"]
  assert t["key"].endswith(f"jax{jax.__version__}")


def test_choice_is_cached_on_disk_and_the_cache_can_be_off(setup, tmp_path, monkeypatch):
  algo, pop, params = setup
  monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
  request = lambda: autotune.AutoChunk(candidates=[2, 4], budget_s=1e-9)  # noqa: E731
  first = fs.Simulation(algo, pop, cohort_size=4, chunk_size=request())
  first.init(params, jax.random.key(0))
  assert not first.plan.performance.tuning.from_cache
  assert (tmp_path / "chunk_size.json").exists()
  again = fs.Simulation(algo, pop, cohort_size=4, chunk_size=request())
  again.init(params, jax.random.key(0))
  t = again.plan.performance.tuning
  # budget ~0: only the first candidate timed (nearest the model's chunk), then read back
  assert t.from_cache and t.choice == first.chunk_size == again.chunk_size == t.candidates[0]
  monkeypatch.setenv(autotune.CACHE_ENV, "off")
  assert autotune.cache_path() is None
  monkeypatch.delenv(autotune.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert autotune.cache_path() == str(tmp_path / "xdg" / "fedjax_sim" / "chunk_size.json")


def test_auto_candidates_are_powers_of_two_and_the_cohort_up_to_the_memory_bound():
  assert autotune.candidates_for(100, 100) == (1, 2, 4, 8, 16, 32, 64, 100)
  assert autotune.candidates_for(100, 20) == (1, 2, 4, 8, 16, 20)
  assert autotune.candidates_for(12, 12, multiple_of=4) == (4, 8, 12)
  many = autotune.candidates_for(5000, 5000)
  assert len(many) == autotune.MAX_CANDIDATES and many[0] == 1 and many[-1] == 5000
  assert autotune.chunk_request("auto")["autotune"] == autotune.AutoChunk()
  assert autotune.chunk_request(5) == {"chunk_size": 5, "autotune": None}


@pytest.mark.parametrize("chunk_size, match", [
    ("fast", "'auto'"), ([], "empty"), ([1, 2.5], "positive ints"), ([0, 2], "positive ints"),
    (["a"], "positive ints"), (list(range(1, 10)), "at most 8"), ([1, 5], "cohort size 4"),
])
def test_bad_chunk_requests_are_refused_at_construction(setup, chunk_size, match):
  algo, pop, _ = setup
  with pytest.raises(ValueError, match="chunk_size") as e:
    fs.Simulation(algo, pop, cohort_size=4, chunk_size=chunk_size)
  assert match in str(e.value)


def test_candidate_over_the_memory_bound_is_refused_before_compiling(setup):
  algo, pop, params = setup
  # per client: 8 * 4 * 8 params + 4 * 20 example bytes (x, y, mask) * 8 batch = 896 bytes
  sim = fs.Simulation(algo, pop, cohort_size=4, chunk_size=[1, 4], memory_budget=2 * 896)
  with pytest.raises(ValueError, match="chunk_size: candidate 4 exceeds 2.*memory_budget"):
    sim.init(params, jax.random.key(0))
  assert sim.num_compiles == {"round": 0, "block": 0}
