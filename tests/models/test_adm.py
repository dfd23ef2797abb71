"""guided-diffusion's ADM UNet: layout and key names of the 256x256 unconditional model, arithmetic,
checkpoint loading and fp16 inference."""
import math

import pytest
import torch
import torch.nn.functional as F

from rdp_core.models.adm import (
    IMAGENET256_UNCOND,
    ADMConfig,
    ADMEpsModel,
    AttentionBlock,
    ResBlock,
    UNetModel,
    load_guided_diffusion_checkpoint,
    timestep_embedding,
)
from rdp_core.models.checkpoint import CheckpointMismatch

TINY = ADMConfig(image_size=32, model_channels=32, channel_mult=(1, 2), attention_resolutions=(16,),
                 num_head_channels=16, use_fp16=False)


def test_imagenet_256_uncond_has_guided_diffusions_layout():
    with torch.device("meta"):  # 553M parameters: shapes only, no memory
        net = UNetModel(IMAGENET256_UNCOND)
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 552_814_086
    assert len(net.input_blocks) == 18 and len(net.output_blocks) == 18 and len(state) == 566
    # Attention at 32, 16 and 8 pixels: input blocks 10-11, 13-14, 16-17 and the middle block.
    assert sorted({k.split(".qkv")[0] for k in state if ".qkv.weight" in k})[:4] == [
        "input_blocks.10.1", "input_blocks.11.1", "input_blocks.13.1", "input_blocks.14.1"]
    for key in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.weight",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.7.0.skip_connection.weight",
                "middle_block.1.norm.weight", "middle_block.1.proj_out.weight", "output_blocks.2.1.qkv.weight",
                "output_blocks.2.2.in_layers.0.weight",
                "out.0.weight", "out.2.weight"]:
        assert key in state, key
    assert tuple(state["input_blocks.1.0.emb_layers.1.weight"].shape) == (512, 1024)  # scale and shift
    assert tuple(state["middle_block.1.qkv.weight"].shape) == (3072, 1024, 1)
    assert tuple(state["out.2.weight"].shape) == (6, 256, 3, 3)  # learn_sigma


def test_timestep_embedding_is_guided_diffusions():
    t = torch.tensor([0.0, 7.0, 999.0])
    frequencies = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    angles = t[:, None] * frequencies
    torch.testing.assert_close(timestep_embedding(t, 8), torch.cat([torch.cos(angles), torch.sin(angles)], 1))


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


@pytest.mark.parametrize("scale_shift, up, down, out", [(True, False, False, 64), (True, False, True, 32),
                                                       (False, True, False, 32), (False, False, False, 64)])
def test_res_block_matches_guided_diffusion_arithmetic(scale_shift, up, down, out):
    block = randomize(ResBlock(32, 20, 0.0, out, scale_shift, up=up, down=down))
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 20)
    gn = lambda h, norm: F.group_norm(h, 32, norm.weight, norm.bias)  # noqa: E731
    resample = (lambda t: F.interpolate(t, scale_factor=2.0)) if up else \
        (lambda t: F.avg_pool2d(t, 2)) if down else (lambda t: t)
    h = block.in_layers[2](resample(F.silu(gn(x, block.in_layers[0]))))
    emb_out = block.emb_layers[1](F.silu(emb))[:, :, None, None]
    if scale_shift:
        scale, shift = emb_out.chunk(2, dim=1)
        h = gn(h, block.out_layers[0]) * (1 + scale) + shift
    else:
        h = gn(h + emb_out, block.out_layers[0])
    h = block.out_layers[3](F.silu(h))
    torch.testing.assert_close(block(x, emb), block.skip_connection(resample(x)) + h, atol=1e-5, rtol=1e-5)


def test_attention_block_matches_the_legacy_qkv_attention():
    block = randomize(AttentionBlock(64, num_head_channels=16))
    x = torch.randn(2, 64, 4, 4)
    qkv = block.qkv(F.group_norm(x.reshape(2, 64, 16), 32, block.norm.weight, block.norm.bias))
    q, k, v = qkv.reshape(2 * 4, 3 * 16, 16).split(16, dim=1)  # heads first, then q, k, v
    scale = 1 / math.sqrt(math.sqrt(16))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(2, 64, 16)
    expected = (x.reshape(2, 64, 16) + block.proj_out(h)).reshape(2, 64, 4, 4)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_loads_strictly_and_fp16_inference_stays_close(tmp_path):
    source = randomize(UNetModel(TINY))
    torch.save(source.state_dict(), tmp_path / "model.pt")
    model = load_guided_diffusion_checkpoint(tmp_path / "model.pt", TINY)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.05, 0.3])
    with torch.no_grad():
        expected = source(x, t * 1000 - 1)[:, :3]
        torch.testing.assert_close(model(x, t), expected)
        half = load_guided_diffusion_checkpoint(tmp_path / "model.pt", ADMConfig(**{**TINY.__dict__, "use_fp16": True}))
        assert half.net.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
        assert half.net.time_embed[0].weight.dtype == torch.float32 and half(x, t).dtype == torch.float32
        assert (half(x, t) - expected).abs().max() < 2e-2 * expected.abs().max()
    wider = ADMConfig(**{**TINY.__dict__, "model_channels": 64})
    with pytest.raises(CheckpointMismatch, match="shapes differ"):
        load_guided_diffusion_checkpoint(tmp_path / "model.pt", wider)


def test_eps_wrapper_maps_continuous_time_to_the_discrete_index():
    net = randomize(UNetModel(TINY))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ADMEpsModel(net)(x, torch.tensor([0.1])), net(x, torch.tensor([99.0]))[:, :3])


def test_every_group_norm_runs_on_rdp_core_ops(assert_norms_run_on_rdp_core_ops):
    # GroupNorm32, the fused GroupNormSiLU and the scale-shift norm all go through rdp_core.ops.
    out = assert_norms_run_on_rdp_core_ops(UNetModel(TINY).eval(), torch.randn(1, 3, 32, 32), torch.tensor([10.0]))
    assert out.shape == (1, 6, 32, 32)


def test_group_norm32_keeps_float32_statistics_and_the_input_dtype():
    from rdp_core.models.adm import GroupNorm32

    norm = randomize(GroupNorm32(32, 64))
    assert list(norm.state_dict()) == ["weight", "bias"]
    x = (torch.randn(2, 64, 5, 5) * 30 + 100).half()  # float16 statistics would lose most of the variance
    y = norm(x)
    assert y.dtype == torch.float16
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias).half()
    torch.testing.assert_close(y, expected, atol=2e-3, rtol=2e-3)
