"""Readers for FedJAX's and TensorFlow Federated's SQLite federated datasets (no FedJAX, no TF).

Two on-disk formats hold the federated datasets that FedJAX and TFF users have cached:

* **FedJAX SQLite** (``fedjax.SQLiteFederatedData``, written by
  ``fedjax.core.sqlite_federated_data.SQLiteFederatedDataBuilder``; FedJAX caches its EMNIST-62,
  Shakespeare, Stack Overflow and CIFAR-100 files under ``~/.cache/fedjax/``): one table
  ``federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)``, one row per
  client; ``data`` is the client's examples, a dict of NumPy arrays serialised with FedJAX's
  msgpack scheme (``fedjax.core.serialization``) and compressed with zlib. Clients come in
  ``rowid`` order, as FedJAX's ``client_ids()`` lists them.
* **TFF SQLite** (TFF's current format; its h5 files are the older one): tables
  ``examples(split_name, client_id, serialized_example_proto)`` and
  ``client_metadata(client_id, split_name, num_examples)``, one serialised ``tf.train.Example``
  per row (the schema FedJAX documents in ``TFFSQLiteClientsIterator``). Clients come in
  ``client_id`` order and examples in ``rowid`` order, as that iterator reads them. Examples are
  decoded with the ``protobuf`` package from TF's published ``example.proto`` /
  ``feature.proto`` message definitions (rebuilt here), so TensorFlow is not needed.

Both readers are lazy: opening a file reads its client ids and sizes only; a client's examples
are read (one ``SELECT``) when asked for, so a file larger than memory can be used a subset of
clients at a time. Every error names the file and, where there is one, the client; a reader
returns only whole, validated clients (nothing partially loaded).

Examples:
  >>> import os, sqlite3, tempfile, zlib
  >>> import numpy as np
  >>> from fedjax_sim.data import sqlite as fsql
  >>> path = os.path.join(tempfile.mkdtemp(), "tiny.sqlite")
  >>> blob = zlib.compress(fsql.msgpack_serialize({"y": np.arange(3, dtype=np.int32)}))
  >>> with sqlite3.connect(path) as db:
  ...   _ = db.execute(fsql.FEDJAX_SCHEMA)
  ...   _ = db.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (b"a", blob, 3))
  >>> reader = fsql.open_federated(path)
  >>> reader.client_ids(), reader.client(b"a")["y"].tolist()
  ([b'a'], [0, 1, 2])
  >>> reader.close()
"""

from __future__ import annotations

import enum
import os
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedjax_sim import _validation

#: The table FedJAX's ``SQLiteFederatedDataBuilder`` creates (verbatim).
FEDJAX_SCHEMA = """CREATE TABLE federated_data (
    client_id BLOB NOT NULL PRIMARY KEY,
    data BLOB NOT NULL,
    num_examples INTEGER NOT NULL );"""

#: TFF's tables (as documented in FedJAX's ``TFFSQLiteClientsIterator``).
TFF_SCHEMA = (
    "CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
    "serialized_example_proto BLOB NOT NULL);",
    "CREATE INDEX idx_examples_client_id ON examples (client_id);",
    "CREATE INDEX idx_examples_client_id_split ON examples (split_name, client_id);",
    "CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
    "num_examples INTEGER NOT NULL);",
    "CREATE INDEX idx_metadata_client_id ON client_metadata (client_id);",
)

_SQLITE_MAGIC = b"SQLite format 3\x00"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_FEDJAX_COLUMNS = {"client_id", "data", "num_examples"}
_TFF_COLUMNS = {
    "examples": {"split_name", "client_id", "serialized_example_proto"},
    "client_metadata": {"client_id", "split_name", "num_examples"},
}


class FederatedFileError(ValueError):
  """A federated dataset file that cannot be read: the message names the file (and client)."""


# -- FedJAX's msgpack serialisation (fedjax.core.serialization) ----------------------------------


class _Ext(enum.IntEnum):
  ndarray = 1
  native_complex = 2
  npscalar = 3
  bytes_ndarray = 4


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  import msgpack

  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  if dtype_name == b"bfloat16":
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16)
  else:
    dtype = np.dtype(dtype_name.decode())
  return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="C")


