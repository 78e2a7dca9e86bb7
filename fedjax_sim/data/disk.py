"""Populations larger than memory: a native on-disk format, streamed per round by the host feeder.

The format (a directory, ``FORMAT`` below):

* ``<feature>.bin`` per feature: every example's values, raw, C order, sorted by client (the
  :class:`~fedjax_sim.Population` CSR layout), dtype and trailing shape in the manifest;
* ``num_examples.npy``: int64 ``[num_clients]`` (offsets are its exclusive cumulative sum);
* ``labels.npy``: the original client ids (strings or ints);
* ``manifest.json``: format version, sizes, each file's byte length and CRC-32.

:func:`write_native` writes it into a hidden temporary directory beside the target, fsyncs every
file, writes the manifest last and renames the directory into place, so a conversion that fails
(disk full, interrupted) never leaves a directory that looks complete. :func:`open_native`
checks the manifest, the files' lengths and the index's checksum (``verify=True`` also checks
every data file's CRC-32), and returns a :class:`~fedjax_sim.Population` whose features are
read-only ``np.memmap`` views: nothing is read until a round needs it. Run it with
``fs.Simulation(..., population_on="host")``: each round's cohort is read with ``pread`` into
the feeder's staging buffer on a background thread while the previous round trains
(:mod:`fedjax_sim.host_population`), so host memory holds at most two blocks of cohort examples
(``2 * block_size * capacity`` rows, ``capacity`` = the examples of the cohort-size largest
clients), never the dataset. Results are bit-identical to the in-memory population: the same
sampler, keys and round step run on the same values.

Why this format (measured, ``benchmarks/disk_scale.py --read-only``): reading a cohort from
these files is one ``pread`` per client and feature straight into the staging buffer; reading
the same clients from a FedJAX/TFF SQLite file lazily is a query plus a msgpack/tf.Example decode
per client. The SQLite readers stay supported as inputs of the converter.

Errors name the file and the client: a truncated or corrupt file (length or checksum against the
manifest), a file deleted or truncated during a run (short read), a client with zero examples
when ``empty_clients="error"``, a disk full while converting (``ENOSPC``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedjax_sim.data.population import Population, check_features

FORMAT = "fedjax_sim.native/1"
MANIFEST = "manifest.json"
_INDEX = "num_examples.npy"
_LABELS = "labels.npy"
_CHUNK = 1 << 22


class DiskDataError(OSError, ValueError):
  """A native population directory (or a conversion into one) is unusable; says which file."""


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _crc_file(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


class _Progress:
  def __init__(self, total: int | None, progress: bool | Callable[[int, int | None], None]):
    self.total, self.start, self.last = total, time.monotonic(), 0.0
    self.fn = progress if callable(progress) else (self._print if progress else None)

  def _print(self, done: int, total: int | None) -> None:
    now = time.monotonic()
    if now - self.last < 1.0 and done != total:
      return
    self.last = now
    of = f"/{total}" if total else ""
    print(f"\rconverting: {done}{of} clients, {now - self.start:.0f}s", end="",
          file=sys.stderr, flush=True)
    if done == total:
      print(file=sys.stderr)

  def __call__(self, done: int) -> None:
    if self.fn is not None:
      self.fn(done, self.total)


def write_native(
    path: str,
    clients: Iterable[tuple[Any, Mapping[str, Any]]],
    *,
    num_clients: int | None = None,
    empty_clients: str = "keep",
    overwrite: bool = False,
    progress: bool | Callable[[int, int | None], None] = False,
) -> str:
  """Writes clients, one at a time, into a native population directory (atomically).

  Args:
    path: the directory to create.
    clients: ``(client_id, {feature: array})`` pairs, in the order the clients get their
      indices; every client has the same features, trailing shapes and dtypes. Streamed: only
      one client is held at a time.
    num_clients: the number of clients, if known (for progress only).
    empty_clients: ``"keep"`` (a client with zero examples is kept; when sampled it does not
      participate, as in :class:`~fedjax_sim.Population`), ``"drop"`` or ``"error"``.
    overwrite: replace an existing directory at ``path`` (only once the new one is complete).
    progress: print progress to stderr, or a callable ``(clients_done, total_or_None)``.

  Returns:
    ``path``.

  Raises:
    DiskDataError: the target exists, the disk is full, or a write failed (naming the file and
      the client); nothing is left at ``path``.
    ValueError: a client's features disagree with the first client's, or an empty client with
      ``empty_clients="error"``.

  Examples:
    >>> import tempfile, os, numpy as np
    >>> from fedjax_sim.data import disk
    >>> d = os.path.join(tempfile.mkdtemp(), "pop")
    >>> clients = [("a", {"x": np.ones((3, 2), np.float32)}),
    ...            ("b", {"x": np.zeros((1, 2), np.float32)})]
    >>> pop = disk.open_native(disk.write_native(d, clients))
    >>> pop.num_examples.tolist(), pop.labels.tolist()
    ([3, 1], ['a', 'b'])
  """
  if empty_clients not in ("keep", "drop", "error"):
    raise ValueError(f"empty_clients must be 'keep', 'drop' or 'error'; got {empty_clients!r}.")
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise DiskDataError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
  files: dict[str, Any] = {}
  specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
  crcs: dict[str, int] = {}
  sizes: list[int] = []
  labels: list = []
  current = ("<none>", None)
  tick = _Progress(num_clients, progress)
  try:
    for cid, feats in clients:
      current = (cid, None)
      try:
        feats = check_features(feats) if feats else {}
      except (TypeError, ValueError) as e:
        raise type(e)(
            f"client {cid!r}: {e} Text features (Shakespeare snippets, Stack Overflow tokens) "
            "are tokenized first: build the Population with fs.datasets and convert that, or "
            "keep only numeric features (features=[...], --features a,b).") from None
      n = {k: v.shape[0] for k, v in feats.items()}
      if not specs:
        if not feats:
          raise ValueError(f"client {cid!r} has no features; the first client fixes them.")
        specs = {k: (v.shape[1:], v.dtype) for k, v in sorted(feats.items())}
        for k in specs:
          fname = os.path.join(tmp, f"{k}.bin")
          files[k], crcs[k] = open(fname, "wb"), 0
      if set(feats) != set(specs):
        raise ValueError(f"client {cid!r} has features {sorted(feats)}; the first client has "
                         f"{sorted(specs)}.")
      if len(set(n.values())) != 1:
        raise ValueError(f"client {cid!r}: features have different lengths {n}.")
      count = next(iter(n.values()))
      if count == 0 and empty_clients != "keep":
        if empty_clients == "error":
          raise ValueError(f"client {cid!r} has zero examples (empty_clients='error'); pass "
                           "empty_clients='keep' or 'drop'.")
        continue
      for k, (shape, dtype) in specs.items():
        v = feats[k]
        if v.shape[1:] != shape or v.dtype != dtype:
          raise ValueError(
              f"client {cid!r}: feature {k!r} is {v.dtype}{list(v.shape[1:])} per example; the "
              f"first client's is {dtype}{list(shape)}.")
        current = (cid, files[k].name)
        data = np.ascontiguousarray(v).tobytes()
        files[k].write(data)
        crcs[k] = zlib.crc32(data, crcs[k])
      sizes.append(count)
      labels.append(cid)
      tick(len(sizes))
    if not sizes:
      raise ValueError("no clients to write (the input is empty, or every client was dropped).")
    current = ("<index>", os.path.join(tmp, _INDEX))
    for f in files.values():
      f.flush()
      os.fsync(f.fileno())
      f.close()
    counts = np.asarray(sizes, np.int64)
    if counts.sum() >= 2**31:
      raise ValueError("more than 2**31 examples do not fit int32 offsets; split the population.")
    np.save(os.path.join(tmp, _INDEX), counts)
    lab = np.asarray(labels)
    if lab.dtype == object:
      lab = np.asarray([str(x) for x in labels])
    np.save(os.path.join(tmp, _LABELS), lab)
    total = int(counts.sum())
    manifest = {
        "format": FORMAT,
        "num_clients": len(sizes),
        "total_examples": total,
        "max_examples": int(counts.max()),
        "features": {
            k: {"file": f"{k}.bin", "dtype": np.dtype(dt).str, "shape": list(shape),
                "bytes": total * int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize,
                "crc32": crcs[k]}
            for k, (shape, dt) in specs.items()},
        "index": {"file": _INDEX, "crc32": _crc_file(os.path.join(tmp, _INDEX))},
        "labels": {"file": _LABELS, "crc32": _crc_file(os.path.join(tmp, _LABELS))},
    }
    current = ("<manifest>", os.path.join(tmp, MANIFEST))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(path):  # overwrite: move the old one aside only now
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
    _fsync_dir(parent)
    return path
  except BaseException as e:
    for f in files.values():
      try:
        f.close()
      except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and not isinstance(e, DiskDataError):
      cid, fname = current
      what = "disk full" if e.errno == errno.ENOSPC else f"write failed ({e})"
      raise DiskDataError(
          e.errno, f"{what} while converting into {path}: writing {fname or 'a feature file'} "
          f"for client {cid!r}. Nothing was left at {path}; free space (or choose another "
          "directory) and convert again.") from e
    raise


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise DiskDataError(
        f"{path} is missing: the directory is not a complete native population (a conversion "
        "that did not finish leaves none). Convert again with `fedjax-sim data convert`.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DiskDataError(f"{path} is corrupt ({e}); convert the data again.") from None


def open_native(path: str, *, verify: bool = False) -> Population:
  """Opens a native population directory without reading its examples.

  Args:
    path: a directory written by :func:`write_native` (or ``fedjax-sim data convert``).
    verify: also check every data file's CRC-32 (reads the whole dataset once).

  Returns:
    A :class:`~fedjax_sim.Population` whose features are read-only ``np.memmap`` arrays and
    whose ``offsets`` / ``num_examples`` are on the device. Use it with
    ``fs.Simulation(..., population_on="host")``, which streams each round's cohort from disk.

  Raises:
    DiskDataError: a file is missing, truncated, or does not match the manifest's checksum;
      the message names the file.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise DiskDataError(f"{path} is not a directory of a native population; convert one with "
                        "`fedjax-sim data convert`.")
  man = _read_json(os.path.join(path, MANIFEST))
  if man.get("format") != FORMAT:
    raise DiskDataError(f"{os.path.join(path, MANIFEST)}: format {man.get('format')!r}, "
                        f"expected {FORMAT!r}.")
  arrays = {}
  for part in ("index", "labels"):
    fname = os.path.join(path, man[part]["file"])
    try:
      crc = _crc_file(fname)
    except FileNotFoundError:
      raise DiskDataError(f"{fname} is missing; the population is incomplete.") from None
    if crc != man[part]["crc32"]:
      raise DiskDataError(f"{fname} is corrupt: CRC-32 {crc:#x} differs from the manifest's "
                          f"{man[part]['crc32']:#x}; convert the data again.")
    arrays[part] = np.load(fname, allow_pickle=False)
  counts = arrays["index"]
  if counts.shape != (man["num_clients"],) or int(counts.sum()) != man["total_examples"]:
    raise DiskDataError(f"{os.path.join(path, _INDEX)} disagrees with the manifest's sizes.")
  features = {}
  for k, spec in man["features"].items():
    fname = os.path.join(path, spec["file"])
    try:
      size = os.path.getsize(fname)
    except FileNotFoundError:
      raise DiskDataError(f"{fname} (feature {k!r}) is missing.") from None
    if size != spec["bytes"]:
      last = int(np.searchsorted(np.cumsum(counts) * (spec["bytes"] // max(
          man["total_examples"], 1)), size, side="right"))
      raise DiskDataError(
          f"{fname} (feature {k!r}) is {'truncated' if size < spec['bytes'] else 'too long'}: "
          f"{size} bytes, the manifest says {spec['bytes']}"
          + (f"; client {arrays['labels'][last]!r} (index {last}) is the first incomplete one"
             if size < spec["bytes"] and last < len(counts) else "") + ". Convert again.")
    if verify and (crc := _crc_file(fname)) != spec["crc32"]:
      raise DiskDataError(f"{fname} (feature {k!r}) is corrupt: CRC-32 {crc:#x} differs from "
                          f"the manifest's {spec['crc32']:#x}; convert the data again.")
    shape = (man["total_examples"], *spec["shape"])
    if man["total_examples"] == 0 or size == 0:
      features[k] = np.zeros(shape, np.dtype(spec["dtype"]))
    else:
      features[k] = np.memmap(fname, dtype=np.dtype(spec["dtype"]), mode="r", shape=shape)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return Population(features, jnp.asarray(offsets, jnp.int32), jnp.asarray(counts, jnp.int32),
                    int(man["max_examples"]), arrays["labels"])


