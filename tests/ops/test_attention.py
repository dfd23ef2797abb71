import pytest
import torch
import torch.nn.functional as F

from rdp_core.ops.attention import attention, attention_reference


@pytest.mark.parametrize("shape", [(2, 1, 64, 128), (1, 4, 256, 64), (3, 1, 49, 32), (2, 2, 221, 17)])
def test_attention_matches_the_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    expected = attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(attention(q, k, v).double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attention_reference(q, k, v).double(), expected, atol=1e-5, rtol=1e-4)


def test_attention_gradients_match_autograd_through_the_reference():
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(2, 1, 16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(2, 1, 16, 8, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(attention(*leaves), leaves, grad_out)
    ref = torch.autograd.grad(attention_reference(*leaves), leaves, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_reference_is_softmax_attention():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    manual = F.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    torch.testing.assert_close(attention_reference(q, k, v), manual)


def test_bad_shapes_and_backends_are_explained():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, q[..., :4], q)
    with pytest.raises(ValueError, match="one shape"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="no 'cpp' backend"):
        attention(q, q, q, backend="cpp")
