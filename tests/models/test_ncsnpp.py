"""DDPM++ (score_sde NCSN++): module layout, key names, arithmetic and official-checkpoint loading."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.models.checkpoint import CheckpointMismatch
from rdp_core.models.layout import engine_layout
from rdp_core.models.ncsnpp import (
    CIFAR10_DDPMPP,
    CIFAR10_DDPMPP_DEEP,
    AttnBlockpp,
    DDPMppConfig,
    NCSNpp,
    ResnetBlockBigGANpp,
    ScoreSDEEpsModel,
    load_score_sde_checkpoint,
    timestep_embedding,
)
from rdp_core.ops import GroupNormSiLU

TINY = DDPMppConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
WIDE = replace(TINY, nf=64)  # 64 and 128 channels: its 3x3 convolutions run Winograd on the CPU


def module_types(config):
    return [type(m).__name__ for m in NCSNpp(config).all_modules]


def test_cifar10_configs_have_score_sde_sizes_and_module_order():
    # Counted from score_sde's construction loop for nf 128, ch_mult (1, 2, 2, 2), attention at 16:
    # 3 embedding/input modules, 23 down, 3 middle, 24 up, 2 output = 55 (91 with 8 blocks).
    assert len(NCSNpp(CIFAR10_DDPMPP).all_modules) == 55
    assert len(NCSNpp(CIFAR10_DDPMPP_DEEP).all_modules) == 91
    assert sum(p.numel() for p in NCSNpp(CIFAR10_DDPMPP).parameters()) == 61_804_419
    types = module_types(CIFAR10_DDPMPP)
    assert types[:3] == ["Linear", "Linear", "Conv2d"]
    assert types[3:8] == ["ResnetBlockBigGANpp"] * 5  # 4 blocks at 32x32, then the downsampling block
    assert types[8:10] == ["ResnetBlockBigGANpp", "AttnBlockpp"]  # attention at 16x16
    assert types[26:29] == ["ResnetBlockBigGANpp", "AttnBlockpp", "ResnetBlockBigGANpp"]
    assert types[-2:] == ["GroupNormSiLU", "Conv2d"]


def test_state_dict_keys_are_score_sde_names():
    keys = NCSNpp(CIFAR10_DDPMPP).state_dict()
    for key in ["all_modules.0.weight", "all_modules.1.bias", "all_modules.2.weight",
                "all_modules.3.GroupNorm_0.weight", "all_modules.3.Conv_0.weight", "all_modules.3.Dense_0.weight",
                "all_modules.3.GroupNorm_1.bias", "all_modules.3.Conv_1.weight", "all_modules.7.Conv_2.weight",
                "all_modules.9.GroupNorm_0.weight", "all_modules.9.NIN_0.W", "all_modules.9.NIN_3.b",
                "all_modules.53.weight", "all_modules.54.bias"]:
        assert key in keys, key
    assert "all_modules.3.Conv_2.weight" not in keys  # 128 -> 128, no resampling: identity skip
    assert tuple(keys["all_modules.9.NIN_0.W"].shape) == (256, 256)
    assert tuple(keys["all_modules.0.weight"].shape) == (512, 128)
    # Parameter order (what EMA shadow_params follow) is construction order, attribute by attribute.
    names = [n for n, _ in NCSNpp(TINY).named_parameters()]
    assert names[:6] == ["all_modules.0.weight", "all_modules.0.bias", "all_modules.1.weight",
                         "all_modules.1.bias", "all_modules.2.weight", "all_modules.2.bias"]
    assert names[6:12] == [f"all_modules.3.{m}.{p}" for m in ("GroupNorm_0", "Conv_0", "Dense_0")
                           for p in ("weight", "bias")]


def test_timestep_embedding_is_ddpm_sinusoidal():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8)
    frequencies = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    angles = t[:, None] * frequencies
    torch.testing.assert_close(emb, torch.cat([torch.sin(angles), torch.cos(angles)], 1))
    assert timestep_embedding(t, 9).shape == (3, 9)


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def test_attention_block_matches_score_sde_arithmetic():
    block = randomize(AttnBlockpp(32)).eval()
    x = torch.randn(2, 32, 8, 8)
    h = F.group_norm(x, 8, block.GroupNorm_0.weight, block.GroupNorm_0.bias, eps=1e-6)
    q, k, v = (torch.einsum("bchw,co->bohw", h, n.W) + n.b[:, None, None]
               for n in (block.NIN_0, block.NIN_1, block.NIN_2))
    w = torch.einsum("bchw,bcij->bhwij", q, k) * 32 ** -0.5
    w = F.softmax(w.reshape(2, 8, 8, 64), dim=-1).reshape(2, 8, 8, 8, 8)
    out = torch.einsum("bhwij,bcij->bchw", w, v)
    out = torch.einsum("bchw,co->bohw", out, block.NIN_3.W) + block.NIN_3.b[:, None, None]
    torch.testing.assert_close(block(x), (x + out) / math.sqrt(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("up, down, out_ch",
                         [(False, False, 32), (False, False, 48), (True, False, 32), (False, True, 32)])
def test_resnet_block_matches_score_sde_arithmetic(up, down, out_ch):
    block = randomize(ResnetBlockBigGANpp(32, out_ch, temb_dim=24, up=up, down=down)).eval()
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 24)

    def resample(t):
        if up:
            return t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        if down:
            return t.reshape(2, t.shape[1], 4, 2, 4, 2).mean(dim=(3, 5))
        return t

    h = F.silu(F.group_norm(x, 8, block.GroupNorm_0.weight, block.GroupNorm_0.bias, eps=1e-6))
    h = block.Conv_0(resample(h)) + block.Dense_0(F.silu(temb))[:, :, None, None]
    h = F.silu(F.group_norm(h, out_ch // 4, block.GroupNorm_1.weight, block.GroupNorm_1.bias, eps=1e-6))
    h = block.Conv_1(h)
    skip = resample(x)
    if out_ch != 32 or up or down:
        skip = block.Conv_2(skip)
    torch.testing.assert_close(block(x, temb), (skip + h) / math.sqrt(2), atol=1e-5, rtol=1e-5)
    assert isinstance(block.GroupNorm_0, GroupNormSiLU)


def test_output_starts_at_zero_and_the_eps_wrapper_scales_time():
    net = NCSNpp(TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    assert net(x, torch.tensor([10.0, 500.0])).abs().max() < 1e-4  # init_scale 0: last conv ~ 0
    randomize(net)
    model = ScoreSDEEpsModel(net)
    t = torch.tensor([0.1, 0.25])
    torch.testing.assert_close(model(x, t), net(x, t * 999))


def official_checkpoint(net, path, shadow_seed=1):
    """A file in score_sde's layout, built from our own module (no official weights exist here)."""
    shadow = [p.detach().clone() for p in randomize(NCSNpp(net.config), seed=shadow_seed).parameters()]
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(1, 3, 16, 16), torch.tensor([5.0])).sum().backward()
    optimizer.step()
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow},
                "optimizer": optimizer.state_dict(), "step": 8}, path)
    return shadow


