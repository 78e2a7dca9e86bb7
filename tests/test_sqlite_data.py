"""FedJAX / TFF SQLite readers against what the real writers wrote and the real readers returned.

The fixtures in tests/fixtures/federated/ were written by FedJAX 0.0.17's own
``SQLiteFederatedDataBuilder`` (tests/fixtures/make_fedjax_sqlite.py, FedJAX venv) and by
TensorFlow's own ``tf.train.Example`` serialisation (tests/fixtures/make_tff_sqlite.py, TF venv);
each JSON next to a file records, client by client and feature by feature, what FedJAX's reader
(``SQLiteFederatedData``) or TF's parser (``tf.io.parse_example``) returned for it.
"""

import base64
import json
import os
import shutil
import sqlite3
import zlib

import h5py
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.data import datasets
from fedjax_sim.data import sqlite as fsql

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "federated")
FEDJAX = ("emnist", "shakespeare", "stackoverflow", "cifar100")


def fixture(name):
  return os.path.join(FIXTURES, name)


def load_expected(name):
  with open(fixture(name)) as f:
    return json.load(f)


def decode(features):
  out = {}
  for name, spec in features.items():
    if spec["dtype"] == "bytes":
      a = np.empty(len(spec["values"]), dtype=object)
      a[:] = [bytes.fromhex(v) for v in spec["values"]]
      out[name] = a.reshape(spec["shape"])
    else:
      raw = zlib.decompress(base64.b64decode(spec["zlib_base64"]))
      out[name] = np.frombuffer(raw, spec["dtype"]).reshape(spec["shape"])
  return out


def assert_same_examples(got, want, where):
  assert sorted(got) == sorted(want), where
  for k in want:
    g, w = np.asarray(got[k]), want[k]
    assert g.dtype == w.dtype and g.shape == w.shape, (where, k, g.dtype, g.shape, w.dtype, w.shape)
    if w.dtype == object:
      assert [type(v) for v in g.reshape(-1)] == [bytes] * w.size, (where, k)
      assert g.reshape(-1).tolist() == w.reshape(-1).tolist(), (where, k)
    else:
      assert g.tobytes() == w.tobytes(), (where, k)  # bit-exact


@pytest.mark.parametrize("name", FEDJAX)
def test_fedjax_files_read_as_fedjax_reads_them(name):
  want = load_expected(f"fedjax_{name}.json")
  ids = [bytes.fromhex(c) for c in want["client_ids_hex"]]
  with fsql.open_federated(fixture(f"fedjax_{name}.sqlite")) as reader:
    assert isinstance(reader, fsql.FedjaxSQLite)
    assert reader.client_ids() == ids  # FedJAX's client_ids() order (rowid)
    assert reader.num_examples().tolist() == [n for _, n in want["client_sizes"]]
    for cid in ids:
      assert_same_examples(reader.client(cid), decode(want["clients"][cid.hex()]), (name, cid))


@pytest.mark.parametrize("name", FEDJAX)
def test_tff_files_read_as_tensorflow_parses_them(name):
  want = load_expected(f"tff_{name}.json")
  assert set(want["splits"]) == {"train", "test"}
  for split, exp in want["splits"].items():
    with fsql.open_federated(fixture(f"tff_{name}.sqlite"), split=split) as reader:
      assert isinstance(reader, fsql.TFFSQLite)
      assert reader.client_ids() == exp["client_ids"]
      for cid in exp["client_ids"]:
        expected = decode(exp["clients"][cid])
        assert reader.num_examples([cid]).tolist() == [len(next(iter(expected.values())))]
        assert_same_examples(reader.client(cid), expected, (name, split, cid))


@pytest.mark.parametrize("name", FEDJAX)
def test_tff_rows_as_fedjax_tff_iterator_reads_them(name):
  """Client order and each client's rows (order and bytes) equal what FedJAX's own
  ``TFFSQLiteClientsIterator`` handed its ``parse_examples`` for the TF-written file."""
  import hashlib

  fedjax = load_expected("fedjax_tff_iterator.json")["files"][name]
  for split, clients in fedjax.items():
    with fsql.open_federated(fixture(f"tff_{name}.sqlite"), split=split) as reader:
      assert reader.client_ids() == [c for c, _ in clients]
      for cid, hashes in clients:
        assert [hashlib.sha256(r).hexdigest() for r in reader.records(cid)] == hashes


def fedjax_clients(name):
  want = load_expected(f"fedjax_{name}.json")
  return [(bytes.fromhex(c), decode(want["clients"][c])) for c in want["client_ids_hex"]]


def tff_clients(name, split):
  exp = load_expected(f"tff_{name}.json")["splits"][split]
  return [(c, decode(exp["clients"][c])) for c in exp["client_ids"]]


