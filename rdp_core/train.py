"""Training a DDPM++ epsilon model on CIFAR-10, concentrated on the noise levels purification uses.

The loss is score_sde's VP continuous objective in its epsilon form: t ~ U(t_min, t_max), x_t = sqrt(ab) x0
+ sigma eps, loss = mean((net(x_t, 999 t) - eps)^2). Purification starts at t* <= 0.3, so t_max defaults
to 0.3: all capacity goes where it is used. Training runs for a wall-clock budget, logs a JSON line per
log interval, keeps an EMA of the weights, and saves (a) a resumable checkpoint and (b) the EMA weights
as fp16 safetensors with the configuration and the training command in the metadata.
"""
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rdp_core.data import load_cifar10
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp
from rdp_core.sampling import VP


# The shipped default: small enough to train in an hour and to purify 100 steps in seconds on 2 CPU cores.
CPU_MODEL = DDPMppConfig(nf=32, ch_mult=(1, 2, 2), num_res_blocks=1)


@dataclasses.dataclass
class TrainConfig:
    model: DDPMppConfig = CPU_MODEL
    t_min: float = 1e-3
    t_max: float = 0.3
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    minutes: float = 50.0
    max_steps: int = 0  # 0: no step limit, only the time budget
    log_every: int = 25
    save_every_minutes: float = 5.0
    seed: int = 0


def denoising_loss(net, x0, t_min, t_max, generator=None):
    """Epsilon-prediction MSE at t ~ U(t_min, t_max) for clean images x0 in [-1, 1]."""
    n = x0.shape[0]
    t = t_min + (t_max - t_min) * torch.rand(n, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    log_ab = VP.log_alpha_bar(t)[:, None, None, None]
    x_t = torch.exp(0.5 * log_ab) * x0 + torch.sqrt(-torch.expm1(log_ab)) * noise
    return (net(x_t, t * net.config.time_scale) - noise).square().mean()


def train(config, data_root, out_dir, resume=False, progress=True, command=None):
    """Trains until the time budget or max_steps is used; returns the path of the fp16 EMA weights.

    command: the command line recorded in the log and the weights' metadata (default: this process's).
    """
    command = command or default_command()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    images, _ = load_cifar10("train", root=data_root)
    net = NCSNpp(config.model).train()
    ema = NCSNpp(config.model).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    step = _resume(out_dir, net, ema, optimizer) if resume else 0
    # Seeded by the step so that a resumed run draws new batches instead of replaying the first ones.
    generator = torch.Generator().manual_seed(config.seed + step)

    log = open(out_dir / "train_log.jsonl", "a")
    log.write(json.dumps({"start_step": step, "command": command}) + "\n")
    start = last_save = time.time()
    start_step = step
    bar = _progress_bar(config, progress, start_step)
    running = None
    while not _done(config, step, start):
        x0 = _batch(images, config.batch_size, generator)
        loss = denoising_loss(net, x0, config.t_min, config.t_max, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        optimizer.step()
        _update_ema(ema, net, config.ema_decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % config.log_every == 0:
            elapsed = time.time() - start
            images_per_s = (step - start_step) * config.batch_size / max(elapsed, 1e-9)
            log.write(json.dumps({"step": step, "loss": loss.item(), "loss_smoothed": running,
                                  "elapsed_s": round(elapsed, 1), "images_per_s": round(images_per_s, 2)}) + "\n")
            log.flush()
        if time.time() - last_save > 60 * config.save_every_minutes:
            _save(out_dir, config, net, ema, optimizer, step, command)
            last_save = time.time()
    bar.close()
    log.close()
    return _save(out_dir, config, net, ema, optimizer, step, command)


def denoising_psnr(model, images, t, batch_size=100, seed=0):
    """PSNR (dB, images in [0, 1]) of the one-step denoised estimate x0_hat(x_t) at time t."""
    generator = torch.Generator().manual_seed(seed)
    ab = VP.alpha_bar(t)
    squared_error, count = 0.0, 0
    with torch.no_grad():
        for x in images.split(batch_size):
            x0 = x * 2 - 1
            noise = torch.randn(x0.shape, generator=generator)
            x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
            eps = model(x_t, torch.full((x.shape[0],), t))
            x0_hat = ((x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
            squared_error += ((x0_hat - x0) / 2).square().flatten(1).mean(1).sum().item()
            count += x.shape[0]
    return 10 * math.log10(1 / (squared_error / count))


def _done(config, step, start):
    if config.max_steps and step >= config.max_steps:
        return True
    return time.time() - start >= 60 * config.minutes


def _batch(images, batch_size, generator):
    index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
    x = images[index].float() / 127.5 - 1.0
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def _update_ema(ema, net, decay):
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1.0 - decay)


def _progress_bar(config, enabled, initial):
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps or None, initial=initial, desc="training", unit="step", disable=not enabled)


def _save(out_dir, config, net, ema, optimizer, step, command):
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step}, out_dir / "checkpoint.pt")
    metadata = {
        "model_config": json.dumps(dataclasses.asdict(config.model)),
        "train_config": json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "model"}),
        "step": str(step),
        "command": command,
    }
    path = out_dir / "model.safetensors"
    save_file({k: v.half().contiguous() for k, v in ema.state_dict().items()}, str(path), metadata=metadata)
    return path


def default_command():
    return " ".join(["rdp-core"] + sys.argv[1:])


def _resume(out_dir, net, ema, optimizer):
    state = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])