def test_official_layout_checkpoint_loads_strictly_with_ema_weights(tmp_path):
    net = randomize(NCSNpp(TINY))
    shadow = official_checkpoint(net, tmp_path / "checkpoint_8.pth")
    model = load_score_sde_checkpoint(tmp_path / "checkpoint_8.pth", TINY)
    assert not model.training
    for param, value in zip(model.net.parameters(), shadow):
        assert torch.equal(param, value)
    raw = load_score_sde_checkpoint(tmp_path / "checkpoint_8.pth", TINY, use_ema=False)
    for (name, param), value in zip(raw.net.named_parameters(), net.state_dict().values()):
        assert torch.equal(param, value), name


def test_checkpoint_mismatches_are_explained(tmp_path):
    net = randomize(NCSNpp(TINY))
    official_checkpoint(net, tmp_path / "ckpt.pth")
    bigger = DDPMppConfig(nf=16, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), image_size=16)
    with pytest.raises(CheckpointMismatch, match="missing keys"):
        load_score_sde_checkpoint(tmp_path / "ckpt.pth", bigger)
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    state["ema"]["shadow_params"] = state["ema"]["shadow_params"][:-1]
    torch.save(state, tmp_path / "short_ema.pth")
    with pytest.raises(CheckpointMismatch, match="shadow_params must list"):
        load_score_sde_checkpoint(tmp_path / "short_ema.pth", TINY)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatch, match="not a score_sde checkpoint"):
        load_score_sde_checkpoint(tmp_path / "other.pth", TINY)


