"""Loaders that feed the CSR :class:`~fedjax_sim.Population`.

* FedJAX's and TFF's SQLite federated datasets (:mod:`fedjax_sim.data.sqlite`): the known dataset
  helpers below take a TFF h5, FedJAX SQLite or TFF SQLite path alike (the format is detected
  from the file); :func:`from_fedjax_sqlite` reads any FedJAX / TFF SQLite file.
* Federated h5 files in the TFF / FedJAX schema, ``examples/<client_id>/<feature>``: EMNIST-62
  (``pixels``, ``label``), Shakespeare (``snippets``), StackOverflow (``tokens``, ``tags``, ...),
  CIFAR-100 (``image``, ``label``, ``coarse_label``). The files are the ones TFF publishes
  (``tff.simulation.datasets.<name>.load_data`` downloads them from
  ``https://storage.googleapis.com/tff-datasets-public/<name>.tar.bz2``: ``fed_emnist.tar.bz2``,
  ``shakespeare.tar.bz2``, ``stackoverflow.tar.bz2``, ``fed_cifar100.tar.bz2``); fedjax_sim never
  downloads anything itself. h5 files are read whole into host memory, then copied to the device
  once; for a file larger than host RAM pass ``client_names`` / ``max_clients`` to load a subset.
* scikit-learn's bundled real datasets (digits, iris, wine, breast_cancer), split over clients.
* LEAF's Synthetic(α, β) generator; pandas data frames; Hugging Face ``datasets`` (any object with
  column access).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_sim import _validation
from fedjax_sim.data import partition as _partition
from fedjax_sim.data import sqlite as _sqlite
from fedjax_sim.data.population import Population

# -- h5 (TFF / FedJAX schema) -------------------------------------------------------------------


def read_h5(
    path: str,
    features: Sequence[str],
    *,
    client_names: Sequence[str] | None = None,
    max_clients: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
  """Reads a federated h5 file with groups ``examples/<client_id>/<feature>``.

  Args:
    path: the h5 file.
    features: feature datasets to read for every client.
    client_names: read only these clients (in this order); default all, in sorted order.
    max_clients: read at most this many clients (after ``client_names``).

  Returns:
    ``(features, client_index, names)``: flat arrays ``[total, ...]``, the client index of each
    example, and the client names (index -> name).

  Raises:
    ValueError: if the file does not follow the schema, naming the keys expected and found.
  """
  import h5py

  with h5py.File(path, "r") as f:
    if "examples" not in f:
      raise ValueError(
          f"{path} is not in the TFF federated h5 schema: expected a top-level group "
          f"'examples' (examples/<client_id>/<feature>); found keys {sorted(f.keys())}."
      )
    group = f["examples"]
    names = sorted(group.keys()) if client_names is None else [str(c) for c in client_names]
    if len(set(names)) < len(names):
      repeated = sorted({n for n in names if names.count(n) > 1})
      raise ValueError(f"{path}: client_names list {repeated} more than once; a client read "
                       "twice would be sampled and weighted twice. Pass each client once.")
    if max_clients is not None:
      names = names[: int(max_clients)]
    if not names:
      raise ValueError(f"{path} has no clients under 'examples'.")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in features}
    sizes = []
    for name in names:
      if name not in group:
        raise ValueError(f"client {name!r} is not in {path}.")
      client = group[name]
      missing = [k for k in features if k not in client]
      if missing:
        raise ValueError(
            f"{path}: client {name!r} lacks features {missing}; expected {list(features)}, "
            f"found {sorted(client.keys())}."
        )
      lengths = {k: client[k].shape[0] for k in features}
      if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: client {name!r} features have different lengths {lengths}.")
      for k in features:
        parts[k].append(client[k][()])
      sizes.append(next(iter(lengths.values())))
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  index = np.repeat(np.arange(len(names)), sizes)
  return arrays, index, names


def read_federated(
    path: str, features: Sequence[str], *, client_names: Sequence | None = None,
    max_clients: int | None = None, split: str = "train",
) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
  """Reads a TFF h5, FedJAX SQLite or TFF SQLite file (detected from its contents).

  Args:
    path: the file.
    features: features to read for every client.
    client_names: read only these clients (in this order).
    max_clients: read at most this many clients.
    split: the split of a TFF SQLite file (``"train"`` / ``"test"``); h5 and FedJAX files hold
      one split per file, so any split other than the default ``"train"`` is refused for them.

  Returns:
    ``(features, client_index, names)`` as :func:`read_h5`.
  """
  path = os.path.expanduser(os.fspath(path))
  if _sqlite.detect_format(path) == "h5":
    _sqlite.check_split(path, "h5", split)
    return read_h5(path, features, client_names=client_names, max_clients=max_clients)
  return _sqlite.read_sqlite(path, features, client_names=client_names,
                             max_clients=max_clients, split=split)


def _population(arrays, index, names) -> Population:
  pop = Population.from_arrays(arrays, index, num_clients=len(names))
  pop.labels = _labels(names)
  return pop


def _labels(names) -> np.ndarray:
  """Client ids as a host array; bytes ids (FedJAX) stay whole in an object array."""
  if names and isinstance(names[0], bytes):
    out = np.empty(len(names), dtype=object)
    out[:] = names
    return out
  return np.asarray(names)


def emnist(path: str, *, invert: bool = False, **kwargs) -> Population:
  """Federated EMNIST-62: ``pixels`` [n, 28, 28] float32 and ``label``, one client per writer.

  Reads TFF h5, FedJAX SQLite (``federated_emnist_{train,test}.sqlite``) or TFF SQLite (``pixels``
  as 784 floats) alike.

  Args:
    path: the file.
    invert: ``x = 1 - pixels`` as FedJAX's ``fedjax.datasets.emnist.load_data`` does (TFF and
      fedjax_sim keep ``pixels`` as stored).
    **kwargs: ``client_names``, ``max_clients``, ``split`` (see :func:`read_federated`).

  Returns:
    A population with ``x`` ``[n, 28, 28, 1]`` float32 and ``y`` int32.
  """
  arrays, index, names = read_federated(path, ["pixels", "label"], **kwargs)
  _check_example_size(path, "pixels", arrays["pixels"], 28 * 28, "EMNIST's 28x28")
  x = arrays["pixels"].astype(np.float32).reshape(-1, 28, 28)[..., None]
  if invert:
    x = 1.0 - x
  return _population({"x": x, "y": arrays["label"].astype(np.int32)}, index, names)


def _check_example_size(path, feature, values, size, what) -> None:
  got = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1
  if got != size:
    raise _sqlite.FederatedFileError(
        f"{path}: feature {feature!r} holds {got} values per example, not {what} ({size}); "
        "this file is another dataset (read it with fs.datasets.from_fedjax_sqlite or "
        "read_federated).")


def cifar100(path: str, *, label: str = "label", **kwargs) -> Population:
  """Federated CIFAR-100 (``image`` uint8 [n, 32, 32, 3], ``label``, ``coarse_label``).

  Reads TFF h5, FedJAX SQLite or TFF SQLite (``image`` as 3072 int64) alike.
  ``x`` is float32 in [0, 1]; ``y`` is the fine ``label`` (or ``label="coarse_label"``).

  Returns:
    The population.
  """
  if label not in ("label", "coarse_label"):
    raise ValueError(f"label must be 'label' or 'coarse_label'; got {label!r}.")
  arrays, index, names = read_federated(path, ["image", label], **kwargs)
  _check_example_size(path, "image", arrays["image"], 32 * 32 * 3, "CIFAR's 32x32x3")
  x = arrays["image"].reshape(-1, 32, 32, 3).astype(np.float32) / 255.0
  return _population({"x": x, "y": arrays[label].astype(np.int32)}, index, names)


# Character vocabulary for Shakespeare next-character prediction: 0 pad, 1 beginning of snippet,
# 2 end, 3 out of vocabulary, then printable ASCII.
PAD, BOS, EOS, OOV = 0, 1, 2, 3
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n\t"
CHAR_TO_ID = {c: i + 4 for i, c in enumerate(CHARS)}
SHAKESPEARE_VOCAB_SIZE = len(CHARS) + 4


def encode_text(text: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``[BOS] + chars + [EOS]`` cut into windows: inputs ``x`` and next-char targets ``y``
  ``[num_windows, seq_len]`` (PAD-padded; PAD targets carry no loss)."""
  ids = [BOS] + [CHAR_TO_ID.get(c, OOV) for c in text] + [EOS]
  windows = []
  for start in range(0, max(len(ids) - 1, 1), seq_len):
    w = ids[start : start + seq_len + 1]
    w = w + [PAD] * (seq_len + 1 - len(w))
    windows.append(w)
  arr = np.asarray(windows, np.int32)
  return arr[:, :-1], arr[:, 1:]


