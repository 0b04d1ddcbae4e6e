"""Networks: reference shapes and parameter counts, statelessness of AdaIN, encoder utilities."""

from __future__ import annotations

import math
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dgnetpp_pl.models import (
    AdaptiveInstanceNorm2d,
    AppearanceEncoder,
    Decoder,
    DomainDiscriminator,
    Generator,
    LayerNorm,
    MultiScaleImageDiscriminator,
    StructureEncoder,
    to_gray,
)


def conv(k: int, cin: int, cout: int) -> int:
    """Parameters of a k x k Conv2d with bias."""
    return k * k * cin * cout + cout


def lin(i: int, o: int) -> int:
    """Parameters of a Linear with bias."""
    return i * o + o


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_batch() -> torch.Tensor:
    return torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def small_encoder() -> AppearanceEncoder:
    torch.manual_seed(0)
    return AppearanceEncoder(num_classes=7, arch="resnet18", bottleneck_dim=32)


# ---------------------------------------------------------------- paper-size shapes and parameter counts


@torch.no_grad()
def test_paper_appearance_encoder_shapes(paper_batch):
    enc = AppearanceEncoder(num_classes=751).eval()
    fmap = enc.feature_map(paper_batch)
    out = enc(paper_batch)
    assert fmap.shape == (2, 2048, 16, 8)
    assert out.code.shape == (2, 8192) and enc.code_dim == 8192
    assert out.feat.shape == (2, 2048) and enc.feature_dim == 2048
    assert [t.shape for t in out.logits] == [(2, 751), (2, 751)] and enc.num_classes == 751
    assert [t.shape for t in out.embeddings] == [(2, 512), (2, 512)]
    # Channel-major flatten: code[b, c*4 + p] is the max of channel c over horizontal stripe p.
    stripes = fmap.view(2, 2048, 4, 4, 8).amax(dim=(3, 4))
    torch.testing.assert_close(out.code.view(2, 2048, 4), stripes)
    torch.testing.assert_close(out.feat, fmap.amax(dim=(2, 3)))
    # Heads: 2 x [Linear 2048->512, BN(512), Linear 512->751]; the ImageNet fc is gone.
    head = lin(2048, 512) + 2 * 512 + lin(512, 751)
    assert sum(p.numel() for p in enc.head_parameters()) == 2 * head
    assert not any("fc" in name for name, _ in enc.named_parameters())


def test_appearance_code_detached_feature_not(small_encoder):
    x = torch.randn(2, 3, 64, 32)
    out = small_encoder(x)
    assert not out.code.requires_grad
    assert out.feat.requires_grad
    kept = AppearanceEncoder(num_classes=3, arch="resnet18", detach_code=False)(x)
    assert kept.code.requires_grad


@torch.no_grad()
def test_paper_structure_encoder_shape_and_params(paper_batch):
    enc = StructureEncoder()
    s = enc(to_gray(paper_batch))
    assert s.shape == (2, 128, 64, 32) and enc.out_dim == 128
    trunk = conv(3, 1, 16) + conv(3, 16, 32) + conv(3, 32, 32) + conv(3, 32, 64)
    res = 4 * 2 * conv(3, 64, 64)
    aspp = conv(1, 64, 32) + 3 * (conv(1, 64, 32) + conv(3, 32, 32)) + conv(1, 128, 128)
    assert n_params(enc) == trunk + res + aspp


@torch.no_grad()
def test_paper_decoder_shape_and_params():
    dec = Decoder()
    img = dec(torch.randn(2, 128, 64, 32), torch.randn(2, 8192))
    assert img.shape == (2, 3, 256, 128)
    adain_res = 4 * 2 * conv(3, 128, 128)
    up = conv(5, 128, 64) + 2 * 64 + conv(5, 64, 32) + 2 * 32  # convs + LayerNorm gamma/beta
    head = 2 * conv(3, 32, 32) + conv(1, 32, 3)
    mlps = 8 * (lin(2048, 512) + lin(512, 512) + lin(512, 256))
    assert n_params(dec) == adain_res + up + head + mlps
    assert len(list(dec.buffers())) == 0


@torch.no_grad()
def test_paper_image_discriminator_shapes_and_params(paper_batch):
    dis = MultiScaleImageDiscriminator()
    outs = dis(paper_batch)
    assert [tuple(o.shape) for o in outs] == [(2, 1, 64, 32), (2, 1, 32, 16), (2, 1, 16, 8)]
    per_scale = conv(1, 3, 32) + 3 * conv(3, 32, 32) + conv(3, 32, 64) + 4 * 2 * conv(3, 64, 64) + conv(1, 64, 1)
    assert n_params(dis) == 3 * per_scale