def _ext_unpack(code: int, data: bytes) -> Any:
  import msgpack

  if code == _Ext.ndarray:
    return _ndarray_from_bytes(data)
  if code == _Ext.native_complex:
    re, im = msgpack.unpackb(data)
    return complex(re, im)
  if code == _Ext.npscalar:
    return _ndarray_from_bytes(data)[()]
  if code == _Ext.bytes_ndarray:
    shape, flat = msgpack.unpackb(data, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)
  return msgpack.ExtType(code, data)


def msgpack_deserialize(data: bytes) -> Any:
  """Inverse of FedJAX's ``msgpack_serialize``: a tree of dicts/lists with NumPy array leaves.

  Returns:
    The deserialised tree; bytes arrays come back as object arrays of ``bytes`` (as in FedJAX).
  """
  import msgpack

  return msgpack.unpackb(data, ext_hook=_ext_unpack, raw=False)


def msgpack_serialize(tree: Any) -> bytes:
  """FedJAX's ``msgpack_serialize`` (for writing test files without FedJAX).

  Returns:
    The msgpack bytes: arrays as ``(shape, dtype name, C-order bytes)``, object arrays of bytes
    as ``(shape, list of bytes)``, in FedJAX's extension types.
  """
  import msgpack

  def pack(x):
    if isinstance(x, np.ndarray) and x.dtype.hasobject:
      flat = list(x.reshape(-1))
      return msgpack.ExtType(_Ext.bytes_ndarray, msgpack.packb((x.shape, flat), use_bin_type=True))
    if isinstance(x, np.ndarray):
      return msgpack.ExtType(
          _Ext.ndarray, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
      a = np.asarray(x)
      return msgpack.ExtType(
          _Ext.npscalar, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    raise TypeError(f"cannot serialise {type(x).__name__}")

  return msgpack.packb(tree, default=pack, strict_types=True)


# -- tf.train.Example without TensorFlow ---------------------------------------------------------

_EXAMPLE_CLASS = None


def _example_class():
  """``tensorflow.Example`` built from TF's ``example.proto`` / ``feature.proto`` definitions."""
  global _EXAMPLE_CLASS
  if _EXAMPLE_CLASS is not None:
    return _EXAMPLE_CLASS
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  F = descriptor_pb2.FieldDescriptorProto
  f = descriptor_pb2.FileDescriptorProto(
      name="tensorflow/core/example/example.proto", package="tensorflow", syntax="proto3")

  def message(name, *fields, nested=()):
    m = f.message_type.add(name=name)
    for n in nested:
      m.nested_type.add().CopyFrom(n)
    for fname, number, ftype, label, type_name, oneof in fields:
      fd = m.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        fd.type_name = type_name
      if oneof is not None:
        fd.oneof_index = oneof
    return m

  rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
  message("BytesList", ("value", 1, F.TYPE_BYTES, rep, None, None))
  packed = message("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None, None))
  packed.field[0].options.packed = True
  packed = message("Int64List", ("value", 1, F.TYPE_INT64, rep, None, None))
  packed.field[0].options.packed = True
  feature = message(
      "Feature",
      ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
      ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
      ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0),
  )
  feature.oneof_decl.add(name="kind")
  entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
  entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt,
                  type_name=".tensorflow.Feature")
  entry.options.map_entry = True
  message("Features", ("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry",
                       None), nested=(entry,))
  message("Example", ("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features", None))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  _EXAMPLE_CLASS = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))
  return _EXAMPLE_CLASS


