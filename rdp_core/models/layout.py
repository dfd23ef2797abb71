"""The memory layout a model's weights should have for the engine's kernels on the model's device.

On the CPU that is channels-last (NHWC): oneDNN runs convolutions on NHWC data natively, where NCHW costs a
reorder of every activation into and out of each convolution, and the fused C++ group norms and the
attention read NHWC in place. On a GPU it is plain NCHW for now: the Triton norms and attention read NHWC
in place too, and cuDNN's convolutions would lose their layout transposes, but whether channels-last is
faster there is unmeasured (bench_model's and bench_purify's channels-last GPU rows will say). A
convolution's output takes its weight's (or its input's) channels-last layout, so converting the weights and
the input once is enough: activations follow, every block returns its input's layout (tests/models/
test_layout.py), and outputs stay correct in either layout.
"""
import torch


def engine_layout(model):
    """Converts `model`'s 4-D parameters and buffers in place to the fastest layout for the device they are on
    (channels-last on the CPU, contiguous NCHW elsewhere) and returns the model. Call it again after moving
    the model to another device."""
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"engine_layout: the model's tensors are spread over devices {sorted(devices)}; "
                         "move it to one device first")
    on_cpu = devices == {"cpu"}
    return model.to(memory_format=torch.channels_last if on_cpu else torch.contiguous_format)


def memory_format_of(x):
    """The memory format x is laid out in: channels_last for a channels-last 4-D tensor that is not also plain
    contiguous (as with one channel or one pixel, where the two coincide), else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
