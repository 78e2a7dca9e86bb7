"""Partitioners, h5 loaders (TFF schema), bundled data, splits, evaluation and the model zoo."""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import datasets

LABELS = np.repeat(np.arange(10), 200)


@pytest.mark.parametrize("make", [
    lambda s: fs.partition.iid(2000, 25, seed=s),
    lambda s: fs.partition.dirichlet(LABELS, 25, 0.3, seed=s),
    lambda s: fs.partition.shards(LABELS, 25, 2, seed=s),
    lambda s: fs.partition.quantity_skew(2000, 25, sigma=1.0, seed=s),
])
def test_partitioners_deterministic_and_complete(make):
  a, b, c = make(0), make(0), make(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == (2000,) and a.min() >= 0 and a.max() < 25  # every example exactly once
  assert np.bincount(a, minlength=25).min() >= 1


def test_dirichlet_alpha_controls_label_skew():
  tv = {alpha: fs.partition.describe(fs.partition.dirichlet(LABELS, 20, alpha, seed=0),
                                     LABELS).as_dict()["label_tv_distance_mean"]
        for alpha in (0.05, 1.0, 1000.0)}
  iid = fs.partition.describe(fs.partition.iid(2000, 20), LABELS).as_dict()
  assert tv[0.05] > 0.6 > tv[1.0] > tv[1000.0]
  # Large alpha: every client's label mix is the global one (even closer than a random IID deal).
  assert tv[1000.0] < 0.05 and tv[1000.0] <= iid["label_tv_distance_mean"]


def test_shards_give_few_labels(tmp_path):
  ids = fs.partition.shards(LABELS, 50, 2, seed=0)
  stats = fs.partition.describe(ids, LABELS, plot_path=str(tmp_path / "p.png"))
  assert stats.as_dict()["labels_per_client_mean"] <= 2.5
  assert (tmp_path / "p.png").stat().st_size > 5000


@pytest.mark.parametrize("fn,match", [
    (lambda: fs.partition.dirichlet(LABELS, 10, 0.0), "alpha"),
    (lambda: fs.partition.shards(LABELS[:10], 10, 2), "more than the 10 examples"),
    (lambda: fs.partition.dirichlet(LABELS[:30], 25, 0.01, min_examples=1), "short"),
    (lambda: fs.partition.quantity_skew(10, 20), "cannot give"),
])
def test_partition_bad_input(fn, match):
  with pytest.raises(ValueError, match=match):
    fn()


def test_natural_ids():
  assert fs.partition.natural(np.array([5, 3, 5, 9])).tolist() == [1, 0, 1, 2]


def write_h5(path, clients):
  with h5py.File(path, "w") as f:
    g = f.create_group("examples")
    for name, feats in clients.items():
      c = g.create_group(name)
      for k, v in feats.items():
        c.create_dataset(k, data=v)


def test_emnist_h5_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  clients = {f"f{i:04d}_00": {"pixels": rng.random((n, 28, 28), np.float32),
                              "label": rng.integers(0, 62, n).astype(np.int32)}
             for i, n in enumerate([3, 7, 1])}
  write_h5(tmp_path / "e.h5", clients)
  pop = datasets.emnist(str(tmp_path / "e.h5"))
  assert pop.labels.tolist() == sorted(clients)
  for i, name in enumerate(pop.labels):
    got = pop.client(i)
    np.testing.assert_array_equal(got["x"][..., 0], clients[name]["pixels"])
    np.testing.assert_array_equal(got["y"], clients[name]["label"])


def test_cifar100_and_shakespeare_and_stackoverflow_h5(tmp_path):
  rng = np.random.default_rng(1)
  write_h5(tmp_path / "c.h5", {"1": {"image": rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8),
                                     "label": np.arange(4), "coarse_label": np.arange(4) // 2}})
  pop = datasets.cifar100(str(tmp_path / "c.h5"), label="coarse_label")
  assert pop.client(0)["y"].tolist() == [0, 0, 1, 1] and pop.client(0)["x"].max() <= 1.0

  snippets = {"ROMEO": [b"But soft, what light", b"It is the east"], "JULIET": [b"O Romeo"]}
  write_h5(tmp_path / "s.h5", {k: {"snippets": np.array(v, dtype=object)}
                               for k, v in snippets.items()})
  sp = datasets.shakespeare(str(tmp_path / "s.h5"), seq_len=8)
  j = list(sp.labels).index("JULIET")
  x, y = sp.client(j)["x"], sp.client(j)["y"]
  assert datasets.decode_text(x[0][1:]) + datasets.decode_text(y[0][-1:]) == "O Romeo"[:8]
  np.testing.assert_array_equal(x[0][1:], y[0][:-1])  # targets are inputs shifted by one

  write_h5(tmp_path / "so.h5", {"u1": {"tokens": np.array([b"how to sort list", b"sort dict"],
                                                          dtype=object),
                                       "tags": np.array([b"python|list", b"python"],
                                                        dtype=object)}})
  so, vocab, tags = datasets.stackoverflow(str(tmp_path / "so.h5"), vocab_size=3, num_tags=2)
  assert vocab[0] == "sort" and tags[0] == "python"
  c = so.client(0)
  assert c["y"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
  assert c["x"][1, :2].tolist() == [2, 1]  # "sort" -> 2, "dict" -> out of vocabulary


def test_unknown_h5_schema_names_keys(tmp_path):
  with h5py.File(tmp_path / "bad.h5", "w") as f:
    f.create_group("clients")
  with pytest.raises(ValueError, match="expected a top-level group 'examples'.*clients"):
    datasets.emnist(str(tmp_path / "bad.h5"))
  write_h5(tmp_path / "bad2.h5", {"a": {"image": np.zeros((1, 2))}})
  with pytest.raises(ValueError, match="lacks features.*pixels.*found.*image"):
    datasets.emnist(str(tmp_path / "bad2.h5"))


@pytest.mark.parametrize("name", datasets.SKLEARN_DATASETS)
def test_sklearn_datasets(name):
  pop, test = datasets.sklearn_dataset(name, num_clients=6, alpha=1.0, seed=0)
  assert pop.num_clients == 6 and test["x"].shape[1] == pop.features["x"].shape[1]
  assert np.isfinite(np.asarray(pop.features["x"])).all()


def test_leaf_synthetic_and_frames_and_split():
  pop = datasets.leaf_synthetic(0.5, 0.5, num_clients=5, seed=0)
  assert pop.num_clients == 5 and pop.features["y"].max() < 10
  frame = {"user": np.array(["a", "b", "a"]), "f1": np.array([1.0, 2, 3]),
           "f2": np.array([4.0, 5, 6]), "label": np.array([0, 1, 0])}

  class FakeHF(dict):
    column_names = list(frame)

  hf = datasets.from_hf_dataset(FakeHF(frame), "user", {"x": ["f1", "f2"], "y": "label"})
  assert hf.labels.tolist() == ["a", "b"] and hf.client(0)["x"].tolist() == [[1, 4], [3, 6]]
  train, test = datasets.split_clients(pop, 0.25, seed=0)
  sizes = np.asarray(pop.num_examples)
  np.testing.assert_array_equal(np.asarray(train.num_examples), np.ceil(sizes * 0.75))
  np.testing.assert_array_equal(np.asarray(train.num_examples) + np.asarray(test.num_examples),
                                sizes)
  for c in range(pop.num_clients):  # every example lands on its own client's side, once
    both = np.concatenate([train.client(c)["x"], test.client(c)["x"]])
    mine = pop.client(c)["x"]
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, mine.tolist()))


def linear_loss():
  return fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])


