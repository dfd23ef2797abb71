"""How strong each AGDM term pulls: median gradient norms of the latent and classifier terms, per layer and t.

    python python/guidance_gradient_norms.py --data ../shared/data --n-images 32

For the first N CIFAR-10 test images x_in, diffused to t with fresh noise, this prints the median over images
of ||d/dx_t ||f_L(x0_hat) - f_L(x_in)||^2|| (the latent term) and of ||d/dx_t log p_f(y_hat | x0_hat)|| (the
classifier term, lam 1), x0_hat the shipped default model's denoised estimate and f the shipped auxiliary
network. One scale multiplies both terms, so their ratio says how to set lam for a layer and how a scale
chosen at one layer translates to another (python/guidance_clean_accuracy.py's LAYER3_GRADIENT_RATIO).
"""
import argparse
import json
import math

import torch

from rdp_core.data import load_cifar10
from rdp_core.guidance import AdversarialGuidance, cached_auxiliary
from rdp_core.models import load_default_eps_model
from rdp_core.sampling.schedule import VP


def term_gradient_norms(model, network, x_in, t, layer, generator):
    """(median latent-term gradient norm, median classifier-term gradient norm) at diffusion time t."""
    times = torch.full((len(x_in),), t)
    alpha_bar = VP.alpha_bar(torch.tensor(t, dtype=torch.float64)).item()
    x_t = VP.diffuse(x_in, torch.randn(x_in.shape, generator=generator), alpha_bar).requires_grad_(True)
    x0_hat = (x_t - math.sqrt(1 - alpha_bar) * model(x_t, times)) / math.sqrt(alpha_bar)
    norms = []
    for options in ({"lam": 0.0}, {"latent": False}):
        guidance = AdversarialGuidance(network, layer=layer, **options)
        g = guidance.objective(x_t, times, x0_hat, guidance.prepare(x_in), draw=None)
        (grad,) = torch.autograd.grad(g.sum(), x_t, retain_graph=True)
        norms.append(grad.flatten(1).norm(dim=1).median().item())
    return tuple(norms)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--times", default="0.01,0.05,0.09")
    parser.add_argument("--layers", default="pool,layer3")
    args = parser.parse_args()
    x, _ = load_cifar10("test", root=args.data, dtype=torch.float32, limit=args.n_images)
    x_in = x * 2 - 1  # the sampler's data space
    model, network = load_default_eps_model(), cached_auxiliary("cpu")
    rows = []
    for layer in args.layers.split(","):
        for t in map(float, args.times.split(",")):
            latent, classifier = term_gradient_norms(model, network, x_in, t, layer, torch.Generator().manual_seed(0))
            rows.append({"layer": layer, "t": t, "latent": latent, "classifier": classifier})
            print(f"{layer:>7} t={t:.2f}: latent term {latent:.4g}, classifier term {classifier:.4g}, "
                  f"ratio {latent / classifier:.3g}", flush=True)
    print(json.dumps({"n_images": len(x), "rows": rows}))


if __name__ == "__main__":
    main()