def decode_text(ids) -> str:
  inv = {i: c for c, i in CHAR_TO_ID.items()}
  return "".join(inv.get(int(i), "") for i in ids)


def _decode(s, path: str, client, feature: str) -> str:
  """A text feature's value as ``str``; invalid UTF-8 names the file, client and feature."""
  if not isinstance(s, bytes):
    return str(s)
  try:
    return s.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _sqlite.FederatedFileError(
        f"{path}: client {client!r}: feature {feature!r} holds bytes that are not valid UTF-8 "
        f"({e.reason} at byte {e.start} of {s[:40]!r}); the file is corrupt or not in the "
        "dataset's encoding.") from None


def text_population(client_texts: Sequence[Sequence[str]], seq_len: int = 80,
                    names: Sequence[str] | None = None) -> Population:
  """Population for next-character prediction from each client's list of text snippets."""
  seq_len = _validation.positive_int("seq_len", seq_len)
  xs, ys, index = [], [], []
  for c, snippets in enumerate(client_texts):
    for s in snippets:
      x, y = encode_text(s, seq_len)
      xs.append(x)
      ys.append(y)
      index.append(np.full(x.shape[0], c))
  if not xs:
    raise ValueError("no text: every client's snippet list is empty.")
  pop = Population.from_arrays({"x": np.concatenate(xs), "y": np.concatenate(ys)},
                               np.concatenate(index), num_clients=len(client_texts))
  if names is not None:
    pop.labels = _labels(list(names))
  return pop