def parse_tf_examples(records: Sequence[bytes]) -> dict[str, np.ndarray]:
  """Decodes serialised ``tf.train.Example`` messages and stacks each feature over examples.

  A feature with one value per example becomes ``[n]``, one with ``L`` values ``[n, L]``:
  ``bytes_list`` as an object array of ``bytes``, ``float_list`` float32, ``int64_list`` int64
  (as ``tf.io.parse_example`` with ``FixedLenFeature`` returns them, before any reshape).

  Returns:
    ``{feature name: array}``.

  Raises:
    ValueError: if a record does not decode, or the examples disagree on feature names, kinds or
      lengths.
  """
  from google.protobuf.message import DecodeError

  cls = _example_class()
  columns: dict[str, list] = {}
  kinds: dict[str, str] = {}
  for i, record in enumerate(records):
    ex = cls()
    try:
      ex.ParseFromString(bytes(record))
    except DecodeError as e:
      raise ValueError(f"example {i} is not a serialised tf.train.Example ({e})") from None
    feats = ex.features.feature
    if i and set(feats.keys()) != set(columns):
      raise ValueError(
          f"example {i} has features {sorted(feats.keys())}; example 0 has {sorted(columns)}")
    for name in feats.keys():
      kind = feats[name].WhichOneof("kind")
      if kind is None:
        raise ValueError(f"example {i}: feature {name!r} holds no value list")
      if kinds.setdefault(name, kind) != kind:
        raise ValueError(f"example {i}: feature {name!r} is a {kind}, example 0's a {kinds[name]}")
      columns.setdefault(name, []).append(list(getattr(feats[name], kind).value))
  dtypes = {"bytes_list": object, "float_list": np.float32, "int64_list": np.int64}
  out = {}
  for name, values in columns.items():
    lengths = {len(v) for v in values}
    if len(lengths) != 1:
      raise ValueError(f"feature {name!r} has different lengths across examples: {sorted(lengths)}")
    width = lengths.pop()
    arr = np.empty((len(values), width), dtype=dtypes[kinds[name]])
    for i, v in enumerate(values):
      arr[i, :] = v
    out[name] = arr[:, 0] if width == 1 else arr
  return out