def test_image_discriminator_scales_use_avgpool(paper_batch):
    dis = MultiScaleImageDiscriminator(num_scales=2)
    with torch.no_grad():
        outs = dis(paper_batch)
        pooled = F.avg_pool2d(paper_batch, 3, stride=2, padding=1, count_include_pad=False)
        torch.testing.assert_close(outs[1], dis.nets[1](pooled))


def test_domain_discriminator_shape_and_params():
    dis = DomainDiscriminator()
    out = dis(torch.randn(4, 2048))
    assert out.shape == (4,)
    bn = 2
    expected = lin(2048, 1024) + bn * 1024 + lin(1024, 512) + bn * 512 + lin(512, 256) + bn * 256 + lin(256, 1)
    assert n_params(dis) == expected
    with pytest.raises(ValueError, match="expects features"):
        dis(torch.randn(4, 2048, 1))


# ---------------------------------------------------------------- appearance encoder details


@pytest.mark.parametrize(("last_stride", "size"), [(1, (4, 2)), (2, (2, 1))])
def test_resnet18_last_stride(last_stride, size):
    enc = AppearanceEncoder(num_classes=3, arch="resnet18", last_stride=last_stride)
    with torch.no_grad():
        fmap = enc.feature_map(torch.randn(1, 3, 64, 32))
    assert fmap.shape == (1, 512, *size)
    assert enc.code_dim == 2048


def test_parameters_split_into_backbone_and_heads(small_encoder):
    backbone = {id(p) for p in small_encoder.backbone_parameters()}
    heads = {id(p) for p in small_encoder.head_parameters()}
    assert backbone.isdisjoint(heads)
    assert backbone | heads == {id(p) for p in small_encoder.parameters()}
    assert id(small_encoder.head2.classifier.weight) in heads


def test_functional_call_with_detached_params(small_encoder):
    enc = small_encoder.eval()
    x = torch.randn(2, 3, 64, 32, requires_grad=True)
    state = {k: v.detach() for k, v in enc.named_parameters()}
    state.update(dict(enc.named_buffers()))
    out = torch.func.functional_call(enc, state, (x,))
    ref = enc(x)
    for a, b in zip(out.logits + (out.feat,), ref.logits + (ref.feat,), strict=True):
        torch.testing.assert_close(a, b)
    enc.zero_grad(set_to_none=True)
    out.logits[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_pretrained_download_failure_explains_fix(monkeypatch):
    def offline(self, *args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError) as info:
        AppearanceEncoder(num_classes=3, arch="resnet18", pretrained=True)
    msg = str(info.value)
    assert "TORCH_HOME" in msg and "model.pretrained=false" in msg
    assert "resnet18-f37072fd.pth" in msg


def test_pretrained_weights_come_from_the_enum(monkeypatch):
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(0.5)
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", lambda self, **kw: state)
    enc = AppearanceEncoder(num_classes=3, arch="resnet18", pretrained=True)
    assert torch.all(enc.backbone.conv1.weight == 0.5)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        AppearanceEncoder(num_classes=3, arch="vgg16")


# ---------------------------------------------------------------- norms and AdaIN


def test_adain_output_statistics_follow_gamma_beta():
    x = torch.randn(3, 4, 16, 8) * 5 + 2
    gamma = torch.rand(3, 4) + 0.5
    beta = torch.randn(3, 4)
    out = AdaptiveInstanceNorm2d(4)(x, gamma, beta)
    torch.testing.assert_close(out.mean(dim=(2, 3)), beta, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3), unbiased=False), gamma, atol=1e-4, rtol=1e-4)
    assert len(list(AdaptiveInstanceNorm2d(4).buffers())) == 0
    with pytest.raises(ValueError, match="must both be"):
        AdaptiveInstanceNorm2d(4)(x, gamma[:, :3], beta)


def test_layernorm_uses_unbiased_std_over_chw():
    torch.manual_seed(0)
    norm = LayerNorm(3)
    assert torch.all((norm.gamma >= 0) & (norm.gamma <= 1)) and torch.all(norm.beta == 0)
    with torch.no_grad():
        norm.gamma.copy_(torch.tensor([1.0, 2.0, 3.0]))
        norm.beta.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(2, 3, 5, 4) * 3 + 1
    flat = x.view(2, -1)
    mu = flat.mean(1).view(2, 1, 1, 1)
    sigma = flat.std(1, unbiased=True).view(2, 1, 1, 1)
    expected = (x - mu) / (sigma + 1e-5) * norm.gamma.view(1, 3, 1, 1) + norm.beta.view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)


# ---------------------------------------------------------------- decoder / generator