def tiny_shakespeare(seq_len: int = 80) -> Population:
  """A small bundled public-domain Shakespeare text, one client per role (10 roles), for
  next-character prediction without downloading anything (see :func:`shakespeare` for the
  federated Shakespeare h5 of TFF/LEAF)."""
  from importlib import resources

  text = resources.files("fedjax_sim.data").joinpath("assets/shakespeare_tiny.txt").read_text()
  roles: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if line.startswith("#") or not line.strip():
      continue
    if line.startswith("== "):
      current = line[3:].strip()
      roles[current] = []
    elif current is not None:
      roles[current].append(line.strip())
  return text_population(list(roles.values()), seq_len, list(roles))


def shakespeare(path: str, *, seq_len: int = 80, **kwargs) -> Population:
  """Federated Shakespeare (``snippets`` byte strings), one client per speaking role.

  Reads TFF h5, FedJAX SQLite or TFF SQLite alike.

  Next-character prediction: ``x``, ``y`` int32 ``[n, seq_len]`` with the character vocabulary
  above (``SHAKESPEARE_VOCAB_SIZE`` ids, PAD = 0).
  """
  seq_len = _validation.positive_int("seq_len", seq_len)
  arrays, index, names = read_federated(path, ["snippets"], **kwargs)
  texts: list[list[str]] = [[] for _ in names]
  for s, c in zip(arrays["snippets"], index, strict=True):
    texts[c].append(_decode(s, path, names[c], "snippets"))
  return text_population(texts, seq_len, names)


def _split_words(s) -> list[str]:
  return (s.decode("utf-8") if isinstance(s, bytes) else str(s)).split()


def stackoverflow(
    path: str, *, vocab: Sequence[str] | None = None, vocab_size: int = 10_000,
    tags: Sequence[str] | None = None, num_tags: int = 500, max_tokens: int = 30, **kwargs,
) -> tuple[Population, list[str], list[str]]:
  """Federated StackOverflow tag prediction (``tokens``, ``tags`` byte strings).

  Reads TFF h5, FedJAX SQLite or TFF SQLite alike.

  ``x``: int32 ``[n, max_tokens]`` word ids (0 pad, 1 out of vocabulary, words from 2); ``y``:
  float32 multi-hot ``[n, num_tags]`` over the tag vocabulary (tags joined by ``|`` as in TFF).
  Vocabularies default to the most frequent words / tags in the file (pass the published ones
  for comparability).

  Returns:
    ``(population, word_vocab, tag_vocab)``.
  """
  from collections import Counter

  arrays, index, names = read_federated(path, ["tokens", "tags"], **kwargs)
  arrays = {k: [_decode(s, path, names[c], k) for s, c in zip(arrays[k], index, strict=True)]
            for k in ("tokens", "tags")}
  if vocab is None:
    counts = Counter(w for s in arrays["tokens"] for w in _split_words(s))
    vocab = [w for w, _ in counts.most_common(vocab_size)]
  if tags is None:
    counts = Counter(t for s in arrays["tags"] for t in s.split("|") if t)
    tags = [t for t, _ in counts.most_common(num_tags)]
  word_id = {w: i + 2 for i, w in enumerate(vocab)}
  tag_id = {t: i for i, t in enumerate(tags)}
  n = len(arrays["tokens"])
  x = np.zeros((n, max_tokens), np.int32)
  y = np.zeros((n, len(tags)), np.float32)
  for i, (tok, tg) in enumerate(zip(arrays["tokens"], arrays["tags"], strict=True)):
    ids = [word_id.get(w, 1) for w in _split_words(tok)][:max_tokens]
    x[i, : len(ids)] = ids
    for t in tg.split("|"):
      if t in tag_id:
        y[i, tag_id[t]] = 1.0
  return _population({"x": x, "y": y}, index, names), list(vocab), list(tags)


