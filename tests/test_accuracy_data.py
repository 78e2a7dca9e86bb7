"""Readers of the accuracy suite's real-data tasks: Stack Overflow next-word prediction
(FedJAX's tokenization) and CIFAR-10 in pfl-research's IID-user setup."""

import os
import pickle

import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO = os.path.join(ROOT, "tests", "fixtures", "federated", "tff_stackoverflow.sqlite")


def _tokenize_oracle(sentence, vocab, seq_len):
  """FedJAX's DefaultWordTokenizer, written out: BOS + ids (+3, OOV len+3) + EOS, x/y shifted."""
  ids = [1] + [vocab.index(w) + 3 if w in vocab else len(vocab) + 3
               for w in sentence.split()] + [2]
  x = (ids[:-1] + [0] * seq_len)[:seq_len]
  y = (ids[1:] + [0] * seq_len)[:seq_len]
  return x, y


def test_stackoverflow_nwp_matches_fedjax_tokenization():
  vocab = ["the", "a", "is"]  # a small vocabulary leaves most words out of it
  pop, got_vocab = fs.datasets.stackoverflow_nwp(SO, vocab=vocab, seq_len=6)
  assert got_vocab == vocab
  arrays, index, _ = fs.datasets.read_federated(SO, ["tokens"])
  assert pop.num_examples.sum() == len(index) > 0
  x, y = np.asarray(pop.features["x"]), np.asarray(pop.features["y"])
  row = 0
  for c in range(pop.num_clients):  # examples are grouped by client in reading order
    for s in (t.decode() if isinstance(t, bytes) else t
              for t, i in zip(arrays["tokens"], index, strict=True) if i == c):
      ex, ey = _tokenize_oracle(s, vocab, 6)
      assert x[row].tolist() == ex and y[row].tolist() == ey, s
      row += 1
  assert x.max() <= len(vocab) + 3  # fits StackOverflowLSTM(vocab_size=len(vocab))


def _pickle(path, n=130, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
  labels = rng.integers(0, 10, (n, 1))
  with open(path, "wb") as f:
    pickle.dump((images, labels), f)
  return images, labels


def test_cifar10_pfl_users_and_normalization(tmp_path):
  images, labels = _pickle(tmp_path / "cifar10_train.p")
  pop, (means, stds) = fs.datasets.cifar10_pfl(str(tmp_path / "cifar10_train.p"), seed=3)
  assert pop.num_clients == 3 and pop.num_examples.tolist() == [50, 50, 30]
  np.testing.assert_allclose(means, images.reshape(-1, 3).mean(0), rtol=1e-6)
  x = np.asarray(pop.features["x"])
  np.testing.assert_allclose(x.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(x.reshape(-1, 3).std(0), 1, rtol=1e-4)
  # a permutation of the file's examples: the label counts are unchanged
  assert np.bincount(np.asarray(pop.features["y"]), minlength=10).tolist() == \
      np.bincount(labels.reshape(-1), minlength=10).tolist()


def test_cifar10_pfl_bad_file_names_it(tmp_path):
  bad = tmp_path / "cifar10_train.p"
  bad.write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="cifar10_train.p.*pickle"):
    fs.datasets.cifar10_pfl(str(bad))
  with pytest.raises(FileNotFoundError, match="download_preprocess"):
    fs.datasets.cifar10_pfl(str(tmp_path / "missing.p"))


def test_new_configs_stop_clearly_without_data(capsys):
  for name in ("stackoverflow_nwp_fedadam.yaml", "cifar10_pfl_fedavg.yaml"):
    config = os.path.join(ROOT, "examples", "configs", "accuracy", name)
    assert cli.main(["run", config, "--set", "data.path=/nonexistent/file"]) == 2
    assert "data.path='/nonexistent/file' does not exist" in capsys.readouterr().err
