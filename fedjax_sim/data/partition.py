"""Host-side, seeded partitioners: split a centralised dataset into simulated clients.

Each returns ``client_ids`` (one int per example) for :meth:`Population.from_arrays`. Randomness
comes only from the ``seed`` argument (a ``np.random.Generator``), never global state.
"""

from __future__ import annotations

import numpy as np


def _check_common(num_examples: int, num_clients: int) -> None:
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive int; got {num_clients!r}.")
  if num_examples < 1:
    raise ValueError("cannot partition an empty dataset.")


def iid(num_examples: int, num_clients: int, *, seed: int = 0) -> np.ndarray:
  """Shuffles examples and deals them into ``num_clients`` near-equal clients.

  Examples:
    >>> ids = iid(10, 3, seed=0)
    >>> sorted(np.bincount(ids).tolist())
    [3, 3, 4]
  """
  _check_common(num_examples, num_clients)
  rng = np.random.default_rng(seed)
  ids = np.arange(num_examples) % num_clients
  return rng.permutation(ids).astype(np.int32)


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, *, seed: int = 0, min_examples: int = 1
) -> np.ndarray:
  """Label-skewed non-IID split (Hsu et al. 2019): each class is spread over clients ~ Dir(alpha).

  Small ``alpha`` (e.g. 0.1) gives each client few classes; large alpha approaches IID. The draw
  is repeated (with the same generator) until every client holds at least ``min_examples``.

  Args:
    labels: integer class label per example.
    num_clients: number of clients.
    alpha: Dirichlet concentration, > 0.
    seed: seed of the NumPy generator.
    min_examples: minimum examples per client (0 allows empty clients).

  Returns:
    int32 client id per example.

  References:
    Hsu, Qi, Brown, "Measuring the effects of non-identical data distribution for federated
    visual classification", 2019 (arXiv:1909.06335).

  Examples:
    >>> labels = np.repeat(np.arange(10), 50)
    >>> ids = dirichlet(labels, num_clients=5, alpha=0.5, seed=0)
    >>> ids.shape, int(np.bincount(ids).min()) >= 1
    ((500,), True)
  """
  labels = np.asarray(labels)
  _check_common(labels.shape[0], num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0; got {alpha!r}.")
  if min_examples * num_clients > labels.shape[0]:
    raise ValueError(
        f"cannot give {num_clients} clients {min_examples} examples each from "
        f"{labels.shape[0]} examples; lower num_clients or min_examples."
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(1000):
    ids = np.empty(labels.shape[0], np.int32)
    for c in classes:
      idx = np.flatnonzero(labels == c)
      rng.shuffle(idx)
      props = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(props)[:-1] * idx.shape[0]).astype(int)
      for client, part in enumerate(np.split(idx, cuts)):
        ids[part] = client
    if np.bincount(ids, minlength=num_clients).min() >= min_examples:
      return ids
  raise ValueError(
      f"no Dirichlet(alpha={alpha}) split gave every client >= {min_examples} examples in 1000 "
      "tries; raise alpha, lower num_clients or set min_examples=0."
  )
