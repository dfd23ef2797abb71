"""rdp_core.train on a tiny DDPM++: it learns, logs, saves loadable fp16 weights with provenance, resumes."""
import json

import torch

from rdp_core.models.default import load_trained
from rdp_core.models.ncsnpp import DDPMppConfig
from rdp_core.train import TrainConfig, denoising_loss, denoising_psnr, train

TINY = DDPMppConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)


def test_training_learns_saves_and_resumes(data_root, tmp_path):
    config = TrainConfig(model=TINY, batch_size=16, lr=2e-3, warmup_steps=5, max_steps=40, minutes=5,
                         log_every=10, ema_decay=0.5)
    path = train(config, data_root, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert lines[0]["start_step"] == 0 and "command" in lines[0]
    assert [line["step"] for line in lines[1:]] == [10, 20, 30, 40]
    model = load_trained(path)
    assert model.metadata["step"] == "40" and json.loads(model.metadata["model_config"])["nf"] == 8
    # At initialisation the output is ~0, so the loss is ~1 (the noise variance); training must go below.
    x0 = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        loss = denoising_loss(model.net, x0, 1e-3, 0.3, torch.Generator().manual_seed(2)).item()
    assert loss < 0.9
    config.max_steps = 45
    train(config, data_root, tmp_path, resume=True, progress=False)
    assert load_trained(path).metadata["step"] == "45"
    resumed = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()][5]
    assert resumed["start_step"] == 40


def test_denoising_psnr_rewards_a_better_denoiser():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def zero_eps(x, t):  # x0_hat = x_t / sqrt(ab): keeps all the noise
        return torch.zeros_like(x)

    def oracle(x, t):  # knows the images, so it recovers the noise exactly
        from rdp_core.sampling import VP

        ab = VP.alpha_bar(t)[:, None, None, None]
        return (x - ab.sqrt() * (images * 2 - 1)) / (1 - ab).sqrt()

    assert denoising_psnr(oracle, images, 0.1) > 60 > 25 > denoising_psnr(zero_eps, images, 0.1)