def stackoverflow_nwp(
    path: str, *, vocab: Sequence[str] | None = None, vocab_size: int = 10_000,
    seq_len: int = 20, **kwargs,
) -> tuple[Population, list[str]]:
  """Federated Stack Overflow next-word prediction, tokenized as FedJAX does.

  Reads TFF h5, FedJAX SQLite or TFF SQLite alike (the ``tokens`` feature). Each sentence
  becomes ``[BOS] + word ids + [EOS]``, split into ``x = ids[:-1]`` and ``y = ids[1:]`` and
  padded / truncated to ``seq_len`` (20, as FedJAX's ``STACKOVERFLOW_WORD`` task and Reddi et
  al. 2021): PAD 0, BOS 1, EOS 2, the i-th vocabulary word ``i + 3``, out of vocabulary
  ``vocab_size + 3`` (FedJAX's ``DefaultWordTokenizer`` with one OOV bucket), so the ids fit
  :class:`fedjax_sim.zoo.StackOverflowLSTM` ``(vocab_size)``. The vocabulary defaults to the
  file's most frequent words (pass FedJAX's published ``stackoverflow.word_count`` list for
  comparability).

  Args:
    path: the file.
    vocab: the word list (without special tokens); None: the ``vocab_size`` most frequent.
    vocab_size: words in the vocabulary when ``vocab`` is None.
    seq_len: length of ``x`` and ``y``.
    **kwargs: passed to :func:`read_federated` (``client_ids``, ``max_clients``, ``split``).

  Returns:
    ``(population, vocab)``; features ``x``, ``y`` int32 ``[n, seq_len]``.

  References:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021; FedJAX
    ``fedjax/datasets/stackoverflow.py``.
  """
  from collections import Counter

  seq_len = _validation.positive_int("seq_len", seq_len)
  arrays, index, names = read_federated(path, ["tokens"], **kwargs)
  sentences = [_decode(s, path, names[c], "tokens") for s, c in zip(arrays["tokens"], index,
                                                                     strict=True)]
  if vocab is None:
    counts = Counter(w for s in sentences for w in _split_words(s))
    vocab = [w for w, _ in counts.most_common(vocab_size)]
  vocab = list(vocab)
  word_id = {w: i + 3 for i, w in enumerate(vocab)}
  oov = len(vocab) + 3
  n = len(sentences)
  x = np.zeros((n, seq_len), np.int32)
  y = np.zeros((n, seq_len), np.int32)
  for i, s in enumerate(sentences):
    ids = [1] + [word_id.get(w, oov) for w in _split_words(s)] + [2]
    xs, ys = ids[:-1][:seq_len], ids[1:][:seq_len]
    x[i, : len(xs)] = xs
    y[i, : len(ys)] = ys
  return _population({"x": x, "y": y}, index, names), vocab


def cifar10_pfl(
    path: str, *, examples_per_user: int = 50, seed: int = 0, channel_stats=None,
) -> tuple[Population, tuple[np.ndarray, np.ndarray]]:
  """CIFAR-10 split into IID users as pfl-research's ``cifar10_iid`` benchmark does.

  Reads one of pfl-research's pickles (``benchmarks/dataset/cifar10/download_preprocess.py``
  writes ``cifar10_train.p`` / ``cifar10_test.p``: a pickled ``(images, labels)`` pair, images
  ``[n, 32, 32, 3]``), normalizes each channel by the training set's mean and standard
  deviation (``load_and_preprocess``), shuffles the examples and cuts them into users of
  ``examples_per_user`` (``mean_datapoints_per_user: 50``,
  ``datapoints_per_user_distribution: constant``; the last user keeps the remainder). Only
  open pickles you trust: unpickling runs code.

  Args:
    path: the pickle.
    examples_per_user: examples of each user (50 in pfl's ``baseline.yaml``).
    seed: seed of the shuffle.
    channel_stats: ``(means, stds)`` to normalize with (the training set's, for a test file);
      None: this file's own.

  Returns:
    ``(population, (means, stds))``: ``x`` float32 ``[n, 32, 32, 3]``, ``y`` int32.

  References:
    Granqvist et al., "pfl-research: simulation framework for accelerating research in Private
    Federated Learning", 2024 (``benchmarks/image_classification/configs/baseline.yaml``).
  """
  import pickle

  examples_per_user = _validation.positive_int("examples_per_user", examples_per_user)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} does not exist: pfl-research's cifar10_train.p (run "
                            "its `python -m dataset.cifar10.download_preprocess`).")
  with open(path, "rb") as f:
    try:
      images, labels = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
      raise ValueError(f"{path!r} is not pfl-research's (images, labels) pickle: "
                       f"{type(e).__name__}: {e}") from None
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels).reshape(-1).astype(np.int32)
  if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
    raise ValueError(f"{path!r}: expected images [n, 32, 32, 3] and n labels; got "
                     f"{images.shape} and {labels.shape}.")
  if channel_stats is None:
    channel_stats = (images.mean(axis=(0, 1, 2), dtype=np.float64),
                     images.std(axis=(0, 1, 2), dtype=np.float64))
  means, stds = (np.asarray(v, np.float64) for v in channel_stats)
  x = ((images - means) / stds).astype(np.float32)
  order = np.random.default_rng(seed).permutation(len(labels))
  ids = np.arange(len(labels)) // examples_per_user
  return (Population.from_arrays({"x": x[order], "y": labels[order]}, ids,
                                 num_clients=int(ids[-1]) + 1), (means, stds))


