"""Our 3D LoRA (bids_adhd.learn.lora): exactness at init, merge/unmerge, equality
with PEFT's Conv3d LoRA, the kernel2d factorisation against an explicit ΔW,
geometry, parameter-count formulas, injection into a (narrow) SegResEncoder."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bids_adhd.errors import UsageError
from bids_adhd.learn.lora import (DEFAULT_TARGET, LoRAConv3d, inject_lora, lora_parameter_count, merge_lora,
                                  parameter_report, unmerge_lora)


def _rand_lora(layer: LoRAConv3d, seed: int = 1) -> LoRAConv3d:
    """Give B (zero at init) random values so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return layer


def _reference_delta(layer: LoRAConv3d) -> torch.Tensor:
    """ΔW written out index by index from the documented definitions (no reshape tricks)."""
    c_out, c_in, kd, kh, kw = layer.base_layer.weight.shape
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    delta = torch.zeros(c_out, c_in, kd, kh, kw, dtype=A.dtype)
    for o in range(c_out):
        for i in range(c_in):
            for d in range(kd):
                for h in range(kh):
                    for w in range(kw):
                        if layer.factorisation == "flat":
                            col = ((i * kd + d) * kh + h) * kw + w
                            delta[o, i, d, h, w] = B[o] @ A[:, col]
                        else:
                            delta[o, i, d, h, w] = B[o * kd + d] @ A[:, (i * kh + h) * kw + w]
    return delta


def _reference_forward(layer: LoRAConv3d, x: torch.Tensor, A=None, B=None) -> torch.Tensor:
    """conv(x, W + s·ΔW) with the base geometry, ΔW built with einsum from (A, B)."""
    base = layer.base_layer
    c_out, c_in, kd, kh, kw = base.weight.shape
    A = layer.lora_A if A is None else A
    B = layer.lora_B if B is None else B
    if layer.factorisation == "flat":
        delta = (B @ A).reshape(c_out, c_in, kd, kh, kw)
    else:
        delta = torch.einsum("odj,jihw->oidhw", B.reshape(c_out, kd, -1), A.reshape(-1, c_in, kh, kw))
    return F.conv3d(x, base.weight + layer.scaling * delta, base.bias, base.stride, base.padding, base.dilation)


@pytest.mark.parametrize("factorisation", ["flat", "kernel2d"])
def test_wrapped_layer_equals_base_exactly_at_init(factorisation):
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, 3, padding=1, bias=True)
    layer = LoRAConv3d(copy.deepcopy(conv), rank=4, alpha=8, factorisation=factorisation)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(2, 3, 8, 8, 8)
    assert torch.equal(layer(x), conv(x))
    assert not layer.base_layer.weight.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("factorisation", ["flat", "kernel2d"])
