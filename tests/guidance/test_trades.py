"""TRADES training of AGDM's auxiliary network: resuming continues the run's budget and schedule."""
import json

import pytest
import torch

from rdp_core.guidance.trades import TradesConfig, train_auxiliary


def test_a_resumed_run_continues_the_budget_instead_of_restarting_it(data_root, tmp_path):
    # The cosine learning rate follows the fraction of the wall-clock budget used: a resumed run that restarted
    # the clock went back to the peak rate and trained for a whole new budget.
    config = TradesConfig(depth=8, batch_size=8, attack_steps=1, minutes=0.02, eval_images=8, log_every=1)
    train_auxiliary(config, data_root, tmp_path, progress=False)
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert first["step"] >= 1 and first["elapsed_s"] >= 60 * config.minutes
    train_auxiliary(config, data_root, tmp_path, resume=True, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == first["step"]  # budget used up
    starts = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in starts if "start_step" in r] == [0, first["step"]]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_auxiliary(config, data_root, tmp_path / "empty", resume=True, progress=False)
