"""The decoder's fused paths (upsample + convolution, LayerNorm + activation) equal the plain ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgnetpp_pl.models.blocks import AdaptiveInstanceNorm2d, LayerNorm
from dgnetpp_pl.models.decoder import Decoder
from dgnetpp_pl.models.fused_norms import adain_act, layer_norm_act
from dgnetpp_pl.models.upsample_conv import phase_kernels, upsample_conv2d


def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pad_type: str) -> torch.Tensor:
    r = w.shape[-1] // 2
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.conv2d(F.pad(up, (r,) * 4, mode="reflect" if pad_type == "reflect" else "constant"), w, b)


@pytest.mark.parametrize("pad_type", ["reflect", "zero"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("size", [(9, 5), (4, 4), (2, 3)])
def test_fused_equals_upsample_then_conv(pad_type: str, kernel: int, size: tuple[int, int]) -> None:
    if pad_type == "reflect" and kernel // 2 >= 2 * min(size):
        pytest.skip("reflect padding wider than the upsampled map is invalid for the plain path too")
    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 6, *size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, kernel, kernel, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    fused, ref = upsample_conv2d(x, w, b, pad_type), plain(x, w, b, pad_type)
    assert fused.shape == ref.shape == (2, 4, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(fused, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-11)


def test_phase_kernels_preserve_the_kernel_sum_per_phase() -> None:
    # Every phase reads each of the K*K taps exactly once, so each phase kernel sums to the original.
    w = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    k = phase_kernels(w)
    assert k.shape == (12, 2, 3, 3)
    sums = k.sum((2, 3)).reshape(3, 4, 2)
    torch.testing.assert_close(sums, w.sum((2, 3))[:, None, :].expand(3, 4, 2))


def test_phase_kernels_reject_even_kernels() -> None:
    with pytest.raises(ValueError, match="odd square kernel"):
        phase_kernels(torch.randn(2, 2, 4, 4))


def test_upsample_conv_rejects_unknown_padding_and_mismatched_channels() -> None:
    x, w = torch.randn(1, 3, 6, 6), torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="pad_type"):
        upsample_conv2d(x, w, None, "replicate")
    with pytest.raises(ValueError, match="does not match kernel"):
        upsample_conv2d(torch.randn(1, 4, 6, 6), w, None)


def test_decoder_fused_and_plain_paths_agree_and_fused_saves_less() -> None:
    torch.manual_seed(0)
    kw = {"content_dim": 32, "code_dim": 64, "n_res": 4, "n_upsample": 2, "mlp_dim": 16}
    fused, slow = Decoder(**kw, fused=True), Decoder(**kw, fused=False)
    slow.load_state_dict(fused.state_dict())
    s = torch.randn(3, 32, 16, 8, dtype=torch.float64, requires_grad=True)
    code = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    outs, grads, saved_numel = [], [], []
    for dec in (fused.double(), slow.double()):
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = dec(s, code)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([s.grad.clone(), code.grad.clone()] + [p.grad.clone() for p in dec.parameters()])
        saved_numel.append(sum(saved))
        s.grad, code.grad = None, None
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert saved_numel[0] < 0.9 * saved_numel[1], saved_numel


FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("slope", [0.2, 0.0, 1.0])
def test_fused_layer_norm_act_equals_the_composed_modules(slope: float, fmt: torch.memory_format) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, 4, dtype=torch.float64, generator=gen) * 3 + 1
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    norm = LayerNorm(5).double()
    with torch.no_grad():
        norm.beta.normal_(generator=gen)
    fused = layer_norm_act(x, norm.gamma, norm.beta, norm.eps, slope)
    ref = F.leaky_relu(norm(x), slope) if slope != 1.0 else norm(x)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    params = (x, norm.gamma, norm.beta)
    for a, e in zip(torch.autograd.grad(fused, params, grad), torch.autograd.grad(ref, params, grad), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_fused_layer_norm_act_keeps_the_dtype_and_checks_shapes() -> None:
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    out = layer_norm_act(x, torch.ones(4), torch.zeros(4), slope=0.2)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"must be \(4,\)"):
        layer_norm_act(x, torch.ones(3), torch.zeros(4))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("slope", [0.2, 0.0, 1.0])
def test_fused_adain_act_equals_the_composed_modules(slope: float, fmt: torch.memory_format) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, 4, dtype=torch.float64, generator=gen) * 2 - 1
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    gamma = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    beta = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    norm = AdaptiveInstanceNorm2d(5)
    fused = adain_act(x, gamma, beta, norm.eps, slope)
    ref = F.leaky_relu(norm(x, gamma, beta), slope)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    params = (x, gamma, beta)
    for a, e in zip(torch.autograd.grad(fused, params, grad), torch.autograd.grad(ref, params, grad), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"must both be \(3, 5\)"):
        adain_act(x, gamma[:, :4], beta)


def test_fused_norm_statistics_stay_accurate_in_fp32_far_from_zero() -> None:
    # A mean 1000 stds from zero: single-pass sum-of-squares statistics would lose every digit here.
    gen = torch.Generator().manual_seed(5)
    x64 = torch.randn(2, 4, 16, 8, dtype=torch.float64, generator=gen) + 1000.0
    gamma, beta = torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    ref = adain_act(x64, gamma, beta)
    torch.testing.assert_close(adain_act(x64.float(), gamma.float(), beta.float()).double(), ref, rtol=0, atol=2e-3)
    ref_ln = layer_norm_act(x64, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    out_ln = layer_norm_act(x64.float(), torch.ones(4), torch.zeros(4)).double()
    torch.testing.assert_close(out_ln, ref_ln, rtol=0, atol=2e-3)