def test_merge_after_a_step_matches_adapter_and_unmerge_restores(factorisation):
    torch.manual_seed(0)
    layer = LoRAConv3d(nn.Conv3d(4, 6, 3, padding=1, bias=False), rank=2, alpha=4, factorisation=factorisation)
    w0 = layer.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    x = torch.randn(2, 4, 8, 8, 8)
    layer(x).square().mean().backward()
    opt.step()
    assert torch.count_nonzero(layer.lora_B) > 0          # the step moved B off zero
    layer.eval()
    with torch.no_grad():
        y_adapter = layer(x)
        assert not torch.allclose(y_adapter, layer.base_layer(x))   # the update does something
        layer.merge()
        assert layer.merged
        y_merged = layer(x)
        # tolerance: float32 accumulation-order differences, 1e-5 relative to the output scale
        assert torch.allclose(y_merged, y_adapter, rtol=1e-5, atol=1e-5 * y_adapter.abs().max().item())
        layer.unmerge()
        assert not layer.merged
        assert torch.allclose(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
        assert torch.allclose(layer(x), y_adapter, rtol=1e-5, atol=1e-5 * y_adapter.abs().max().item())


def test_flat_equals_peft_conv3d_lora_outputs_and_gradients():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    host = nn.Module()
    host.conv = nn.Conv3d(4, 6, 3, stride=2, padding=1, bias=True).double()
    ours = _rand_lora(LoRAConv3d(copy.deepcopy(host.conv), rank=3, alpha=6.0, factorisation="flat"))
    theirs_host = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6.0, target_modules=["conv"]),
                                               copy.deepcopy(host))
    theirs = theirs_host.conv
    pa, pb = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    assert pa.shape == (3, 4, 3, 3, 3) and pb.shape == (6, 3, 1, 1, 1)
    with torch.no_grad():                      # same A and B in both
        pa.copy_(ours.lora_A.reshape(pa.shape))
        pb.copy_(ours.lora_B.reshape(pb.shape))
    x = torch.randn(2, 4, 9, 10, 11, dtype=torch.double)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.shape == y2.shape == (2, 6, 5, 5, 6)
    assert torch.allclose(y1, y2, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(y1)
    y1.backward(grad_out)
    y2.backward(grad_out)
    assert torch.allclose(x1.grad, x2.grad, rtol=0, atol=1e-12)
    assert torch.allclose(ours.lora_A.grad.reshape(pa.shape), pa.grad, rtol=0, atol=1e-12)
    assert torch.allclose(ours.lora_B.grad.reshape(pb.shape), pb.grad, rtol=0, atol=1e-12)
    assert torch.allclose(ours.delta_weight(), theirs.get_delta_weight("default"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("factorisation", ["flat", "kernel2d"])
def test_delta_weight_matches_index_by_index_definition(factorisation):
    torch.manual_seed(0)
    layer = _rand_lora(LoRAConv3d(nn.Conv3d(2, 3, (3, 2, 3), bias=False).double(), rank=2,
                                  factorisation=factorisation))
    assert torch.allclose(layer.delta_weight(scaled=False), _reference_delta(layer), rtol=0, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), layer.scaling * _reference_delta(layer), rtol=0, atol=1e-12)


@pytest.mark.parametrize("factorisation", ["flat", "kernel2d"])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=(3, 5, 3), stride=(2, 1, 2), padding=(2, 1, 0), dilation=(2, 1, 2)),
    dict(kernel_size=3, stride=1, padding="same", dilation=(1, 2, 1)),
])
def test_branch_equals_conv_with_updated_kernel_and_keeps_geometry(factorisation, geometry):
    """The efficient two-convolution branch == conv(x, W + s·ΔW) with the base's stride/padding/dilation
    (outputs and gradients w.r.t. x, A and B), for anisotropic kernels, strides and dilations."""
    torch.manual_seed(0)
    base = nn.Conv3d(3, 4, bias=True, **geometry).double()
    layer = _rand_lora(LoRAConv3d(copy.deepcopy(base), rank=2, alpha=3.0, factorisation=factorisation))
    x = torch.randn(2, 3, 11, 12, 13, dtype=torch.double)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    A2, B2 = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    y = layer(x1)
    y_ref = _reference_forward(layer, x2, A2, B2)
    assert y.shape == base(x).shape == y_ref.shape
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for ours, ref in ((x1.grad, x2.grad), (layer.lora_A.grad, A2.grad), (layer.lora_B.grad, B2.grad)):
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert layer.stride == base.stride and layer.padding == base.padding and layer.dilation == base.dilation


def test_dropout_acts_on_the_lora_branch_only():
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 2, 3, padding=1, bias=False)
    layer = _rand_lora(LoRAConv3d(copy.deepcopy(conv), rank=2, dropout=0.5))
    x = torch.randn(1, 2, 6, 6, 6)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(1)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    # base output + scaled branch on the dropped-out input, with the same dropout mask
    torch.manual_seed(1)
    expected = conv(x) + layer._lora_branch(F.dropout(x, 0.5, training=True)) * layer.scaling
    assert torch.allclose(y_train, expected, atol=1e-6)


