"""Expectation over transformation: many independent forwards of a randomized model, batched.

A randomized defense (a `Purifier`) draws fresh noise for every sample of every forward, so repeating the
batch `draws` times and running one forward gives `draws` independent outcomes per image. `chunk` bounds
how many copies go through one forward (memory), without changing the result's distribution.
"""
import torch
import torch.nn.functional as F


def cross_entropy_per_sample(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def eot_loss_gradient(forward, x, y, draws, loss=None, chunk=None):
    """(mean gradient of the loss over `draws` forwards, losses (draws, n), logits (draws, n, classes)).

    forward: maps a batch of images to logits (any nn.Module, or a closure passing a generator).
    loss: maps (logits, labels) to one loss per sample (default cross-entropy).
    chunk: at most this many copies of the batch per forward (default: all `draws` at once).
    """
    _check_positive("draws", draws)
    loss = loss or cross_entropy_per_sample
    chunk = draws if chunk is None else chunk
    _check_positive("chunk", chunk)
    grad = torch.zeros_like(x)
    losses, logits = [], []
    x = x.detach()
    for start in range(0, draws, chunk):
        copies_in_chunk = min(chunk, draws - start)
        copies = x.repeat(copies_in_chunk, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            out = forward(copies)
            per_sample = loss(out, y.repeat(copies_in_chunk))
            if per_sample.shape != (copies.shape[0],):
                raise ValueError(f"loss must return one value per sample, shape ({copies.shape[0]},), got "
                                 f"{tuple(per_sample.shape)}")
            (copies_grad,) = torch.autograd.grad(per_sample.sum(), copies)
        grad += copies_grad.reshape(copies_in_chunk, *x.shape).sum(0)
        losses.append(per_sample.detach().reshape(copies_in_chunk, -1))
        logits.append(out.detach().reshape(copies_in_chunk, x.shape[0], -1))
    return grad / draws, torch.cat(losses), torch.cat(logits)


@torch.no_grad()
def predict_votes(model, x, votes, chunk=None):
    """Predicted classes (votes, n) of `votes` independent forwards of `model` on `x` (no gradients)."""
    _check_positive("votes", votes)
    chunk = votes if chunk is None else chunk
    _check_positive("chunk", chunk)
    out = []
    for start in range(0, votes, chunk):
        copies = min(chunk, votes - start)
        out.append(model(x.repeat(copies, 1, 1, 1)).argmax(1).reshape(copies, x.shape[0]))
    return torch.cat(out)


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