def test_per_client_evaluation_equals_loop():
  pop = datasets.leaf_synthetic(1.0, 1.0, num_clients=7, seed=1)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(60, 10)), jnp.float32), "b": jnp.zeros(10)}
  loss_fn = linear_loss()
  ev = fs.evaluation.evaluate_clients(loss_fn, params, pop, batch_size=16, chunk_size=3)
  for c in range(7):
    data = pop.client(c)
    ref = fs.evaluation.evaluate(loss_fn, params, data, batch_size=1000)
    assert ev.metrics["accuracy"][c] == pytest.approx(ref["accuracy"], abs=1e-6)
    assert ev.metrics["loss"][c] == pytest.approx(ref["loss"], rel=1e-5)
  s = ev.summary()
  assert s["accuracy_p10"] <= s["accuracy_p50"] <= s["accuracy_p90"]
  allx = {k: np.asarray(v) for k, v in pop.features.items()}
  central = fs.evaluation.evaluate(loss_fn, params, allx)
  assert s["accuracy_weighted_mean"] == pytest.approx(central["accuracy"], abs=1e-5)


@pytest.mark.slow  # (~2 s) test_per_client_evaluation_equals_loop stays
def test_personalised_evaluation_improves_local_fit():
  pop = datasets.leaf_synthetic(1.0, 1.0, num_clients=6, seed=2)
  params = {"w": jnp.zeros((60, 10)), "b": jnp.zeros(10)}
  loss_fn = linear_loss()
  tune = fs.make_client_update(loss_fn, optax.sgd(0.5), batch_size=10, local_epochs=3)
  base = fs.evaluation.evaluate_clients(loss_fn, params, pop).summary()
  tuned = fs.evaluation.evaluate_clients(loss_fn, params, pop, personalize=tune).summary()
  assert tuned["loss_mean"] < base["loss_mean"]


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_zoo_models_shapes_and_emnist_cnn_size():
  key = jax.random.key(0)
  cnn = fs.zoo.EmnistCNN()
  p = cnn.init(key, jnp.ones((1, 28, 28, 1)))["params"]
  assert sum(x.size for x in jax.tree.leaves(p)) == 1_206_590
  for module, x, out in [
      (fs.zoo.LogisticRegression(10), jnp.ones((2, 8, 8)), (2, 10)),
      (fs.zoo.MLP(10, (16,)), jnp.ones((2, 64)), (2, 10)),
      (fs.zoo.CifarCNN(), jnp.ones((2, 32, 32, 3)), (2, 10)),
      (fs.zoo.ResNet18(num_classes=5, width=8), jnp.ones((2, 32, 32, 3)), (2, 5)),
      (fs.zoo.CharLSTM(vocab_size=30, hidden=16), jnp.ones((2, 7), jnp.int32), (2, 7, 30)),
      (fs.zoo.DenseAutoencoder((8, 3)), jnp.ones((2, 12)), (2, 12)),
  ]:
    params = module.init(key, x)["params"]
    assert module.apply({"params": params}, x).shape == out


def test_labels_out_of_range_and_shape_mismatch_are_clear():
  pop, _ = datasets.sklearn_dataset("iris", num_clients=4, seed=0)
  module = fs.zoo.LogisticRegression(2)  # iris has 3 classes
  params = module.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(module)),
                              client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
  with pytest.raises(ValueError, match=r"labels 'y' span \[0, 2\] but the model outputs 2"):
    fs.Simulation(algo, pop, cohort_size=2).init(params, jax.random.key(0))
  # A model built for 7 features (iris has 4); a small one, so the test compiles little.
  wide = fs.zoo.LogisticRegression(3)
  wide_params = wide.init(jax.random.key(0), jnp.ones((1, 7)))["params"]
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(wide)),
                              client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1)
  with pytest.raises(ValueError, match="loss_fn.*failed"):
    fs.Simulation(algo, pop, cohort_size=2).init(wide_params, jax.random.key(0))