def from_fedjax_sqlite(
    path: str, client_ids: Sequence | None = None, max_clients: int | None = None, *,
    split: str = "train", **kwargs,
) -> Population:
  """A :class:`Population` from a FedJAX SQLite or TFF SQLite federated dataset.

  FedJAX's feature names are mapped to fedjax_sim's conventions by the dataset they identify:
  EMNIST (``pixels``, ``label``) -> :func:`emnist`; CIFAR-100 (``image``, ``label``) ->
  :func:`cifar100`; Shakespeare (``snippets``) -> :func:`shakespeare`; Stack Overflow
  (``tokens``, ``tags``) -> :func:`stackoverflow`, whose vocabularies are built from this file
  unless ``vocab=`` / ``tags=`` are passed (to read a test file with the train file's
  vocabularies, call :func:`stackoverflow`, which returns them); any other
  file's numeric features keep their names. Only the requested clients are read (one query
  each), so a subset of a file larger than memory can be loaded; for per-client access without
  building a population use :func:`fedjax_sim.data.sqlite.open_federated`.

  Args:
    path: a FedJAX (``fedjax.SQLiteFederatedData``) or TFF SQLite file.
    client_ids: read only these clients, in this order (FedJAX ids are ``bytes``; ``str`` is
      encoded as UTF-8). Default: all, in the order FedJAX lists them.
    max_clients: read at most this many clients.
    split: the split of a TFF SQLite file (``"train"`` / ``"test"``).
    **kwargs: forwarded to the dataset helper (e.g. ``seq_len``, ``invert``, ``label``).

  Returns:
    The population; ``labels`` holds the client ids.

  Raises:
    FileNotFoundError / ValueError: naming the file (and the client) for a missing file, a file
      that is not SQLite, another schema, a corrupt blob or an unknown client id; nothing
      partially loaded is returned.

  Examples:
    >>> import os, sqlite3, tempfile, zlib
    >>> from fedjax_sim.data import sqlite as fsql
    >>> path = os.path.join(tempfile.mkdtemp(), "emnist.sqlite")
    >>> ex = {"pixels": np.zeros((2, 28, 28), np.float32), "label": np.array([3, 5], np.int32)}
    >>> with sqlite3.connect(path) as db:
    ...   _ = db.execute(fsql.FEDJAX_SCHEMA)
    ...   _ = db.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
    ...                  (b"f0000_00", zlib.compress(fsql.msgpack_serialize(ex)), 2))
    >>> pop = from_fedjax_sqlite(path)
    >>> pop.features["x"].shape, pop.client(0)["y"].tolist()
    ((2, 28, 28, 1), [3, 5])
  """
  if _sqlite.detect_format(path) == "h5":
    raise _sqlite.FederatedFileError(
        f"{path} is a TFF h5 file, not SQLite; read it with fs.datasets.emnist / shakespeare / "
        "stackoverflow / cifar100 or read_h5.")
  if isinstance(client_ids, (str, bytes)):
    raise TypeError(f"client_ids must be a sequence of client ids (e.g. [{client_ids!r}]), not "
                    "one id: a string would be read as one id per character.")
  opts = dict(client_names=client_ids, max_clients=max_clients, split=split)
  with _sqlite.open_federated(path, split) as reader:
    ids = reader.client_ids() if client_ids is None else list(client_ids)
    if not ids:
      raise _sqlite.FederatedFileError(f"{path} has no clients to read.")
    sizes = reader.num_examples(ids)
    names = set(reader.client(ids[int(np.argmax(sizes > 0))]))
  if {"pixels", "label"} <= names:
    return emnist(path, **opts, **kwargs)
  if {"image", "label"} <= names:
    return cifar100(path, **opts, **kwargs)
  if "snippets" in names:
    return shakespeare(path, **opts, **kwargs)
  if {"tokens", "tags"} <= names:
    return stackoverflow(path, **opts, **kwargs)[0]
  arrays, index, cids = _sqlite.read_sqlite(path, **opts)
  text = [k for k, v in arrays.items() if v.dtype == object]
  if text:
    raise _sqlite.FederatedFileError(
        f"{path}: features {text} hold bytes and the file is not a known dataset (EMNIST, "
        "CIFAR-100, Shakespeare, Stack Overflow); read the clients with "
        "fedjax_sim.data.sqlite.open_federated and encode the text yourself.")
  return _population(arrays, index, cids)


