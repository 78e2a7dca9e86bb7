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
  short = int(np.sum(np.bincount(ids, minlength=num_clients) < min_examples))
  raise ValueError(
      f"no Dirichlet(alpha={alpha}) split gave every client >= {min_examples} examples in 1000 "
      f"tries (the last left {short} clients short); raise alpha, lower num_clients, or opt in "
      "to empty clients with min_examples=0."
  )


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, *,
           seed: int = 0) -> np.ndarray:
  """Pathological non-IID split (McMahan et al. 2017): sort by label, cut into
  ``num_clients * shards_per_client`` equal shards, deal each client ``shards_per_client``.

  With 2 shards per client most clients see at most two labels.

  References:
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017.

  Examples:
    >>> ids = shards(np.repeat(np.arange(10), 20), num_clients=10, shards_per_client=2)
    >>> np.bincount(ids).tolist() == [20] * 10
    True
  """
  labels = np.asarray(labels)
  _check_common(labels.shape[0], num_clients)
  if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
    raise ValueError(f"shards_per_client must be a positive int; got {shards_per_client!r}.")
  num_shards = num_clients * shards_per_client
  if num_shards > labels.shape[0]:
    raise ValueError(
        f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards, more than "
        f"the {labels.shape[0]} examples; lower num_clients or shards_per_client."
    )
  rng = np.random.default_rng(seed)
  order = np.lexsort((rng.random(labels.shape[0]), labels))  # by label, random within a label
  shard_of = np.empty(labels.shape[0], np.int64)
  for s, part in enumerate(np.array_split(order, num_shards)):
    shard_of[part] = s
  owner = rng.permutation(num_shards) % num_clients  # shard -> client
  return owner[shard_of].astype(np.int32)


def quantity_skew(
    num_examples: int, num_clients: int, *, sigma: float = 1.0, distribution: str = "lognormal",
    seed: int = 0, min_examples: int = 1,
) -> np.ndarray:
  """IID labels but skewed client sizes: lognormal(σ) or power-law (Pareto, shape σ) sizes.

  Sizes are drawn, scaled to sum to ``num_examples`` with every client getting at least
  ``min_examples``, and examples are dealt at random.

  Examples:
    >>> ids = quantity_skew(1000, 20, sigma=1.5, seed=0)
    >>> sizes = np.bincount(ids, minlength=20)
    >>> int(sizes.sum()), int(sizes.min()) >= 1, int(sizes.max()) > 3 * int(np.median(sizes))
    (1000, True, True)
  """
  _check_common(num_examples, num_clients)
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0; got {sigma!r}.")
  if min_examples * num_clients > num_examples:
    raise ValueError(
        f"cannot give {num_clients} clients {min_examples} examples each from {num_examples} "
        "examples; lower num_clients or min_examples."
    )
  rng = np.random.default_rng(seed)
  if distribution == "lognormal":
    raw = rng.lognormal(0.0, sigma, num_clients)
  elif distribution == "power":
    raw = rng.pareto(sigma, num_clients) + 1.0
  else:
    raise ValueError(f"distribution must be 'lognormal' or 'power'; got {distribution!r}.")
  spare = num_examples - min_examples * num_clients
  extra = np.floor(raw / raw.sum() * spare).astype(np.int64)
  extra[np.argsort(-raw)[: spare - extra.sum()]] += 1  # hand out the rounding remainder
  sizes = extra + min_examples
  ids = np.repeat(np.arange(num_clients), sizes)
  return rng.permutation(ids).astype(np.int32)