@pytest.fixture
def small_decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(content_dim=32, code_dim=64, n_res=4, n_upsample=2, mlp_dim=16)


def test_decoder_is_stateless_between_calls(small_decoder):
    dec = small_decoder
    s = torch.randn(2, 32, 8, 4)
    codes = torch.randn(2, 64)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    with torch.no_grad():
        first = dec(s[:1], codes[:1])
        second = dec(s[1:], codes[1:])
        batched = dec(s, codes)
        again = dec(s[:1], codes[:1])
    assert batched.shape == (2, 3, 32, 16)
    torch.testing.assert_close(torch.cat([first, second]), batched, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, first)
    after = dec.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.allclose(first, second)


def test_adain_chunk_k_drives_resblock_k(small_decoder):
    dec = small_decoder
    code = torch.randn(2, 64)
    changed = code.clone()
    changed[:, 32:48] += 1.0  # chunk 2 of 4 (16 values each)
    with torch.no_grad():
        a, b = dec.adain_params(code), dec.adain_params(changed)
    assert len(a) == 4
    for k in range(4):
        for layer in range(2):
            for t_a, t_b in zip(a[k][layer], b[k][layer], strict=True):
                assert t_a.shape == (2, 32)
                assert torch.equal(t_a, t_b) == (k != 2)
    # gamma of layer 1 and 2 of block k are the two halves of mlp_w[k]'s output.
    with torch.no_grad():
        w = dec.mlp_w[1](code[:, 16:32])
    torch.testing.assert_close(a[1][0][0], w[:, :32])
    torch.testing.assert_close(a[1][1][0], w[:, 32:])


def test_decoder_rejects_wrong_code_dim(small_decoder):
    with pytest.raises(ValueError, match=r"appearance code must be \(B, 64\)"):
        small_decoder(torch.randn(1, 32, 8, 4), torch.randn(1, 63))
    with pytest.raises(ValueError, match="must split into"):
        Decoder(code_dim=100, n_res=3)


def test_generator_encodes_gray_and_round_trips_shape():
    torch.manual_seed(0)
    gen = Generator(dim=4, code_dim=64, mlp_dim=16, aspp_dilations=(1, 2, 3))
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        s = gen.encode(x)
        torch.testing.assert_close(s, gen.encoder(x.mean(dim=1, keepdim=True)))
        assert s.shape == (2, 32, 8, 4)
        assert gen(x, torch.randn(2, 64)).shape == x.shape
    torch.testing.assert_close(to_gray(x), (x[:, 0:1] + x[:, 1:2] + x[:, 2:3]) / 3)
    with pytest.raises(ValueError, match="RGB batch"):
        to_gray(torch.randn(2, 1, 8, 8))


def test_aspp_reports_too_small_maps():
    enc = StructureEncoder(dim=4)
    with pytest.raises(ValueError, match="smaller ASPP dilations"):
        enc(torch.randn(1, 1, 32, 16))  # 8x4 map, reflect padding 9


def test_initialisation_schemes():
    torch.manual_seed(0)
    dec = Decoder()
    conv1 = dec.res_blocks[0].conv1.conv
    fan_in = 128 * 9
    assert math.isclose(conv1.weight.std().item(), math.sqrt(2.0 / fan_in), rel_tol=0.03)
    assert torch.all(conv1.bias == 0)
    assert math.isclose(dec.mlp_w[0][0].weight.std().item(), math.sqrt(2.0 / 2048), rel_tol=0.03)
    dis = MultiScaleImageDiscriminator()
    res_conv = dis.nets[0][5][0].conv1.conv
    assert math.isclose(res_conv.weight.std().item(), 0.02, rel_tol=0.03)
    assert torch.all(res_conv.bias == 0)
    dom = DomainDiscriminator()
    assert math.isclose(dom.model[0].weight.std().item(), 0.02, rel_tol=0.03)
    assert torch.all(dom.model[1].weight == 1)


def test_decoder_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    kw = {"content_dim": 32, "code_dim": 64, "n_res": 4, "n_upsample": 2, "mlp_dim": 16}
    plain, ckpt = Decoder(**kw), Decoder(**kw, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    s = torch.randn(3, 32, 8, 4, requires_grad=True)
    code = torch.randn(3, 64, requires_grad=True)
    outs, grads = [], []
    for dec in (plain, ckpt):
        out = dec(s, code)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([s.grad.clone(), code.grad.clone()] + [p.grad.clone() for p in dec.parameters()])
        s.grad, code.grad = None, None
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    # The checkpointed decoder keeps fewer activations for backward.
    counts = []
    for dec in (plain, ckpt):
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dec(s, code)
        counts.append(sum(saved))
    assert counts[1] < 0.5 * counts[0], counts