# -- bundled and generated data -----------------------------------------------------------------

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")


def sklearn_dataset(
    name: str, num_clients: int, *, alpha: float | None = 0.5, test_fraction: float = 0.2,
    seed: int = 0, min_examples: int = 1,
) -> tuple[Population, dict[str, np.ndarray]]:
  """A scikit-learn bundled real dataset split over ``num_clients`` clients.

  Features are scaled (digits / 16; the others standardised with train statistics). The train
  part is partitioned Dirichlet(``alpha``) by label, or IID with ``alpha=None``; the held-out
  test part is returned as centralized arrays.

  Returns:
    ``(train_population, {"x": x_test, "y": y_test})``.

  Examples:
    >>> pop, test = sklearn_dataset("iris", num_clients=5, seed=0)
    >>> pop.num_clients, test["x"].shape[1]
    (5, 4)
  """
  from sklearn import datasets as skd
  from sklearn.model_selection import train_test_split

  loaders = {"digits": skd.load_digits, "iris": skd.load_iris, "wine": skd.load_wine,
             "breast_cancer": skd.load_breast_cancer}
  if name not in loaders:
    raise ValueError(f"unknown dataset {name!r}; choose one of {SKLEARN_DATASETS}.")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction!r}.")
  d = loaders[name]()
  x, y = d.data.astype(np.float32), d.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                        stratify=y)
  if name == "digits":
    xtr, xte = xtr / 16.0, xte / 16.0
  else:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  if alpha is None:
    ids = _partition.iid(len(ytr), num_clients, seed=seed)
  else:
    ids = _partition.dirichlet(ytr, num_clients, alpha, seed=seed, min_examples=min_examples)
  pop = Population.from_arrays({"x": xtr.astype(np.float32), "y": ytr}, ids,
                               num_clients=num_clients)
  return pop, {"x": xte.astype(np.float32), "y": yte}