def check_population(pop, clients, map_fn):
  """``pop`` holds client i = ``map_fn(clients[i])`` in order, with the ids as labels."""
  assert pop.num_clients == len(clients)
  assert list(pop.labels) == [c for c, _ in clients]
  for i, (_, ex) in enumerate(clients):
    got, want = pop.client(i), map_fn(ex)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
      assert got[k].dtype == want[k].dtype


def emnist_oracle(ex):
  return {"x": ex["pixels"].reshape(-1, 28, 28, 1).astype(np.float32),
          "y": ex["label"].astype(np.int32)}


def test_emnist_population_from_fedjax_and_tff_sqlite():
  clients = fedjax_clients("emnist")
  assert 0 in [len(ex["label"]) for _, ex in clients]  # a client without examples is kept
  check_population(fs.datasets.from_fedjax_sqlite(fixture("fedjax_emnist.sqlite")), clients,
                   emnist_oracle)
  check_population(datasets.emnist(fixture("fedjax_emnist.sqlite"), invert=True), clients,
                   lambda ex: {**emnist_oracle(ex), "x": 1.0 - emnist_oracle(ex)["x"]})
  for split in ("train", "test"):
    check_population(datasets.emnist(fixture("tff_emnist.sqlite"), split=split),
                     tff_clients("emnist", split), emnist_oracle)


def test_cifar100_population_from_fedjax_and_tff_sqlite():
  def oracle(label):
    return lambda ex: {"x": ex["image"].reshape(-1, 32, 32, 3).astype(np.float32) / 255.0,
                       "y": ex[label].astype(np.int32)}

  check_population(fs.datasets.from_fedjax_sqlite(fixture("fedjax_cifar100.sqlite")),
                   fedjax_clients("cifar100"), oracle("label"))
  for split in ("train", "test"):
    check_population(datasets.cifar100(fixture("tff_cifar100.sqlite"), split=split,
                                       label="coarse_label"),
                     tff_clients("cifar100", split), oracle("coarse_label"))


def test_tff_client_without_examples_is_kept(tmp_path):
  path = corrupt_copy(tmp_path, fixture("tff_emnist.sqlite"),
                      "INSERT INTO client_metadata VALUES (?, 'train', 0)", ("f0000_00",))
  pop = fs.datasets.from_fedjax_sqlite(path)
  clients = tff_clients("emnist", "train")
  assert list(pop.labels) == ["f0000_00"] + [c for c, _ in clients]
  assert pop.num_examples.tolist() == [0] + [len(ex["label"]) for _, ex in clients]
  check_population(datasets.emnist(path, client_names=[c for c, _ in clients]), clients,
                   emnist_oracle)


def test_helpers_read_h5_fedjax_and_tff_alike(tmp_path):
  """The same clients as TFF h5 and as FedJAX SQLite give the same population."""
  clients = [(c, ex) for c, ex in fedjax_clients("emnist")]
  with h5py.File(tmp_path / "e.h5", "w") as f:
    for cid, ex in clients:
      g = f.create_group(f"examples/{cid.decode()}")
      for k, v in ex.items():
        g.create_dataset(k, data=v)
  names = [c for c, _ in clients]
  a = datasets.emnist(str(tmp_path / "e.h5"), client_names=[n.decode() for n in names])
  b = datasets.emnist(fixture("fedjax_emnist.sqlite"), client_names=names)
  for i in range(len(names)):
    for k in ("x", "y"):
      np.testing.assert_array_equal(a.client(i)[k], b.client(i)[k])


def test_shakespeare_and_stackoverflow_populations():
  for path, clients in ((fixture("fedjax_shakespeare.sqlite"), fedjax_clients("shakespeare")),
                        (fixture("tff_shakespeare.sqlite"), tff_clients("shakespeare", "train"))):
    pop = fs.datasets.from_fedjax_sqlite(path, seq_len=8)
    oracle = datasets.text_population(
        [[s.decode() for s in ex["snippets"]] for _, ex in clients], 8, [c for c, _ in clients])
    assert list(pop.labels) == [c for c, _ in clients]
    np.testing.assert_array_equal(pop.num_examples, oracle.num_examples)
    for i in range(len(clients)):
      for k in ("x", "y"):
        np.testing.assert_array_equal(pop.client(i)[k], oracle.client(i)[k])
  clients = fedjax_clients("stackoverflow")
  pop, vocab, tags = datasets.stackoverflow(fixture("fedjax_stackoverflow.sqlite"), max_tokens=6)
  word_id = {w: i + 2 for i, w in enumerate(vocab)}

  def so_oracle(ex):
    x = np.zeros((len(ex["tokens"]), 6), np.int32)
    y = np.zeros((len(ex["tokens"]), len(tags)), np.float32)
    for i, (tok, tg) in enumerate(zip(ex["tokens"], ex["tags"])):
      ids = [word_id.get(w, 1) for w in tok.decode().split()][:6]
      x[i, : len(ids)] = ids
      for t in tg.decode().split("|"):
        y[i, tags.index(t)] = 1.0
    return {"x": x, "y": y}

  check_population(pop, clients, so_oracle)
  tff = fs.datasets.from_fedjax_sqlite(fixture("tff_stackoverflow.sqlite"), split="test")
  assert tff.num_clients == 1 and list(tff.labels) == ["00000042"]


