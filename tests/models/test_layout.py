"""A model keeps the memory layout it is given: NCHW stays NCHW, channels-last stays channels-last.

On a GPU the NCHW engine layout once ran channels-last from DDPM++'s first attention block on (the attention
result is a channels-last view), with layout conversions around cuDNN's convolutions and strided kernels for
the skip sums and concatenations that met both layouts. The torch backend here is what the GPU's layout
rules are on the CPU; tests/kernels/test_models_on_gpu.py checks the Triton path on CUDA.
"""
import pytest
import torch

from rdp_core.models.adm import ADMConfig, UNetModel
from rdp_core.models.layout import memory_format_of
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp
from tiny_models import layout_leaks

FORMATS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def _ncsnpp():
    return NCSNpp(DDPMppConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)), 16


def _adm():
    config = ADMConfig(image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                       num_head_channels=16, num_res_blocks=1, use_fp16=False)
    return UNetModel(config), 16


@pytest.mark.parametrize("build", [_ncsnpp, _adm], ids=["ddpmpp", "adm"])
@pytest.mark.parametrize("layout", FORMATS)
def test_every_block_keeps_the_models_memory_layout(monkeypatch, build, layout):
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    net, size = build()
    memory_format = FORMATS[layout]
    net = net.eval().to(memory_format=memory_format)
    x = torch.randn(2, 3, size, size).contiguous(memory_format=memory_format)
    assert layout_leaks(net, memory_format, x, torch.full((2,), 50.0)) == []


def test_memory_format_of():
    x = torch.randn(2, 4, 3, 3)
    assert memory_format_of(x) is torch.contiguous_format
    assert memory_format_of(x.contiguous(memory_format=torch.channels_last)) is torch.channels_last
    one_channel = torch.randn(2, 1, 3, 3).contiguous(memory_format=torch.channels_last)
    assert memory_format_of(one_channel) is torch.contiguous_format
    assert memory_format_of(x[:, :, :, :2]) is torch.contiguous_format  # neither: a plain copy is the default
