"""Native on-disk populations (fedjax_sim.data.disk): format, errors, and bit-identical runs."""

import errno
import json
import os

import chex
import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import disk
from fedjax_sim.host_population import gather_rows


@pytest.fixture(scope="module")
def native(pop, tmp_path_factory):
  return disk.convert(pop, str(tmp_path_factory.mktemp("disk") / "pop"))


def test_roundtrip_equals_population(pop, native):
  got = disk.open_native(native, verify=True)
  assert disk.on_disk(got) and got.num_clients == pop.num_clients
  np.testing.assert_array_equal(np.asarray(got.num_examples), np.asarray(pop.num_examples))
  np.testing.assert_array_equal(np.asarray(got.offsets), np.asarray(pop.offsets))
  assert got.max_examples == pop.max_examples
  for i in range(pop.num_clients):
    chex.assert_trees_all_equal(got.client(i), pop.client(i))


def test_cohort_reader_equals_gather(pop, native):
  got = disk.open_native(native)
  reader = disk.CohortReader(got.features, got.labels)
  offsets, sizes = np.asarray(pop.offsets), np.asarray(pop.num_examples)
  ids = np.array([3, 0, 7, 1, 5])
  mask = np.array([True, False, True, True, True])
  for k, v in pop.features.items():
    out = np.zeros((sizes.sum(), *v.shape[1:]), v.dtype)
    reader.read(k, out, offsets, sizes, ids, mask)
    rows = gather_rows(offsets, sizes, ids, mask)
    np.testing.assert_array_equal(out[: rows.size], np.asarray(v)[rows])
    assert not out[rows.size:].any()
  reader.close()


def test_truncated_corrupt_missing(native, tmp_path):
  import shutil
  d = str(tmp_path / "copy")
  shutil.copytree(native, d)
  with open(os.path.join(d, "x.bin"), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(d, "x.bin")) - 8)
  with pytest.raises(disk.DiskDataError, match=r"x\.bin.*truncated.*client"):
    disk.open_native(d)
  shutil.rmtree(d)
  shutil.copytree(native, d)
  with open(os.path.join(d, "x.bin"), "r+b") as f:
    f.seek(4)
    f.write(b"\xff\xff\xff\xff")
  disk.open_native(d)  # lengths agree: only the checksum can tell
  with pytest.raises(disk.DiskDataError, match=r"x\.bin.*corrupt.*CRC"):
    disk.open_native(d, verify=True)
  os.remove(os.path.join(d, "manifest.json"))
  with pytest.raises(disk.DiskDataError, match="manifest.json is missing"):
    disk.open_native(d)
  shutil.rmtree(d)
  shutil.copytree(native, d)
  with open(os.path.join(d, "num_examples.npy"), "r+b") as f:
    f.seek(-1, 2)
    f.write(b"\x07")
  with pytest.raises(disk.DiskDataError, match=r"num_examples\.npy is corrupt"):
    disk.open_native(d)


def test_truncated_during_run_names_file_and_client(native, tmp_path):
  import shutil
  d = str(tmp_path / "copy")
  shutil.copytree(native, d)
  got = disk.open_native(d)
  reader = disk.CohortReader(got.features, got.labels)
  os.remove(os.path.join(d, "y.bin"))  # deleted: the open file is still read (POSIX)
  sizes = np.asarray(got.num_examples)
  out = np.zeros(sizes.sum(), np.int32)
  reader.read("y", out, np.asarray(got.offsets), sizes, np.arange(len(sizes)),
              np.ones(len(sizes), bool))
  np.testing.assert_array_equal(out, np.asarray(got.features["y"]))
  os.truncate(os.path.join(d, "x.bin"), 0)  # truncated under the run
  n = len(sizes) - 1
  with pytest.raises(disk.DiskDataError, match=rf"x\.bin: short read for client {n}"):
    reader.read("x", np.zeros((sizes.sum(), *got.features["x"].shape[1:]), np.float32),
                np.asarray(got.offsets), sizes, np.array([n]), np.array([True]))


def test_empty_clients_and_bad_clients(tmp_path):
  x = np.ones((2, 3), np.float32)
  clients = [("a", {"x": x}), ("b", {"x": x[:0]}), ("c", {"x": x})]
  kept = disk.open_native(disk.write_native(str(tmp_path / "k"), clients))
  assert kept.num_examples.tolist() == [2, 0, 2]
  dropped = disk.open_native(disk.write_native(str(tmp_path / "d"), clients,
                                               empty_clients="drop"))
  assert dropped.labels.tolist() == ["a", "c"]
  with pytest.raises(ValueError, match="client 'b' has zero examples"):
    disk.write_native(str(tmp_path / "e"), clients, empty_clients="error")
  assert not os.path.exists(tmp_path / "e") and len(os.listdir(tmp_path)) == 2  # no leftovers
  with pytest.raises(ValueError, match=r"client 'q': feature 'x' is float32\[4\]"):
    disk.write_native(str(tmp_path / "f"), clients + [("q", {"x": np.ones((1, 4), np.float32)})])
  with pytest.raises(disk.DiskDataError, match="already exists"):
    disk.write_native(str(tmp_path / "k"), clients)


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
  x = np.ones((2, 3), np.float32)
  clients = [(f"c{i}", {"x": x}) for i in range(5)]
  real_open, calls = open, []

  class Full:
    def __init__(self, f):
      self.f, self.name = f, f.name

    def write(self, data):
      calls.append(1)
      if len(calls) == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
      return self.f.write(data)

    def __getattr__(self, k):
      return getattr(self.f, k)

  monkeypatch.setattr(disk, "open", lambda *a, **k: Full(real_open(*a, **k))
                      if "b" in a[1:2][0] else real_open(*a, **k), raising=False)
  with pytest.raises(disk.DiskDataError, match=r"disk full .*x\.bin for client 'c2'") as e:
    disk.write_native(str(tmp_path / "p"), clients)
  assert e.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path) == []  # the partial directory is gone: nothing looks complete