def softmax_regression_synthetic(
    alpha: float, beta: float, *, num_clients: int = 30, dim: int = 60, num_classes: int = 10,
    seed: int = 0, mean_examples: float = 50.0, iid: bool = False,
) -> Population:
  """Per-client softmax-regression tasks in the style of FedProx's Synthetic(α, β) (not exact).

  **Not** the distribution of the FedProx / q-FFL papers' figures: here α and β are variances
  (``u_k ~ N(0, √α)`` as a standard deviation), sizes are ``lognormal(log 50, 1)`` with at least
  10 examples, and the IID variant draws ``v = 0`` per client from a separate stream. Use
  :func:`fedprox_synthetic` to compare with published results. (Also available under its former
  name ``leaf_synthetic``.)

  Client k draws ``u_k ~ N(0, α)``, ``B_k ~ N(0, β)``; its model ``W_k, b_k ~ N(u_k, 1)`` and
  inputs ``x ~ N(v_k, Σ)`` with ``v_k ~ N(B_k, 1)`` and ``Σ = diag(j^-1.2)``; labels
  ``argmax softmax(W_k x + b_k)``. α controls how much the local models differ, β how much the
  local data differ. ``iid=True`` gives every client the same model and input distribution.
  Client sizes are lognormal (power-law-like), at least 10 examples.

  References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020; Caldas et al., "LEAF", 2018.

  Examples:
    >>> pop = softmax_regression_synthetic(1.0, 1.0, num_clients=8, seed=0)
    >>> pop.num_clients, pop.features["x"].shape[1]
    (8, 60)
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0; got {alpha!r}, {beta!r}.")
  rng = np.random.default_rng(seed)
  sizes = np.maximum(rng.lognormal(np.log(mean_examples), 1.0, num_clients).astype(int), 10)
  cov = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
  w_global = rng.normal(0, 1, (dim, num_classes))
  b_global = rng.normal(0, 1, num_classes)
  xs, ys = [], []
  for k in range(num_clients):
    if iid:
      w, b, v = w_global, b_global, np.zeros(dim)
    else:
      u = rng.normal(0, np.sqrt(alpha))
      big_b = rng.normal(0, np.sqrt(beta))
      w = rng.normal(u, 1, (dim, num_classes))
      b = rng.normal(u, 1, num_classes)
      v = rng.normal(big_b, 1, dim)
    x = rng.multivariate_normal(v, cov, sizes[k])
    ys.append(np.argmax(x @ w + b, axis=1))
    xs.append(x)
  return Population.from_arrays(
      {"x": np.concatenate(xs).astype(np.float32), "y": np.concatenate(ys).astype(np.int32)},
      np.repeat(np.arange(num_clients), sizes), num_clients=num_clients)


# The former name (examples, configs and tests use it): the same generator.
leaf_synthetic = softmax_regression_synthetic


def fedprox_synthetic(
    alpha: float, beta: float, *, iid: bool = False, num_devices: int = 30, dim: int = 60,
    num_classes: int = 10, train_fraction: float = 0.9, seed: int = 0,
) -> tuple[Population, Population]:
  """FedProx's Synthetic(α, β) and Synthetic-IID, as its ``generate_synthetic.py`` draws them.

  Follows the code that produced the FedProx (Li et al., MLSys 2020, Fig. 1-2) and q-FFL (Li et
  al., ICLR 2020, Table 2) figures (repository ``litian96/FedProx``, files
  ``data/synthetic_{0_0,0.5_0.5,1_1}/generate_synthetic.py`` and
  ``data/synthetic_iid/generate_iid.py``):

  * device sizes ``n_k = int(lognormal(4, 2)) + 50`` (mean of the log 4, its std 2);
  * ``u_k ~ N(0, α)`` and ``B_k ~ N(0, β)`` with α and β the **standard deviations**;
  * ``W_k ~ N(u_k, 1)`` ``[dim, classes]`` and ``b_k ~ N(u_k, 1)``: the *same* ``u_k`` for both;
  * ``v_k ~ N(B_k, 1)`` ``[dim]``; ``x ~ N(v_k, Σ)``, ``Σ = diag(j^-1.2)``, ``j = 1..dim``;
  * ``y = argmax softmax(x W_k + b_k)``;
  * IID: one ``W, b ~ N(0, 1)`` for all devices and ``v_k = 0``;
  * each device's examples shuffled and split ``int(0.9 n_k)`` train / the rest test.

  Where the paper's text and its code differ: the paper writes ``u_k ~ N(0, α)``,
  ``B_k ~ N(0, β)`` in the usual (mean, variance) notation, but the code passes α and β to
  ``np.random.normal`` as standard deviations; the paper says sizes "follow a power law", the
  code draws ``lognormal(4, 2) + 50``. This function follows the code. It draws from
  ``np.random.default_rng(seed)`` rather than the legacy global generator, so it reproduces the
  distribution, not the original files' exact values (which depended on an unseeded global RNG).

  Args:
    alpha: how much the local models differ (std of ``u_k``); ignored when ``iid``.
    beta: how much the local inputs differ (std of ``B_k``); ignored when ``iid``.
    iid: Synthetic-IID (``generate_iid.py``).
    num_devices: 30 in the papers.
    dim: 60 in the papers.
    num_classes: 10 in the papers.
    train_fraction: each device's train share (0.9 in the papers; ``int(f * n_k)`` examples).
    seed: seed of the generator.

  Returns:
    ``(train, test)`` populations over the same ``num_devices`` clients, features ``x``
    float32 ``[dim]`` and ``y`` int32 (``test`` is None when ``train_fraction=1``).

  Note:
    In this generator α does not change the data: ``u_k`` is added to every entry of ``W_k``
    and ``b_k``, so it adds ``u_k (Σ_j x_j + 1)`` to every class's logit alike and the argmax
    is unchanged. Devices differ through their own ``W_k - u_k`` (drawn N(0, 1) whatever α) and
    through β. With one seed, Synthetic(0, β) and Synthetic(1, β) have the same examples and
    labels (up to floating-point ties); the papers' (0, 0) / (0.5, 0.5) / (1, 1) differ by β.

  References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020 (Section 5.1); Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation
    in Federated Learning", ICLR 2020.

  Examples:
    >>> train, test = fedprox_synthetic(0.5, 0.5, seed=0)
    >>> train.num_clients, train.features["x"].shape[1], int(train.num_examples.min()) >= 45
    (30, 60, True)
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0 (standard deviations); got {alpha!r}, "
                     f"{beta!r}.")
  if not 0 < train_fraction <= 1:
    raise ValueError(f"train_fraction must lie in (0, 1]; got {train_fraction!r}.")
  if num_devices < 1 or dim < 1 or num_classes < 2:
    raise ValueError(f"need num_devices >= 1, dim >= 1, num_classes >= 2; got {num_devices}, "
                     f"{dim}, {num_classes}.")
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
  sd = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of diag(j^-1.2)
  if iid:
    w_all = rng.normal(0, 1, (dim, num_classes))
    b_all = rng.normal(0, 1, num_classes)
    mean_x = np.zeros((num_devices, dim))
  else:
    u = rng.normal(0, alpha, num_devices)
    big_b = rng.normal(0, beta, num_devices)
    mean_x = rng.normal(big_b[:, None], 1, (num_devices, dim))
  parts = {"train": ([], [], []), "test": ([], [], [])}
  for k in range(num_devices):
    if iid:
      w, b = w_all, b_all
    else:
      w = rng.normal(u[k], 1, (dim, num_classes))
      b = rng.normal(u[k], 1, num_classes)
    x = mean_x[k] + sd * rng.standard_normal((sizes[k], dim))  # N(v_k, diag(j^-1.2))
    y = np.argmax(x @ w + b, axis=1)
    perm = rng.permutation(sizes[k])
    x, y = x[perm], y[perm]
    cut = int(train_fraction * sizes[k])
    for name, sl in (("train", slice(0, cut)), ("test", slice(cut, None))):
      xs, ys, ids = parts[name]
      xs.append(x[sl])
      ys.append(y[sl])
      ids.append(np.full(len(y[sl]), k))
  out = []
  for name in ("train", "test"):
    xs, ys, ids = parts[name]
    if not sum(len(y) for y in ys):
      out.append(None)
      continue
    pop = Population.from_arrays(
        {"x": np.concatenate(xs).astype(np.float32), "y": np.concatenate(ys).astype(np.int32)},
        np.concatenate(ids), num_clients=num_devices)
    out.append(pop)
  return out[0], out[1]