def test_subset_reads_only_the_clients_asked_for(tmp_path):
  """Lazy per-client reads: a client is decoded only when asked for (a corrupt other client
  does not matter), sizes come from metadata, and the requested order is kept."""
  path = tmp_path / "e.sqlite"
  shutil.copy(fixture("fedjax_emnist.sqlite"), path)
  clients = fedjax_clients("emnist")
  bad = clients[0][0]
  with sqlite3.connect(path) as db:
    db.execute("UPDATE federated_data SET data = ? WHERE client_id = ?", (b"garbage", bad))
  with fsql.open_federated(str(path)) as reader:
    assert reader.num_examples().tolist() == [len(ex["label"]) for _, ex in clients]
  pick = [clients[3][0], clients[2][0]]
  pop = fs.datasets.from_fedjax_sqlite(str(path), client_ids=pick)
  check_population(pop, [clients[3], clients[2]], emnist_oracle)
  pop = fs.datasets.from_fedjax_sqlite(fixture("fedjax_emnist.sqlite"), max_clients=2)
  check_population(pop, clients[:2], emnist_oracle)
  # str ids are encoded as UTF-8 for FedJAX files.
  pop = fs.datasets.from_fedjax_sqlite(fixture("fedjax_emnist.sqlite"),
                                       client_ids=[clients[2][0].decode()])
  check_population(pop, [clients[2]], emnist_oracle)


def test_msgpack_serialize_matches_fedjax_bytes():
  """Our writer helper produces the blobs FedJAX's builder wrote (byte for byte)."""
  with sqlite3.connect(fixture("fedjax_stackoverflow.sqlite")) as db:
    rows = db.execute("SELECT client_id, data FROM federated_data").fetchall()
  for _cid, blob in rows:
    raw = zlib.decompress(blob)
    assert fsql.msgpack_serialize(fsql.msgpack_deserialize(raw)) == raw


def test_other_numeric_fedjax_files_keep_their_feature_names(tmp_path):
  import zlib as _zlib

  path = tmp_path / "tabular.sqlite"
  rng = np.random.default_rng(0)
  clients = [(b"u1", {"features": rng.random((3, 5)).astype(np.float32),
                      "target": np.arange(3, dtype=np.int32)}),
             (b"u2", {"features": rng.random((2, 5)).astype(np.float32),
                      "target": np.arange(2, dtype=np.int32)})]
  with sqlite3.connect(path) as db:
    db.execute(fsql.FEDJAX_SCHEMA)
    for cid, ex in clients:
      db.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                 (cid, _zlib.compress(fsql.msgpack_serialize(ex)), len(ex["target"])))
  check_population(fs.datasets.from_fedjax_sqlite(str(path)), clients, lambda ex: ex)
  with sqlite3.connect(path) as db:
    db.execute("UPDATE federated_data SET data = ? WHERE client_id = ?", (_zlib.compress(
        fsql.msgpack_serialize({**clients[0][1], "note": np.array([b"a", b"b", b"c"], object)})),
        b"u1"))
  with pytest.raises(ValueError, match=r"tabular\.sqlite: features \['note'\] hold bytes"):
    fs.datasets.from_fedjax_sqlite(str(path), client_ids=[b"u1"])


# -- bad input -----------------------------------------------------------------------------------


def corrupt_copy(tmp_path, src, sql, args):
  path = tmp_path / os.path.basename(src)
  shutil.copy(src, path)
  with sqlite3.connect(path) as db:
    db.execute(sql, args)
  return str(path)


def test_not_sqlite_or_other_schema(tmp_path):
  text = tmp_path / "notes.sqlite"
  text.write_text("client,x\n1,2\n")
  with pytest.raises(ValueError, match=r"notes\.sqlite is neither a SQLite file"):
    fs.datasets.from_fedjax_sqlite(str(text))
  other = tmp_path / "other.sqlite"
  with sqlite3.connect(other) as db:
    db.execute("CREATE TABLE users (id INTEGER, name TEXT)")
  with pytest.raises(ValueError, match=r"other\.sqlite is a SQLite file but not a federated "
                                       r"dataset.*federated_data.*found \{'users'"):
    fs.datasets.from_fedjax_sqlite(str(other))
  with pytest.raises(ValueError, match=r"other\.sqlite is a SQLite file but not"):
    datasets.emnist(str(other))
  h5 = tmp_path / "e.h5"
  h5py.File(h5, "w").close()
  with pytest.raises(ValueError, match=r"e\.h5 is a TFF h5 file, not SQLite"):
    fs.datasets.from_fedjax_sqlite(str(h5))
  with pytest.raises(FileNotFoundError, match="missing.sqlite"):
    fs.datasets.from_fedjax_sqlite(str(tmp_path / "missing.sqlite"))
  assert not (tmp_path / "missing.sqlite").exists()  # opening never creates a file


