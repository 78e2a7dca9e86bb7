"""fedprox_synthetic follows FedProx's generate_synthetic.py: statistics, not golden numbers."""

import numpy as np
import pytest
from scipy import stats

from fedjax_sim.data import datasets


@pytest.fixture(scope="module")
def many():
  # Many small-dimensional devices: enough for the across-device statistics.
  return datasets.fedprox_synthetic(0.5, 2.0, num_devices=600, dim=10, seed=3,
                                    train_fraction=1.0)[0]


def test_sizes_follow_lognormal_4_2_plus_50(many):
  n = np.asarray(many.num_examples) - 50
  assert n.min() >= 0
  for m in (1, 20, 54, 150, 1000):  # P(int(L) >= m) = P(L >= m), L ~ lognormal(4, 2)
    p = stats.norm.sf((np.log(m) - 4) / 2)
    se = np.sqrt(p * (1 - p) / n.size)
    assert abs(np.mean(n >= m) - p) < 4 * se + 1e-3, (m, np.mean(n >= m), p)


def test_beta_is_a_standard_deviation_and_sigma_diag(many):
  x = np.asarray(many.features["x"])
  off, cnt = np.asarray(many.offsets), np.asarray(many.num_examples)
  means = np.stack([x[o:o + c].mean(0) for o, c in zip(off, cnt)])
  # mean over dims of v_k ~ B_k + N(0, 1/dim): variance beta^2 + 1/dim (beta as std: 4.1;
  # beta as variance would give 2.1).
  var = means.mean(1).var()
  want = 2.0**2 + 1 / 10
  assert abs(var - want) < 4 * want * np.sqrt(2 / len(cnt)), var
  # within-device covariance diag(j^-1.2)
  centred = np.concatenate([x[o:o + c] - means[i] for i, (o, c) in enumerate(zip(off, cnt))])
  np.testing.assert_allclose(centred.var(0), np.arange(1, 11) ** -1.2, rtol=0.05)


def test_alpha_does_not_change_labels_and_iid_is_shared():
  a, _ = datasets.fedprox_synthetic(0.0, 0.5, num_devices=6, seed=1)
  b, _ = datasets.fedprox_synthetic(3.0, 0.5, num_devices=6, seed=1)
  np.testing.assert_array_equal(np.asarray(a.features["x"]), np.asarray(b.features["x"]))
  assert np.mean(np.asarray(a.features["y"]) == np.asarray(b.features["y"])) > 0.999
  train, test = datasets.fedprox_synthetic(0, 0, iid=True, num_devices=8, seed=2)
  tr, te = np.asarray(train.num_examples), np.asarray(test.num_examples)
  np.testing.assert_array_equal(tr, ((tr + te) * 0.9).astype(int))
  assert abs(np.asarray(train.features["x"]).mean()) < 0.05  # v_k = 0 for every device
  with pytest.raises(ValueError, match="standard deviations"):
    datasets.fedprox_synthetic(-1, 0)
