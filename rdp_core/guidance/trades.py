"""Training the auxiliary network of adversarial guidance with TRADES (Zhang et al. 2019).

loss = CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL term in the l_inf ball of radius
eps by `attack_steps` signed-gradient steps from a small random start (the network in eval mode while
attacking, as in TRADES' code). SGD with momentum and weight decay, the learning rate on a cosine over the
wall-clock budget (or max_steps), random crops and flips. At the end the network's clean accuracy and its
accuracy under PGD-20 at eps (on the first `eval_images` CIFAR-10 test images) are measured and stored,
with the configuration and the exact command, in the fp16 safetensors file that `load_auxiliary` reads.
"""
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rdp_core.data import load_cifar10
from rdp_core.models.classifiers import CifarResNet
from rdp_core.train import _done, _progress_bar, default_command


@dataclasses.dataclass
class TradesConfig:
    depth: int = 20
    beta: float = 6.0
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 5  # TRADES uses 10; 5 halves the cost, which the CPU budget needs
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    minutes: float = 40.0
    max_steps: int = 0  # 0: no step limit, only the time budget
    eval_images: int = 1000
    log_every: int = 25
    seed: int = 0


def trades_adversary(net, x, config, generator=None):
    """Images in the eps ball around x (and in [0, 1]) maximising KL(f(x) || f(x_adv)), from a small random start."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        clean = F.softmax(net(x), dim=1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=generator).to(x)).clamp(0, 1)
    for _ in range(config.attack_steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(net(x_adv), dim=1), clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = (x + (x_adv.detach() + config.step_size * grad.sign() - x).clamp(-config.eps, config.eps)).clamp(0, 1)
    net.train(was_training)
    return x_adv.detach()


def trades_loss(net, x, y, config, generator=None):
    x_adv = trades_adversary(net, x, config, generator)
    logits, logits_adv = net(x), net(x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + config.beta * robust


def train_auxiliary(config, data_root, out_dir, resume=False, progress=True, device="cpu", command=None):
    """Trains until the budget is used, measures clean and PGD-20 accuracy, returns the weights' path.

    command: the command line recorded in the log and the metadata (default: this process's).
    """
    command = command or default_command()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    images, labels = load_cifar10("train", root=data_root)
    net = CifarResNet(config.depth).to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    step, elapsed = _resume(out_dir, net, optimizer) if resume else (0, 0.0)
    generator = torch.Generator().manual_seed(config.seed + step)
    log = open(out_dir / "train_log.jsonl", "a")
    log.write(json.dumps({"start_step": step, "command": command}) + "\n")
    # The budget (and with it the cosine schedule) is the whole run's: a resumed run continues the clock of
    # the one it resumes instead of restarting the learning rate at its peak.
    start, start_step, running = time.time() - elapsed, step, None
    last_save = time.time()
    bar = _progress_bar(config, progress, start_step)
    while not _done(config, step, start):
        x, y = _augmented_batch(images, labels, config.batch_size, generator)
        loss = trades_loss(net, x.to(device), y.to(device), config, generator)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * _progress(config, step, start)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if step % config.log_every == 0:
            log.write(json.dumps({"step": step, "loss": loss.item(), "loss_smoothed": running,
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "elapsed_s": round(time.time() - start, 1)}) + "\n")
            log.flush()
        if time.time() - last_save > 60:  # what --resume continues from after a crash or Ctrl-C
            _save_checkpoint(out_dir, net, optimizer, step, time.time() - start)
            last_save = time.time()
    bar.close()
    _save_checkpoint(out_dir, net, optimizer, step, time.time() - start)
    accuracies = evaluate_auxiliary(net.eval(), data_root, config, device, progress)
    log.write(json.dumps({"step": step, **accuracies}) + "\n")
    log.close()
    return _save(out_dir, config, net, step, accuracies, command)


def evaluate_auxiliary(net, data_root, config, device="cpu", progress=False):
    """Clean accuracy and accuracy under PGD-20 (l_inf eps, step eps / 4) on the first eval_images test images."""
    from rdp_core.attacks import pgd_eot

    x, y = load_cifar10("test", root=data_root, dtype=torch.float32, limit=config.eval_images)
    x, y = x.to(device), y.to(device)
    net.requires_grad_(False)
    with torch.no_grad():
        clean = (net(x).argmax(1) == y).float().mean().item()
    adv = torch.cat([pgd_eot(net, xb, yb, eps=config.eps, iterations=20, eot=1, step_size=config.eps / 4,
                             progress=progress).x_adv for xb, yb in zip(x.split(250), y.split(250))])
    with torch.no_grad():
        robust = (net(adv).argmax(1) == y).float().mean().item()
    return {"clean_accuracy": clean, "pgd20_accuracy": robust, "eval_images": len(x)}


def _progress(config, step, start):
    """The fraction of the budget used: of max_steps when set, else of the wall-clock minutes."""
    if config.max_steps:
        return min(1.0, step / config.max_steps)
    return min(1.0, (time.time() - start) / (60 * config.minutes))


def _augmented_batch(images, labels, batch_size, generator):
    """Random crops (4-pixel zero padding) and horizontal flips, as images in [0, 1]."""
    index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
    padded = F.pad(images[index].float() / 255.0, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, batch_size), generator=generator).tolist()
    x = torch.stack([image[:, top:top + 32, left:left + 32] for image, top, left in zip(padded, dy, dx)])
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x), labels[index].long()


def _save(out_dir, config, net, step, accuracies, command):
    metadata = {
        "depth": str(config.depth),
        "train_config": json.dumps(dataclasses.asdict(config)),
        "step": str(step),
        "command": command,
        **{k: json.dumps(v) for k, v in accuracies.items()},
    }
    path = out_dir / "auxiliary.safetensors"
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


def _save_checkpoint(out_dir, net, optimizer, step, elapsed):
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed_s": elapsed}, out_dir / "checkpoint.pt")


def _resume(out_dir, net, optimizer):
    """(step, seconds of training so far) of OUT/checkpoint.pt, loaded into net and optimizer."""
    path = out_dir / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to continue from at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))
