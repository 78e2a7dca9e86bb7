"""The chunk-size autotuner: choice, time budget, exact padding, cache behaviour (fake timer)."""

import json
import warnings

import jax
import numpy as np
import pytest

from fedjax_sim import autotune


class FakeClock:
  """A clock that advances by cost[chunk] per run() call of that chunk."""

  def __init__(self, cost):
    self.t, self.cost, self.built = 0.0, cost, []

  def __call__(self):
    return self.t

  def build(self, chunk):
    self.built.append(chunk)

    def run():
      self.t += self.cost[chunk]
    return run


def test_picks_fastest_and_records_times():
  clock = FakeClock({1: 3.0, 2: 1.0, 4: 2.0})
  c = autotune.tune_chunk_size([1, 2, 4], clock.build, timer=clock, steps=[5, 1, 1, 1])
  assert c.choice == 2 and not c.from_cache
  assert c.seconds == (3.0, 1.0, 2.0)
  assert c.padding[0] == 1.0 and c.padding[1] == 1.5
  json.dumps(c.as_dict())  # config.json-able


def test_time_budget_skips_rest_but_measures_one():
  clock = FakeClock({1: 10.0, 2: 1.0})
  c = autotune.tune_chunk_size([1, 2], clock.build, timer=clock, time_budget_s=5.0)
  assert c.choice == 1 and c.seconds == (10.0, None) and clock.built == [1]


@pytest.mark.parametrize("cands,match", [([], "empty"), (list(range(1, 20)), "at most"),
                                         ([0, 1], ">= 1")])
def test_bad_candidates(cands, match):
  with pytest.raises(ValueError, match=match):
    autotune.tune_chunk_size(cands, lambda c: (lambda: None))


def test_candidate_over_memory_is_error():
  with pytest.raises(ValueError, match="max_chunk"):
    autotune.tune_chunk_size([1, 64], lambda c: (lambda: None), max_chunk=32)


def test_padding_factor_oracle():
  rng = np.random.default_rng(0)
  steps = rng.integers(1, 20, 37)
  for chunk in (1, 3, 8, 37, 50):
    s = sorted(steps, reverse=True) + [0] * (-len(steps) % chunk)
    slots = sum(chunk * max(s[i:i + chunk]) for i in range(0, len(s), chunk))
    assert autotune.padding_factor(steps, chunk) == pytest.approx(slots / steps.sum())
  assert autotune.padding_factor([1] * 10, 1) == 1.0


def test_cache_hit_corrupt_and_other_version(tmp_path):
  path = str(tmp_path / "chunks.json")
  key = autotune.cache_key(("cnn", 100), device_kind="cpu")
  clock = FakeClock({1: 2.0, 2: 1.0})
  first = autotune.tune_chunk_size([1, 2], clock.build, timer=clock, cache_path=path, key=key)
  assert first.choice == 2 and clock.built == [1, 2]
  again = autotune.tune_chunk_size([1, 2], clock.build, timer=clock, cache_path=path, key=key)
  assert again.from_cache and again.choice == 2 and clock.built == [1, 2]  # nothing rebuilt

  # Another jax version: the same model's entry under another version is not used.
  data = json.load(open(path))
  old = key.rsplit("|", 1)[0] + "|jax0.0.1"
  json.dump({old: data[key]}, open(path, "w"))
  with pytest.warns(UserWarning, match="another jax version"):
    c = autotune.tune_chunk_size([1, 2], clock.build, timer=clock, cache_path=path, key=key)
  assert not c.from_cache and clock.built == [1, 2, 1, 2]

  # Corrupt file: warns, re-measures, rewrites a valid file.
  open(path, "w").write("{not json")
  with pytest.warns(UserWarning, match="unreadable"):
    c = autotune.tune_chunk_size([1, 2], clock.build, timer=clock, cache_path=path, key=key)
  assert not c.from_cache and c.choice == 2
  assert key in json.load(open(path))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert autotune.tune_chunk_size([1, 2], clock.build, timer=clock, cache_path=path,
                                    key=key).from_cache


def test_cache_key_has_version_and_device():
  k = autotune.cache_key("sig", device_kind="NVIDIA H200")
  assert k.endswith(f"|NVIDIA H200|jax{jax.__version__}")
  assert autotune.cache_key("sig2", "x") != autotune.cache_key("sig", "x")


@pytest.mark.parametrize("params,batch,example_bytes", [(1_206_590, 20, 4 * 784),
                                                        (1_626_442, 10, 4 * 3072)])
def test_cpu_automatic_chunk_is_the_scan_for_the_cnns(params, batch, example_bytes):
  """benchmarks/results/cpu-2core/client_kernels.jsonl: on CPU every vmapped conv option lost to
  a scan over clients for the EMNIST CNN and pfl's simple_cnn, so the automatic chunk is 1."""
  from fedjax_sim.memory import CPU_BUDGET_BYTES, auto_chunk_size
  for cohort in (10, 50, 100, 1000):
    assert auto_chunk_size(cohort, params, example_bytes, batch, CPU_BUDGET_BYTES, "cpu") == 1