def test_manifest_records_sizes(native):
  man = json.load(open(os.path.join(native, "manifest.json")))
  assert man["format"] == disk.FORMAT
  for spec in man["features"].values():
    assert os.path.getsize(os.path.join(native, spec["file"])) == spec["bytes"]


def _run(algo, pop, sampler, population_on, init_params, rounds=3):
  sim = fs.Simulation(algo, pop, sampler=sampler, chunk_size=3, population_on=population_on)
  state = sim.init(init_params(), jax.random.key(5))
  state, metrics = sim.run(state, num_rounds=rounds, block_size=2)
  return sim, state, metrics


def _check_same(a, b):
  (_, want, want_m), (_, got, got_m) = a, b
  chex.assert_trees_all_equal((want.params, want.client_states, want.server_extra),
                              (got.params, got.client_states, got.server_extra))
  for k in want_m:
    np.testing.assert_array_equal(want_m[k], got_m[k])


def test_fedavg_disk_equals_memory(pop, native, loss_fn, init_params):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  sampler = fs.sampling.uniform(4)
  want = _run(algo, pop, sampler, "host", init_params)
  got = _run(algo, disk.open_native(native), sampler, "host", init_params)
  feeder = fs.host_population.HostFeeder(got[0].plan, got[0].population, 2)
  assert feeder.reader is not None  # streamed with pread from the files
  _check_same(want, got)


@pytest.mark.slow  # two end-to-end runs per algorithm
@pytest.mark.parametrize("name", ["dp_fedavg_poisson", "scaffold", "fedavg_device"])
def test_disk_equals_device(name, pop, native, loss_fn, init_params):
  if name == "scaffold":
    algo = fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=4,
                                  local_epochs=1)
    sampler = fs.sampling.poisson(0.4, 8)
  elif name == "dp_fedavg_poisson":
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                                local_epochs=1,
                                aggregator=fs.aggregators.dp_mean(clip=0.5, noise_multiplier=0.8))
    sampler = fs.sampling.poisson(0.4, 8)
  else:
    algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                                local_epochs=1)
    sampler = fs.sampling.uniform(4)
  want = _run(algo, pop, sampler, "device", init_params, rounds=5)
  got = _run(algo, disk.open_native(native), sampler, "host", init_params, rounds=5)
  _check_same(want, got)


def test_cli_convert_sqlite_and_h5(tmp_path, capsys):
  from fedjax_sim import cli
  from fedjax_sim.data import sqlite

  src = os.path.join(os.path.dirname(__file__), "fixtures", "federated", "tff_emnist.sqlite")
  out = str(tmp_path / "emnist")
  assert cli.main(["data", "convert", src, out, "--quiet"]) == 0
  assert "3 clients" in capsys.readouterr().out
  got = disk.open_native(out, verify=True)
  with sqlite.open_federated(src) as reader:
    for i, cid in enumerate(reader.client_ids()):
      chex.assert_trees_all_equal(got.client(i), {k: np.asarray(v, got.features[k].dtype)
                                                  for k, v in reader.client(cid).items()})
  assert cli.main(["data", "convert", src, out, "--quiet"]) == 2  # exists
  assert "--overwrite" in capsys.readouterr().err
  h5py = pytest.importorskip("h5py")
  h5 = str(tmp_path / "t.h5")
  with h5py.File(h5, "w") as f:
    for cid, n in (("u1", 2), ("u2", 3)):
      f.create_dataset(f"examples/{cid}/x", data=np.arange(n * 2, dtype=np.float32).reshape(n, 2))
  got = disk.open_native(disk.convert(h5, str(tmp_path / "h5native")))
  assert got.labels.tolist() == ["u1", "u2"] and got.num_examples.tolist() == [2, 3]


def test_disk_population_needs_host_or_load(pop, native, loss_fn):
  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  on_disk = disk.open_native(native)
  with pytest.raises(ValueError, match="population_on='host' to stream"):
    fs.Simulation(algo, on_disk, cohort_size=3)
  loaded = disk.load(on_disk)
  assert not disk.on_disk(loaded)
  chex.assert_trees_all_equal(loaded.features, pop.features)