def from_pandas(df: Any, client_column: str, feature_columns: Mapping[str, Any]) -> Population:
  """Population from a pandas DataFrame with one row per example.

  Args:
    df: the frame.
    client_column: column with the user / device id (any hashable values).
    feature_columns: ``{feature name: column name or list of column names}``; a list is stacked
      into a vector feature.
  """
  return _from_columns(lambda c: np.asarray(df[c]), list(df.columns), client_column,
                       feature_columns)


def from_hf_dataset(ds: Any, client_column: str, feature_columns: Mapping[str, Any]) -> Population:
  """Population from a Hugging Face ``datasets.Dataset`` (or anything with ``ds[column]``).

  Columns are read whole (``ds[column]``) into host memory; nothing is downloaded here.
  """
  names = list(getattr(ds, "column_names", None) or list(ds.keys()))
  return _from_columns(lambda c: np.asarray(ds[c]), names, client_column, feature_columns)


def _from_columns(get, columns, client_column, feature_columns) -> Population:
  wanted = [client_column] + [c for v in feature_columns.values()
                              for c in ([v] if isinstance(v, str) else v)]
  missing = [c for c in wanted if c not in columns]
  if missing:
    raise ValueError(f"columns {missing} not found; available: {columns}.")
  feats = {}
  for name, cols in feature_columns.items():
    feats[name] = get(cols) if isinstance(cols, str) else np.stack([get(c) for c in cols], -1)
  labels, index = np.unique(get(client_column), return_inverse=True)
  pop = Population.from_arrays(feats, index, num_clients=len(labels))
  pop.labels = labels
  return pop


def split_clients(
    population: Population, test_fraction: float = 0.2, *, seed: int = 0
) -> tuple[Population, Population]:
  """Splits every client's examples into a train and a test part (per-client held-out data).

  Each client with n examples keeps ``ceil(n * (1 - test_fraction))`` for training (so a client
  with one example keeps it for training); both populations keep the same client numbering.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction!r}.")
  rng = np.random.default_rng(seed)
  feats = {k: np.asarray(v) for k, v in population.features.items()}
  offsets = np.asarray(population.offsets)
  sizes = np.asarray(population.num_examples)
  # Vectorised over all clients: a random order within each client (rows are stored client by
  # client), then the first ceil(n (1 - f)) rows of each client go to training.
  owner = np.repeat(np.arange(population.num_clients), sizes)
  order = np.lexsort((rng.random(owner.size), owner))
  rank = np.arange(owner.size) - offsets[owner]
  keep = np.ceil(sizes * (1 - test_fraction)).astype(np.int64)
  in_train = rank < keep[owner]
  train_rows, test_rows = order[in_train], order[~in_train]
  train_ids, test_ids = owner[in_train], owner[~in_train]
  out = []
  for rows, ids in ((train_rows, train_ids), (test_rows, test_ids)):
    if rows.size == 0:
      raise ValueError("the split leaves one side empty; change test_fraction.")
    pop = Population.from_arrays({k: v[rows] for k, v in feats.items()}, ids,
                                 num_clients=population.num_clients)
    pop.labels = population.labels
    out.append(pop)
  return out[0], out[1]
