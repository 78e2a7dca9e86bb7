"""The fine-tuning and shared-data examples run at smoke size and print their measured tables."""

import pytest


@pytest.mark.slow
def test_finetune_pretrained_example(run_with_package, tmp_path):
  out = tmp_path / "ft.png"
  text = run_with_package(
      "finetune_pretrained", "--rounds", "2", "--num-clients", "12", "--cohort", "3",
      "--pretrain-steps", "20", "--bench-rounds", "1", "--hidden", "16",
      "--configs", "head only", "LoRA r=2", "FFA-LoRA r=8 + DP", "--out", str(out))
  rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in text.splitlines()
          if r.startswith("| ") and "---" not in r and "configuration" not in r}
  assert set(rows) == {"pretrained, no fine-tuning", "head only", "LoRA r=2",
                       "FFA-LoRA r=8 + DP"}
  # Bits uploaded are 32 per trained float; FFA-LoRA with DP reports an epsilon.
  for name in ("head only", "LoRA r=2", "FFA-LoRA r=8 + DP"):
    trained, bits = int(rows[name][2]), int(rows[name][3])
    assert bits == 32 * trained and 0 <= float(rows[name][0]) <= 1
  assert float(rows["FFA-LoRA r=8 + DP"][-1]) > 0
  assert out.stat().st_size > 10_000


@pytest.mark.slow
def test_shared_data_example(run_with_package, tmp_path):
  out = tmp_path / "sd.png"
  text = run_with_package("shared_data", "--rounds", "2", "--seeds", "1", "--num-clients",
                          "12", "--cohort", "3", "--out", str(out))
  assert "| FedAvg |" in text and "| FedAvg + shared data" in text
  assert out.stat().st_size > 10_000