def is_native(path: str) -> bool:
  """Whether ``path`` is a (complete) native population directory."""
  return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def load(population: Population) -> Population:
  """A disk population's examples read into an in-memory (device) :class:`Population`.

  Returns:
    The same population with its features as device arrays (for data that fits).
  """
  return Population({k: jnp.asarray(np.asarray(v)) for k, v in population.features.items()},
                    population.offsets, population.num_examples, population.max_examples,
                    population.labels)


# -- readers: the cohort's rows straight from the files ---------------------------------------

class CohortReader:
  """Reads clients' rows of memory-mapped features with ``pread`` into a staging buffer.

  Opened once per feeder: the files stay open, so a file deleted during a run is still read
  (POSIX); a file truncated during a run gives a short read, reported naming the file and the
  client.
  """

  def __init__(self, features: Mapping[str, np.memmap], labels=None):
    self.fds, self.row_bytes, self.base, self.names = {}, {}, {}, {}
    self.labels = labels
    for k, v in features.items():
      self.fds[k] = os.open(v.filename, os.O_RDONLY)
      self.names[k] = v.filename
      self.row_bytes[k] = int(np.prod(v.shape[1:], dtype=np.int64)) * v.dtype.itemsize
      self.base[k] = int(v.offset)

  def read(self, name: str, out: np.ndarray, offsets: np.ndarray, num_examples: np.ndarray,
           ids: np.ndarray, mask: np.ndarray) -> None:
    """Writes the real cohort clients' rows, in cohort order, into ``out`` (C-contiguous)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    rb, fd, pos = self.row_bytes[name], self.fds[name], 0
    for i, m in zip(ids.tolist(), mask.tolist()):
      n = int(num_examples[i]) if m else 0
      if n == 0:
        continue
      want = n * rb
      got = os.preadv(fd, [view[pos: pos + want]], self.base[name] + int(offsets[i]) * rb)
      if got != want:
        who = self.labels[i] if self.labels is not None else i
        who = who.item() if hasattr(who, "item") else who
        raise DiskDataError(
            f"{self.names[name]}: short read for client {who!r} (index {i}): {got} of {want} "
            "bytes. The file was truncated or replaced during the run; convert the data again.")
      pos += want

  def close(self) -> None:
    for fd in self.fds.values():
      try:
        os.close(fd)
      except OSError:
        pass
    self.fds = {}

  def __del__(self):
    self.close()


def on_disk(population: Population) -> bool:
  """Whether every feature of ``population`` is a memory-mapped file (a native population)."""
  return bool(population.features) and all(
      isinstance(v, np.memmap) for v in population.features.values())


# -- converters --------------------------------------------------------------------------------

def population_clients(population: Population) -> Iterable[tuple[Any, dict[str, np.ndarray]]]:
  """``(label, examples)`` of each client of an in-memory population, in index order."""
  offsets = np.asarray(population.offsets)
  counts = np.asarray(population.num_examples)
  feats = {k: np.asarray(v) for k, v in population.features.items()}
  labels = population.labels if population.labels is not None else np.arange(len(counts))
  for i in range(len(counts)):
    s, n = int(offsets[i]), int(counts[i])
    yield labels[i].item() if hasattr(labels[i], "item") else labels[i], {
        k: v[s: s + n] for k, v in feats.items()}


def sqlite_clients(path: str, split: str = "train", features=None):
  """``(client_id, examples)`` of a FedJAX / TFF SQLite file, read lazily one client at a time.

  Returns:
    ``(num_clients, iterator)``.
  """
  from fedjax_sim.data import sqlite

  reader = sqlite.open_federated(path, split)
  ids = reader.client_ids()

  def gen():
    try:
      for cid in ids:
        ex = reader.client(cid)
        yield cid, {k: v for k, v in ex.items() if features is None or k in features}
    finally:
      reader.close()
  return len(ids), gen()


def h5_clients(path: str, features=None):
  """``(client_id, examples)`` of a TFF h5 file (``examples/<client>/<feature>``), lazily.

  Returns:
    ``(num_clients, iterator)``.
  """
  import h5py

  f = h5py.File(path, "r")
  if "examples" not in f:
    f.close()
    raise DiskDataError(f"{path} is not in the TFF federated h5 schema: no 'examples' group.")
  ids = list(f["examples"].keys())

  def gen():
    try:
      for cid in ids:
        g = f["examples"][cid]
        yield cid, {k: np.asarray(g[k]) for k in g.keys()
                    if features is None or k in features}
    finally:
      f.close()
  return len(ids), gen()


def convert(source: str | Population, path: str, *, split: str = "train", features=None,
            empty_clients: str = "keep", overwrite: bool = False,
            progress: bool | Callable[[int, int | None], None] = False) -> str:
  """Converts a Population, a FedJAX/TFF SQLite file or a TFF h5 file into the native format.

  Args:
    source: an in-memory :class:`~fedjax_sim.Population`, or a ``.sqlite`` / ``.h5`` path.
    path: the native directory to write (atomically).
    split: the TFF SQLite split.
    features: the features to keep (default all).
    empty_clients / overwrite / progress: as in :func:`write_native`.

  Returns:
    ``path``.
  """
  if isinstance(source, Population):
    n, it = source.num_clients, population_clients(source)
    if features is not None:
      it = ((c, {k: v for k, v in ex.items() if k in features}) for c, ex in it)
  else:
    from fedjax_sim.data import sqlite

    if not os.path.exists(source):
      raise DiskDataError(f"{source} does not exist.")
    fmt = sqlite.detect_format(source)
    n, it = (h5_clients(source, features) if fmt == "h5"
             else sqlite_clients(source, split, features))
  return write_native(path, it, num_clients=n, empty_clients=empty_clients,
                      overwrite=overwrite, progress=progress)


def add_convert_command(data_sub) -> None:
  """Registers ``fedjax-sim data convert`` on the ``data`` subcommand's subparsers."""
  conv = data_sub.add_parser(
      "convert", help="convert a federated dataset (SQLite, h5) to the native disk format")
  conv.add_argument("source", help="a FedJAX / TFF SQLite file or a TFF h5 file")
  conv.add_argument("out", help="the native population directory to write")
  conv.add_argument("--split", default="train", help="TFF SQLite split")
  conv.add_argument("--features", default=None, help="comma-separated features to keep")
  conv.add_argument("--empty-clients", default="keep", choices=["keep", "drop", "error"])
  conv.add_argument("--overwrite", action="store_true", help="replace an existing directory")
  conv.add_argument("--quiet", action="store_true", help="no progress")
  conv.set_defaults(func=_convert_command)


def _convert_command(args) -> int:
  feats = None if args.features is None else [f for f in args.features.split(",") if f]
  out = convert(args.source, args.out, split=args.split, features=feats,
                empty_clients=args.empty_clients, overwrite=args.overwrite,
                progress=not args.quiet)
  pop = open_native(out)
  print(f"wrote {out}: {pop.num_clients} clients, {pop.total_examples} examples, "
        f"features {sorted(pop.features)}")
  return 0