def test_every_group_norm_runs_on_rdp_core_ops(assert_norms_run_on_rdp_core_ops):
    out = assert_norms_run_on_rdp_core_ops(NCSNpp(TINY).eval(), torch.randn(1, 3, 16, 16), torch.tensor([0.5]))
    assert out.shape == (1, 3, 16, 16)


@pytest.mark.skipif(_backend.cpp_extension() is None, reason="rdp_core._C was not built: nothing to compare")
@pytest.mark.parametrize("config", [TINY, WIDE], ids=["tiny", "wide"])
def test_compiled_backends_compute_the_stock_torch_function(monkeypatch, config):
    # The whole model on the default backends (C++ on this CPU) against the same modules on stock torch ops:
    # output and the input gradient an attack takes.
    from rdp_core.ops import conv3x3

    winograd_calls, winograd = [], conv3x3._winograd

    def counted_winograd(*args):
        winograd_calls.append(1)
        return winograd(*args)

    monkeypatch.setattr(conv3x3, "_winograd", counted_winograd)
    model = randomize(NCSNpp(config), seed=3).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, generator=gen) * 999

    def output_and_input_grad():
        leaf = x.clone().requires_grad_()
        out = model(leaf, t)
        return out.detach(), torch.autograd.grad(out.square().sum(), leaf)[0]

    ours = output_and_input_grad()
    assert winograd_calls  # TINY's 64-channel up-path convolutions and most of WIDE's run Winograd
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    stock = output_and_input_grad()
    assert ours[0].abs().max() > 0.1  # a model whose output is ~0 would make this test vacuous
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_engine_layout_is_channels_last_on_the_cpu_and_computes_the_same_function(monkeypatch, backend):
    # What the default model runs as on the CPU: the function (and the gradient an attack takes) must not move.
    model = randomize(NCSNpp(TINY), seed=5).eval().requires_grad_(False)
    engine = engine_layout(copy.deepcopy(model))
    convs = [m.weight for m in engine.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    gen = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, generator=gen) * 999

    def output_and_input_grad(net):
        leaf = x.clone().requires_grad_()
        out = net(leaf, t)
        return out.detach(), torch.autograd.grad(out.square().sum(), leaf)[0]

    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    reference = output_and_input_grad(model)
    monkeypatch.setenv("RDP_CORE_BACKEND", backend)
    ours = output_and_input_grad(engine)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_engine_layout_refuses_a_model_spread_over_devices():
    model = NCSNpp(TINY)
    model.all_modules[0].to("meta")
    with pytest.raises(ValueError, match="spread over devices"):
        engine_layout(model)


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_rescaled_skip_is_the_plain_sum_bit_for_bit(h_dtype):
    # Summed in place in the convolution's output, yet the same values and dtype as (x + h) / sqrt(2), also when
    # autocast hands a bfloat16 h beside a float32 x (the wider result is kept, not rounded into h).
    from rdp_core.models.ncsnpp import _rescaled_skip

    x, h = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4).to(h_dtype)
    expected = (x + h) / math.sqrt(2.0)
    out = _rescaled_skip(x, h.clone())
    assert out.dtype == expected.dtype and torch.equal(out, expected)