def natural(ids) -> np.ndarray:
  """Uses an existing user/writer column as the partition: ids mapped to ``0..N-1`` (sorted).

  Examples:
    >>> natural(np.array(["bob", "amy", "bob"])).tolist()
    [1, 0, 1]
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] == 0:
    raise ValueError("ids must be a non-empty 1-D array with one user id per example.")
  return np.unique(ids, return_inverse=True)[1].astype(np.int32)


class PartitionStats:
  """Summary of a partition (see :func:`describe`)."""

  def __init__(self, sizes: np.ndarray, label_counts: np.ndarray | None):
    self.sizes = sizes
    self.label_counts = label_counts

  @property
  def num_clients(self) -> int:
    return int(self.sizes.shape[0])

  def as_dict(self) -> dict[str, float]:
    s = self.sizes
    out = {
        "num_clients": float(s.shape[0]), "num_examples": float(s.sum()),
        "empty_clients": float(np.sum(s == 0)), "size_min": float(s.min()),
        "size_median": float(np.median(s)), "size_mean": float(s.mean()),
        "size_max": float(s.max()), "size_cv": float(s.std() / max(s.mean(), 1e-12)),
    }
    if self.label_counts is not None:
      lc = self.label_counts
      nonempty = lc.sum(1) > 0
      p = lc[nonempty] / lc[nonempty].sum(1, keepdims=True)
      glob = lc.sum(0) / lc.sum()
      with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
      out["labels_per_client_mean"] = float(np.mean((lc[nonempty] > 0).sum(1)))
      out["label_entropy_mean"] = float(ent.mean())
      out["label_entropy_global"] = float(-np.sum(glob[glob > 0] * np.log(glob[glob > 0])))
      # Mean total-variation distance between client and global label distributions (0 = IID).
      out["label_tv_distance_mean"] = float(0.5 * np.abs(p - glob).sum(1).mean())
    return out

  def __repr__(self) -> str:
    return "PartitionStats(" + ", ".join(f"{k}={v:.3g}" for k, v in self.as_dict().items()) + ")"

  def plot(self, path: str, max_clients: int = 50, title: str = "",
           label_names=None) -> None:
    """Saves a PNG: client sizes and (if labels were given) per-client label histograms.

    Args:
      path: the PNG to write.
      max_clients: clients shown in the label panel (the first ones).
      title: the figure title (default: the number of clients).
      label_names: names of the labels in sorted order, for the legend (default: 0, 1, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if self.label_counts is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3 * rows + 0.4), squeeze=False)
    axes[0, 0].hist(self.sizes, bins=40)
    axes[0, 0].set_xlabel("examples per client")
    axes[0, 0].set_ylabel("clients")
    axes[0, 0].set_title("client sizes")
    if self.label_counts is not None:
      lc = self.label_counts[:max_clients]
      names = (list(label_names) if label_names is not None
               else [str(c) for c in range(lc.shape[1])])
      bottom = np.zeros(lc.shape[0])
      cmap = plt.get_cmap("tab20")
      for c in range(lc.shape[1]):
        axes[1, 0].bar(np.arange(lc.shape[0]), lc[:, c], bottom=bottom, color=cmap(c % 20),
                       width=1.0, label=names[c])
        bottom += lc[:, c]
      axes[1, 0].set_xlabel(f"client (first {lc.shape[0]})")
      axes[1, 0].set_ylabel("examples by label")
      axes[1, 0].set_title("label mix per client")
      axes[1, 0].legend(title="label", fontsize=7, title_fontsize=8, loc="upper left",
                        bbox_to_anchor=(1.0, 1.0), ncol=1 + lc.shape[1] // 12)
    fig.suptitle(title or f"partition of {self.num_clients} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(client_ids, labels=None, *, num_clients: int | None = None,
             plot_path: str | None = None, plot_title: str = "") -> PartitionStats:
  """Size and label-distribution statistics of a partition; optionally a PNG of histograms.

  Args:
    client_ids: each example's client id.
    labels: each example's label (optional), for the label-skew statistics.
    num_clients: N (default: the largest id + 1).
    plot_path: where to save the PNG (client sizes; label mix per client with a label legend).
    plot_title: the PNG's title.

  Returns:
    a :class:`PartitionStats` (``as_dict()`` for the numbers).

  Examples:
    >>> labels = np.repeat(np.arange(10), 100)
    >>> stats = describe(dirichlet(labels, 20, alpha=0.1, seed=0), labels)
    >>> stats.as_dict()["label_tv_distance_mean"] > describe(iid(1000, 20), labels).as_dict()[
    ...     "label_tv_distance_mean"]
    True
  """
  ids = np.asarray(client_ids)
  n = int(ids.max()) + 1 if num_clients is None else int(num_clients)
  sizes = np.bincount(ids, minlength=n)
  label_counts = None
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape[0] != ids.shape[0]:
      raise ValueError(f"labels has {labels.shape[0]} entries but client_ids {ids.shape[0]}.")
    _, lab = np.unique(labels, return_inverse=True)
    label_counts = np.zeros((n, lab.max() + 1), np.int64)
    np.add.at(label_counts, (ids, lab), 1)
  stats = PartitionStats(sizes, label_counts)
  if plot_path is not None:
    names = None if labels is None else [str(v) for v in np.unique(labels)]
    stats.plot(plot_path, title=plot_title, label_names=names)
  return stats