# -- files ---------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
  """Which federated file ``path`` is: ``"fedjax_sqlite"``, ``"tff_sqlite"`` or ``"h5"``.

  Returns:
    The format name.

  Raises:
    FileNotFoundError: if there is no such file.
    FederatedFileError: if it is neither SQLite nor HDF5, or a SQLite file with another schema.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no federated dataset file at {path!r}.")
  with open(path, "rb") as fh:
    head = fh.read(16)
  if head.startswith(_HDF5_MAGIC):
    return "h5"
  if head != _SQLITE_MAGIC:
    raise FederatedFileError(
        f"{path} is neither a SQLite file (FedJAX / TFF) nor an HDF5 file (TFF h5): its first "
        f"bytes are {head[:16]!r}. Pass the .sqlite or .h5 file itself (decompress .lzma / "
        ".tar.bz2 downloads first).")
  db = _connect(path)
  try:
    tables = _tables(db, path)
  finally:
    db.close()
  if _FEDJAX_COLUMNS <= tables.get("federated_data", set()):
    return "fedjax_sqlite"
  if all(cols <= tables.get(t, set()) for t, cols in _TFF_COLUMNS.items()):
    return "tff_sqlite"
  raise FederatedFileError(
      f"{path} is a SQLite file but not a federated dataset: expected FedJAX's table "
      f"federated_data{tuple(sorted(_FEDJAX_COLUMNS))} or TFF's tables "
      f"examples{tuple(sorted(_TFF_COLUMNS['examples']))} and "
      f"client_metadata{tuple(sorted(_TFF_COLUMNS['client_metadata']))}; found "
      f"{ {t: sorted(c) for t, c in tables.items()} }.")


def _connect(path: str) -> sqlite3.Connection:
  from urllib.parse import quote

  uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
  try:
    return sqlite3.connect(uri, uri=True, check_same_thread=False)
  except sqlite3.Error as e:
    raise FederatedFileError(f"cannot open {path} as SQLite: {e}") from None


def _tables(db: sqlite3.Connection, path: str) -> dict[str, set[str]]:
  try:
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return {t: {r[1] for r in db.execute(f"PRAGMA table_info('{t}')")} for t in names}
  except sqlite3.Error as e:
    raise FederatedFileError(f"{path} is not a readable SQLite database: {e}") from None


class _Reader:
  """Shared lazy-reader plumbing: a read-only connection and the client list."""

  format = ""

  def __init__(self, path: str):
    self.path = os.path.expanduser(os.fspath(path))
    fmt = detect_format(self.path)
    if fmt != self.format:
      raise FederatedFileError(f"{self.path} is a {fmt} file, not {self.format}.")
    self._db = _connect(self.path)
    self._sizes: dict[Any, int] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self._db.close()

  def _query(self, sql: str, args=(), client=None) -> list[tuple]:
    try:
      return self._db.execute(sql, args).fetchall()
    except sqlite3.Error as e:
      who = "" if client is None else f" (client {client!r})"
      raise FederatedFileError(f"{self.path}: SQLite error{who}: {e}") from None

  def client_ids(self) -> list:
    """All client ids, in the order FedJAX lists them."""
    return list(self._sizes)

  def num_examples(self, client_ids: Iterable | None = None) -> np.ndarray:
    """Examples per client from the file's metadata (no example is read).

    Returns:
      int64 ``[len(client_ids)]`` (default all clients).
    """
    ids = self.client_ids() if client_ids is None else [self._key(c) for c in client_ids]
    for c in ids:
      if c not in self._sizes:
        raise self._missing(c)
    return np.asarray([self._sizes[c] for c in ids], np.int64)

  def _key(self, client_id):
    raise NotImplementedError

  def _add_client(self, client_id, num_examples, table: str) -> None:
    """Records one metadata row; refuses a NULL id, a count that is not an int >= 0, and a
    client listed twice (a table without its primary key): reading one of its rows and
    dropping the other would be silent."""
    if client_id is None:
      raise FederatedFileError(f"{self.path}: a row of {table} has client_id NULL; the file is "
                               "corrupt.")
    if isinstance(client_id, memoryview):
      client_id = bytes(client_id)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} has num_examples={num_examples!r} in {table}, "
          "not an integer >= 0; the file is corrupt or was not written by FedJAX / TFF.")
    if client_id in self._sizes:
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} is listed more than once in {table} (the table "
          "lacks its primary key); its rows cannot be told apart. Rebuild the file with each "
          "client once.")
    self._sizes[client_id] = num_examples

  def _check(self, client_id, examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(examples, dict) or not examples:
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} holds {type(examples).__name__}, not a dict of "
          "feature arrays.")
    lengths = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in examples.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} features have different lengths {lengths}.")
    n = next(iter(lengths.values()))
    if n != self._sizes[client_id]:
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} holds {n} examples but the file's metadata says "
          f"{self._sizes[client_id]}; the file is inconsistent.")
    return examples

  def _missing(self, client_id) -> FederatedFileError:
    ids = self.client_ids()
    return FederatedFileError(
        f"client {client_id!r} is not in {self.path} ({len(ids)} clients, e.g. "
        f"{ids[:3]!r}); list them with open_federated(path).client_ids().")

  def clients(self, client_ids: Iterable | None = None,
              max_clients: int | None = None) -> tuple[list, list[dict[str, np.ndarray]]]:
    """Reads whole clients (all or ``client_ids``, at most ``max_clients``).

    Returns:
      ``(ids, examples)``: the client ids and one ``{feature: array}`` per client.

    Raises:
      FederatedFileError: naming the file and client, before anything is returned.
    """
    ids = self._select(client_ids, max_clients)
    return ids, [self.client(c) for c in ids]

  def _select(self, client_ids, max_clients) -> list:
    if isinstance(client_ids, (str, bytes)):
      raise TypeError(f"client_ids must be a sequence of client ids (e.g. [{client_ids!r}]), "
                      f"not one id: a string would be read as one id per character.")
    ids = self.client_ids() if client_ids is None else [self._key(c) for c in client_ids]
    repeated = sorted({repr(c) for c in ids if ids.count(c) > 1}) if len(set(ids)) < len(ids) \
        else []
    if repeated:
      raise ValueError(
          f"{self.path}: client_ids list {', '.join(repeated)} more than once; a client read "
          "twice would be sampled and weighted twice. Pass each client once.")
    max_clients = _validation.positive_int("max_clients", max_clients, allow_none=True)
    if max_clients is not None:
      ids = ids[:max_clients]
    for c in ids:
      if c not in self._sizes:
        raise self._missing(c)
    if not ids:
      raise FederatedFileError(f"{self.path} has no clients to read.")
    return ids


class FedjaxSQLite(_Reader):
  """Lazy reader of a FedJAX SQLite file (``fedjax.SQLiteFederatedData``'s format).

  Client ids are ``bytes`` (a ``str`` is encoded as UTF-8); :meth:`client` returns exactly what
  FedJAX's ``get_client(cid).raw_examples`` holds.
  """

  format = "fedjax_sqlite"

  def __init__(self, path: str):
    super().__init__(path)
    rows = self._query("SELECT client_id, num_examples FROM federated_data ORDER BY rowid")
    for cid, n in rows:
      self._add_client(cid, n, "federated_data")

  def _key(self, client_id):
    if isinstance(client_id, str) and client_id not in self._sizes:
      return client_id.encode()  # FedJAX's builder stores bytes ids
    return client_id

  def client(self, client_id) -> dict[str, np.ndarray]:
    """One client's examples, ``{feature: array}``.

    Returns:
      The decoded dict (bytes features as object arrays of ``bytes``).
    """
    client_id = self._key(client_id)
    if client_id not in self._sizes:
      raise self._missing(client_id)
    rows = self._query("SELECT data FROM federated_data WHERE client_id = ?", [client_id],
                       client_id)
    try:
      examples = msgpack_deserialize(zlib.decompress(rows[0][0]))
    except Exception as e:  # zlib.error, msgpack errors, bad dtype names, bad shapes
      raise FederatedFileError(
          f"{self.path}: client {client_id!r}: its data blob is corrupt (not zlib-compressed "
          f"FedJAX msgpack): {type(e).__name__}: {e}") from None
    return self._check(client_id, examples)


class TFFSQLite(_Reader):
  """Lazy reader of a TFF SQLite file (``tf.train.Example`` rows), for one ``split``.

  Client ids are ``str``; :meth:`client` returns the parsed features of the client's examples in
  ``rowid`` order (see :func:`parse_tf_examples`).
  """

  format = "tff_sqlite"

  def __init__(self, path: str, split: str = "train"):
    super().__init__(path)
    self.split = split
    rows = self._query("SELECT client_id, num_examples FROM client_metadata WHERE split_name = ? "
                       "ORDER BY client_id", [split])
    if not rows:
      splits = [r[0] for r in self._query("SELECT DISTINCT split_name FROM client_metadata")]
      raise FederatedFileError(f"{self.path} has no split {split!r}; its splits are {splits}.")
    for cid, n in rows:
      self._add_client(cid, n, f"client_metadata (split {split!r})")

  def _key(self, client_id):
    return client_id.decode() if isinstance(client_id, bytes) else client_id

  def records(self, client_id) -> list[bytes]:
    """The client's serialised ``tf.train.Example`` rows of this split, in ``rowid`` order (what
    FedJAX's ``TFFSQLiteClientsIterator`` hands its ``parse_examples``).

    Returns:
      One ``bytes`` per example.
    """
    client_id = self._key(client_id)
    if client_id not in self._sizes:
      raise self._missing(client_id)
    rows = self._query("SELECT serialized_example_proto FROM examples WHERE split_name = ? AND "
                       "client_id = ? ORDER BY rowid", [self.split, client_id], client_id)
    if not rows and self._sizes[client_id]:
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} is listed in client_metadata for split "
          f"{self.split!r} but has no rows in examples; the file is inconsistent.")
    return [bytes(r[0]) for r in rows]

  def client(self, client_id) -> dict[str, np.ndarray]:
    """One client's examples of this split, ``{feature: array}``.

    Returns:
      The stacked features (see :func:`parse_tf_examples`).
    """
    client_id = self._key(client_id)
    records = self.records(client_id)
    if not records:
      raise FederatedFileError(
          f"{self.path}: client {client_id!r} has no examples in split {self.split!r}, so its "
          "features are unknown; pass client ids with examples.")
    try:
      examples = parse_tf_examples(records)
    except ValueError as e:
      raise FederatedFileError(f"{self.path}: client {client_id!r}: {e}") from None
    return self._check(client_id, examples)


  def clients(self, client_ids: Iterable | None = None,
              max_clients: int | None = None) -> tuple[list, list[dict[str, np.ndarray]]]:
    """As :meth:`_Reader.clients`; a client listed with 0 examples gets empty arrays shaped like
    the other clients' (a TFF row holds no feature specification of its own)."""
    ids = self._select(client_ids, max_clients)
    read = {}
    for c in ids:
      if self._sizes[c]:
        read[c] = self.client(c)
      elif self.records(c):
        raise FederatedFileError(
            f"{self.path}: client {c!r} has rows in examples but client_metadata says 0 "
            "examples; the file is inconsistent.")
    if not read:
      raise FederatedFileError(f"{self.path}: the clients asked for hold no examples in split "
                               f"{self.split!r}.")
    empty = {k: v[:0] for k, v in next(iter(read.values())).items()}
    return ids, [read.get(c, empty) for c in ids]


def check_split(path: str, fmt: str, split: str) -> None:
  """Refuses a ``split`` other than the default ``"train"`` for a file that holds one split
  (FedJAX SQLite, TFF h5): reading the file's only split under another name would be silent.
  """
  if fmt != "tff_sqlite" and split != "train":
    kind = {"fedjax_sqlite": "FedJAX SQLite", "h5": "TFF h5"}.get(fmt, fmt)
    raise ValueError(
        f"split={split!r} selects a split of a TFF SQLite file, which holds both; {path} is a "
        f"{kind} file, which holds one split (its file name says which, e.g. "
        "federated_emnist_test.sqlite). Open the file of that split and drop split=.")


def open_federated(path: str, split: str = "train") -> FedjaxSQLite | TFFSQLite:
  """Opens a FedJAX or TFF SQLite federated dataset for lazy per-client reads.

  Args:
    path: the ``.sqlite`` file.
    split: the TFF split (``"train"`` / ``"test"``); FedJAX files hold one split per file, so
      any split other than the default ``"train"`` is refused for them (a ValueError).

  Returns:
    A :class:`FedjaxSQLite` or :class:`TFFSQLite` reader (close it, or use ``with``).
  """
  fmt = detect_format(path)
  check_split(path, fmt, split)
  if fmt == "fedjax_sqlite":
    return FedjaxSQLite(path)
  if fmt == "tff_sqlite":
    return TFFSQLite(path, split)
  raise FederatedFileError(f"{path} is an h5 file; read it with fedjax_sim.datasets.read_h5.")


def read_sqlite(
    path: str, features: Sequence[str] | None = None, *, client_names: Sequence | None = None,
    max_clients: int | None = None, split: str = "train",
) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
  """Reads clients of a FedJAX / TFF SQLite file into flat arrays (``read_h5``'s contract).

  Args:
    path: the file.
    features: features to keep (default: all of the first client's).
    client_names: read only these clients, in this order (default all, in the file's order).
    max_clients: at most this many clients.
    split: TFF split.

  Returns:
    ``(features, client_index, names)``: flat arrays ``[total, ...]``, each example's client
    index, and the client ids.

  Raises:
    FederatedFileError: naming the file and the client; nothing is returned partially.
  """
  with open_federated(path, split) as reader:
    names, examples = reader.clients(client_names, max_clients)
  wanted = list(features) if features is not None else sorted(examples[0])
  for name, ex in zip(names, examples):
    missing = [k for k in wanted if k not in ex]
    if missing:
      raise FederatedFileError(
          f"{path}: client {name!r} lacks features {missing}; expected {wanted}, found "
          f"{sorted(ex)}.")
  arrays = {}
  for k in wanted:
    parts = [np.asarray(ex[k]) for ex in examples]
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
      raise FederatedFileError(f"{path}: feature {k!r} has different shapes across clients "
                               f"{sorted(shapes)}.")
    arrays[k] = np.concatenate(parts)
  sizes = [len(next(iter(ex.values()))) for ex in examples]
  return arrays, np.repeat(np.arange(len(names)), sizes), names