def test_corrupt_blob_names_file_and_client(tmp_path):
  clients = fedjax_clients("emnist")
  last = clients[-1][0]
  path = corrupt_copy(tmp_path, fixture("fedjax_emnist.sqlite"),
                      "UPDATE federated_data SET data = ? WHERE client_id = ?",
                      (b"\x78\x9c not zlib", last))
  with pytest.raises(ValueError, match=r"fedjax_emnist\.sqlite: client .*f2599_99.* corrupt"):
    fs.datasets.from_fedjax_sqlite(path)  # the corrupt client is the last: nothing returned
  # A blob that decompresses but is not FedJAX msgpack, and one with the wrong example count.
  path = corrupt_copy(tmp_path, fixture("fedjax_emnist.sqlite"),
                      "UPDATE federated_data SET data = ? WHERE client_id = ?",
                      (zlib.compress(b"\xc1\xc1"), last))
  with pytest.raises(ValueError, match=r"client .*f2599_99.* corrupt"):
    datasets.emnist(path)
  path = corrupt_copy(tmp_path, fixture("fedjax_emnist.sqlite"),
                      "UPDATE federated_data SET num_examples = 7 WHERE client_id = ?", (last,))
  with pytest.raises(ValueError, match=r"client .*f2599_99.* holds 1 examples but the file's "
                                       r"metadata says 7"):
    fs.datasets.from_fedjax_sqlite(path)


def test_unknown_client_and_split(tmp_path):
  with pytest.raises(ValueError, match=r"client b'nobody' is not in .*fedjax_emnist\.sqlite"):
    fs.datasets.from_fedjax_sqlite(fixture("fedjax_emnist.sqlite"), client_ids=[b"nobody"])
  with pytest.raises(ValueError, match=r"client 'nobody' is not in .*tff_emnist\.sqlite"):
    datasets.emnist(fixture("tff_emnist.sqlite"), client_names=["f2100_00", "nobody"])
  with pytest.raises(ValueError, match=r"tff_emnist\.sqlite has no split 'validation'; its "
                                       r"splits are \['train', 'test'\]"):
    datasets.emnist(fixture("tff_emnist.sqlite"), split="validation")


def test_corrupt_tff_proto_names_file_and_client(tmp_path):
  path = corrupt_copy(tmp_path, fixture("tff_emnist.sqlite"),
                      "UPDATE examples SET serialized_example_proto = ? WHERE rowid = "
                      "(SELECT MAX(rowid) FROM examples WHERE client_id = 'f2126_02')",
                      (b"\xff\xff\xff",))
  with pytest.raises(ValueError, match=r"tff_emnist\.sqlite: client 'f2126_02': example \d+ is "
                                       r"not a serialised tf\.train\.Example"):
    datasets.emnist(path)
  with fsql.open_federated(path) as reader:  # the other clients still read
    assert reader.client("f2113_01")["label"].shape == (3,)


def test_client_ids_and_max_clients_are_checked():
  with fsql.open_federated(fixture("fedjax_emnist.sqlite")) as reader:
    first = reader.client_ids()[0]
    with pytest.raises(TypeError, match="client_ids must be a sequence of client ids"):
      reader.clients(first)
    for bad in (1.9, "x", 0):
      with pytest.raises(ValueError, match="max_clients must be a positive int"):
        reader.clients(max_clients=bad)
    assert len(reader.clients(max_clients=1)[0]) == 1


def test_a_file_of_another_shape_is_named_not_reshaped(tmp_path):
  """A FedJAX file with EMNIST's feature names but 10 values per example is refused with the
  file and feature named (numpy's "cannot reshape" before); a string of ids is refused too."""
  path = tmp_path / "odd.sqlite"
  ex = {"pixels": np.zeros((2, 10), np.float32), "label": np.arange(2, dtype=np.int32)}
  with sqlite3.connect(path) as db:
    db.execute(fsql.FEDJAX_SCHEMA)
    db.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
               (b"u1", zlib.compress(fsql.msgpack_serialize(ex)), 2))
  with pytest.raises(fsql.FederatedFileError, match=r"odd\.sqlite: feature 'pixels' holds 10"):
    fs.datasets.from_fedjax_sqlite(str(path))
  with pytest.raises(TypeError, match="client_ids must be a sequence"):
    fs.datasets.from_fedjax_sqlite(str(path), client_ids="u1")