def test_unsupported_layers_are_refused_clearly():
    with pytest.raises(ValueError, match="groups=1"):
        LoRAConv3d(nn.Conv3d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        LoRAConv3d(nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="factorisation"):
        LoRAConv3d(nn.Conv3d(4, 4, 3), factorisation="tucker")
    with pytest.raises(TypeError):
        LoRAConv3d(nn.Conv2d(4, 4, 3))


@pytest.mark.parametrize("c_in,c_out,k,r", [(32, 32, (3, 3, 3), 8), (5, 7, (3, 1, 5), 3), (512, 512, (3, 3, 3), 8)])
def test_parameter_counts_equal_formulas(c_in, c_out, k, r):
    kd, kh, kw = k
    flat = LoRAConv3d(nn.Conv3d(c_in, c_out, k, bias=False, device="meta"), rank=r, factorisation="flat")
    k2d = LoRAConv3d(nn.Conv3d(c_in, c_out, k, bias=False, device="meta"), rank=r, factorisation="kernel2d")
    assert flat.num_lora_parameters() == r * (c_in * kd * kh * kw + c_out) == lora_parameter_count(c_in, c_out, k, r)
    assert k2d.num_lora_parameters() == r * (c_in * kh * kw + c_out * kd) == \
        lora_parameter_count(c_in, c_out, k, r, "kernel2d")
    assert tuple(flat.lora_A.shape) == (r, c_in * kd * kh * kw) and tuple(flat.lora_B.shape) == (c_out, r)
    assert tuple(k2d.lora_A.shape) == (r, c_in * kh * kw) and tuple(k2d.lora_B.shape) == (c_out * kd, r)


def _narrow_encoder(filters: int = 4):
    from monai.networks.nets.segresnet_ds import SegResEncoder
    return SegResEncoder(spatial_dims=3, init_filters=filters, in_channels=1, blocks_down=(1, 2, 2, 4, 4))


def test_inject_lora_into_segresencoder_targets_the_26_block_convs():
    torch.manual_seed(0)
    enc = _narrow_encoder()
    ref = copy.deepcopy(enc).eval()
    names = inject_lora(enc, DEFAULT_TARGET, rank=2, alpha=2.0)
    expected = [f"layers.{lvl}.blocks.{b}.conv{c}" for lvl, nb in enumerate((1, 2, 2, 4, 4))
                for b in range(nb) for c in (1, 2)]
    assert names == expected and len(names) == 26
    assert not any(re.search(DEFAULT_TARGET, n) for n in ("conv_init", "layers.0.downsample"))
    # trainable: LoRA factors (the formula) and norm affine parameters only
    widths = [4 * 2 ** lvl for lvl, nb in enumerate((1, 2, 2, 4, 4)) for _ in range(nb) for _ in (1, 2)]
    lora = sum(lora_parameter_count(c, c, (3, 3, 3), 2) for c in widths)
    norm = sum(2 * c for c in widths)                    # each conv has one BatchNorm before it
    rep = parameter_report(enc)
    assert rep["lora"] == lora and rep["norm"] == norm and rep["trainable"] == lora + norm
    assert rep["total"] == sum(p.numel() for p in ref.parameters()) + lora
    assert rep["per_layer"]["layers.4.blocks.3.conv2"] == lora_parameter_count(64, 64, (3, 3, 3), 2)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".norm" in n for n in trainable)
    x = torch.randn(1, 1, 16, 16, 16)
    enc.eval()
    with torch.no_grad():
        for a, b in zip(enc(x), ref(x)):
            assert torch.equal(a, b)
    # running it again does not wrap the wrapped layers
    with pytest.raises(UsageError, match="matches no Conv3d"):
        inject_lora(enc, r"conv_nothing$")


def test_merge_lora_on_a_model_and_no_train_norm():
    torch.manual_seed(0)
    enc = _narrow_encoder()
    inject_lora(enc, rank=2, factorisation="kernel2d", train_norm=False)
    assert parameter_report(enc)["norm"] == 0
    for m in enc.modules():
        if isinstance(m, LoRAConv3d):
            _rand_lora(m)
    enc.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        y = enc(x)[-1]
        assert merge_lora(enc) == 26
        y_merged = enc(x)[-1]
        assert unmerge_lora(enc) == 26
        y_back = enc(x)[-1]
    tol = 1e-5 * y.abs().max().item()
    assert torch.allclose(y_merged, y, rtol=1e-5, atol=tol) and torch.allclose(y_back, y, rtol=1e-5, atol=tol)
