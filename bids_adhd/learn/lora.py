"""Low-rank adaptation (LoRA) of 3D convolutions, written for clarity.

The model is PEFT's ``tuners/lora/layer.py`` (a layer that wraps a frozen base
layer, adds a scaled low-rank branch, and can merge/unmerge it); this module
re-implements that for ``nn.Conv3d`` only, with two ways of factorising the
weight update.

Notation: the base kernel ``W`` has shape ``(C_out, C_in, k_d, k_h, k_w)``
(``groups == 1``), the rank is ``r``, the scaling is ``s = alpha / r``. The
wrapped layer computes ``y = conv(x, W) + s * conv(dropout(x), ΔW)`` with the
base stride, padding and dilation, where ΔW is one of:

``flat`` (PEFT's Conv3d LoRA, the paper preset)
    ``ΔW.reshape(C_out, C_in·k_d·k_h·k_w) = B @ A`` with
    ``A: r × (C_in·k_d·k_h·k_w)`` and ``B: C_out × r``.
    Trainable parameters: ``r · (C_in·k_d·k_h·k_w + C_out)``.
    Computed as PEFT does: ``A`` as a Conv3d with the base kernel size,
    stride, padding and dilation (``r`` output channels), then ``B`` as a
    1×1×1 Conv3d.

``kernel2d`` (2D-factorised, loralib's ``ConvLoRA`` generalised to 3D)
    ``ΔW.permute(0, 2, 1, 3, 4).reshape(C_out·k_d, C_in·k_h·k_w) = B @ A`` with
    ``A: r × (C_in·k_h·k_w)`` and ``B: (C_out·k_d) × r``; i.e.
    ``ΔW[o, i, d, h, w] = Σ_j B[o·k_d + d, j] · A[j, (i, h, w)]``: every
    depth slice ``d`` of every output kernel ``o`` is a combination of the
    same ``r`` in-plane 2D kernels (rows of ``A``).
    Trainable parameters: ``r · (C_in·k_h·k_w + C_out·k_d)``.
    Computed without materialising ΔW as two convolutions: ``A`` as a
    ``1×k_h×k_w`` Conv3d (in-plane stride/padding/dilation, depth untouched,
    ``r`` output channels), then ``B`` as a ``k_d×1×1`` Conv3d (depth
    stride/padding/dilation). This is exact: the depth padding of the second
    convolution pads the first one's output with zeros, which is what a
    zero-padded input gives without bias.

Initialisation follows PEFT (and loralib): ``A`` Kaiming-uniform with
``a = sqrt(5)`` (fan-in = the number of columns of ``A``), ``B = 0``, so a
freshly wrapped layer returns exactly the base layer's output.

Note PEFT's own Conv3d LoRA (peft 0.21) builds its ``A`` convolution without
the base dilation; ours keeps it, so the two agree only for ``dilation == 1``
(true of every convolution in SegResEncoder).
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError

LOG = logging.getLogger("bids_adhd.lora")

FACTORISATIONS = ("flat", "kernel2d")

#: The 26 convolutions inside SegResEncoder's residual blocks
#: (``layers.<level>.blocks.<block>.conv1|conv2``); not ``conv_init`` nor the
#: ``layers.<level>.downsample`` convolutions. Matched with ``re.search``
#: against the full dotted module name, so it also matches under a parent
#: (``encoder.layers.0.blocks.0.conv1``).
DEFAULT_TARGET = r"layers\.\d+\.blocks\.\d+\.conv[12]$"

#: Normalisation layers whose affine parameters ``train_norm`` unfreezes.
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
              nn.GroupNorm, nn.LayerNorm)


def lora_parameter_count(c_in: int, c_out: int, kernel_size: Iterable[int], rank: int,
                         factorisation: str = "flat") -> int:
    """Trainable parameters of one LoRA-wrapped Conv3d (the formulas above)."""
    kd, kh, kw = tuple(kernel_size)
    if factorisation == "flat":
        return rank * (c_in * kd * kh * kw + c_out)
    if factorisation == "kernel2d":
        return rank * (c_in * kh * kw + c_out * kd)
    raise ValueError(f"factorisation must be one of {', '.join(FACTORISATIONS)} (got {factorisation!r})")


class LoRAConv3d(nn.Module):
    """A frozen ``nn.Conv3d`` plus a trainable low-rank update of its kernel.

    Parameters
    ----------
    base : nn.Conv3d
        The layer to adapt; kept as ``self.base_layer`` (its parameters are
        frozen here). ``groups`` must be 1 and ``padding_mode`` ``'zeros'``.
    rank : int
        ``r``, the rank of the update.
    alpha : float
        The update is scaled by ``alpha / r`` (PEFT's convention).
    dropout : float
        Dropout probability on the input of the LoRA branch only.
    factorisation : {'flat', 'kernel2d'}
        How ΔW is factorised (see the module docstring).

    Attributes
    ----------
    lora_A, lora_B : nn.Parameter
        The factors as 2-D matrices (shapes in the module docstring).
    scaling : float
        ``alpha / rank``.
    merged : bool
        Whether ``scaling · ΔW`` is currently added into ``base_layer.weight``.
    """

    def __init__(self, base: nn.Conv3d, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 factorisation: str = "flat"):
        super().__init__()
        if not isinstance(base, nn.Conv3d):
            raise TypeError(f"LoRAConv3d wraps an nn.Conv3d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"LoRAConv3d supports groups=1 only (this Conv3d has groups={base.groups}); "
                             "leave grouped/depthwise convolutions out of the LoRA target")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRAConv3d supports padding_mode='zeros' only (got {base.padding_mode!r})")
        if factorisation not in FACTORISATIONS:
            raise ValueError(f"factorisation must be one of {', '.join(FACTORISATIONS)} (got {factorisation!r})")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {dropout})")

        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.factorisation = factorisation
        self.merged = False

        c_out, c_in, kd, kh, kw = base.weight.shape
        if factorisation == "flat":
            a_shape, b_shape = (self.rank, c_in * kd * kh * kw), (c_out, self.rank)
        else:
            a_shape, b_shape = (self.rank, c_in * kh * kw), (c_out * kd, self.rank)
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **like))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **like))
        self.lora_dropout = nn.Dropout(p=float(dropout)) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    # -- the base layer's attributes, so code that inspects a conv still works --
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    @property
    def kernel_size(self) -> tuple:
        return self.base_layer.kernel_size

    @property
    def stride(self) -> tuple:
        return self.base_layer.stride

    @property
    def padding(self):
        return self.base_layer.padding

    @property
    def dilation(self) -> tuple:
        return self.base_layer.dilation

    @property
    def groups(self) -> int:
        return self.base_layer.groups

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (a=√5, as nn.Linear and PEFT); B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def num_lora_parameters(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    # -- the update ----------------------------------------------------------
    def delta_weight(self, scaled: bool = True) -> torch.Tensor:
        """ΔW with the base kernel's shape (times ``scaling`` when ``scaled``)."""
        c_out, c_in, kd, kh, kw = self.base_layer.weight.shape
        ba = self.lora_B @ self.lora_A
        if self.factorisation == "flat":
            delta = ba.reshape(c_out, c_in, kd, kh, kw)
        else:  # rows are (o, d), columns (i, h, w)
            delta = ba.reshape(c_out, kd, c_in, kh, kw).permute(0, 2, 1, 3, 4)
        return delta * self.scaling if scaled else delta

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, ΔW)`` (unscaled) with the base geometry, via two small convolutions."""
        base = self.base_layer
        c_out, c_in, kd, kh, kw = base.weight.shape
        r = self.rank
        if self.factorisation == "flat":
            a = self.lora_A.reshape(r, c_in, kd, kh, kw)
            h = F.conv3d(x, a, None, base.stride, base.padding, base.dilation)
            b = self.lora_B.reshape(c_out, r, 1, 1, 1)
            return F.conv3d(h, b)
        # kernel2d: in-plane first (depth untouched), then depth.
        (sd, sh, sw), (dd, dh, dw) = base.stride, base.dilation
        if isinstance(base.padding, str):      # 'same' / 'valid' split per axis exactly
            pad1 = pad2 = base.padding
        else:
            pd, ph, pw = base.padding
            pad1, pad2 = (0, ph, pw), (pd, 0, 0)
        a = self.lora_A.reshape(r, c_in, 1, kh, kw)
        h = F.conv3d(x, a, None, (1, sh, sw), pad1, (1, dh, dw))
        b = self.lora_B.reshape(c_out, kd, r).permute(0, 2, 1).reshape(c_out, r, kd, 1, 1)
        return F.conv3d(h, b, None, (sd, 1, 1), pad2, (dd, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                warnings.warn("LoRAConv3d is merged: its A and B get no gradient; call unmerge() "
                              "before training", stacklevel=2)
            return result
        # Same order of operations as PEFT: result + B(A(dropout(x))) * scaling
        return result + self._lora_branch(self.lora_dropout(x)) * self.scaling

    # -- merge / unmerge -----------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling · ΔW`` into the base kernel; forward then costs one conv."""
        if self.merged:
            warnings.warn("LoRAConv3d.merge(): already merged; nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``scaling · ΔW`` again (the base kernel back up to rounding)."""
        if not self.merged:
            warnings.warn("LoRAConv3d.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, factorisation={self.factorisation}, "
                f"merged={self.merged}")


def _norm_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def set_norm_trainable(model: nn.Module, trainable: bool = True) -> int:
    """(Un)freeze the affine parameters of every normalisation layer; returns how many."""
    count = 0
    for _, m in _norm_layers(model):
        for p in m.parameters(recurse=False):
            p.requires_grad_(trainable)
            count += p.numel()
    return count


def inject_lora(model: nn.Module, target: str = DEFAULT_TARGET, rank: int = 8, alpha: float = 8.0,
                dropout: float = 0.0, factorisation: str = "flat", train_norm: bool = True) -> list[str]:
    """Wrap the selected Conv3d layers of ``model`` in :class:`LoRAConv3d`, in place.

    Every parameter of ``model`` is frozen, then the LoRA factors are trainable
    and, with ``train_norm``, the affine parameters of the normalisation layers
    (BatchNorm/InstanceNorm/GroupNorm/LayerNorm). A Conv3d is selected when
    ``re.search(target, full_dotted_name)`` matches. Layers that are already
    wrapped are left alone.

    Returns the names of the replaced layers, in module order. Raises
    :class:`~bids_adhd.errors.UsageError` when the pattern matches nothing.
    """
    try:
        pattern = re.compile(target)
    except re.error as exc:
        raise UsageError(f"lora_target {target!r} is not a valid regular expression: {exc}") from None
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv3d)
             and not isinstance(modules.get(n.rpartition(".")[0]), LoRAConv3d)]
    names = [n for n in convs if pattern.search(n)]
    if not names:
        shown = ", ".join(convs[:4]) + (", ..." if len(convs) > 4 else "")
        raise UsageError(f"lora_target {target!r} matches no Conv3d layer (Conv3d layers: {shown or 'none'})")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRAConv3d(getattr(parent, child), rank=rank, alpha=alpha,
                                          dropout=dropout, factorisation=factorisation))
    if train_norm:
        set_norm_trainable(model, True)
    LOG.debug("LoRA (%s, r=%d, alpha=%g) on %d Conv3d layers", factorisation, rank, alpha, len(names))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRAConv3d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAConv3d)}


@torch.no_grad()
def lora_update_rel_norm(model: nn.Module) -> float:
    """Norm of the LoRA update relative to the adapted base weights, over all LoRA layers together:
    ``sqrt(sum ||ΔW||²) / sqrt(sum ||W||²)`` (Frobenius; merged layers count their unmerged base).
    0.0 when the model has no LoRA layer or every update is zero (e.g. B still at its zero init)."""
    num = den = 0.0
    for m in lora_layers(model).values():
        delta = m.delta_weight().float()
        base = m.base_layer.weight.float() - (delta if m.merged else 0)
        num += float((delta ** 2).sum())
        den += float((base ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRAConv3d of ``model``; returns how many."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    layers = [m for m in lora_layers(model).values() if m.merged]
    for m in layers:
        m.unmerge()
    return len(layers)


_LORA_SUFFIX = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.[^.]+)?$")


def _owner(param_name: str) -> str:
    """The layer a parameter belongs to; LoRA factors (ours or PEFT's) count for the wrapped conv."""
    owner = param_name.rpartition(".")[0]
    if param_name.rpartition(".")[2].startswith("lora_"):      # ours: conv1.lora_A
        return owner
    return _LORA_SUFFIX.sub("", owner)                          # PEFT: conv1.lora_A.default


def parameter_report(model: nn.Module) -> dict:
    """Parameter counts of ``model``.

    Returns a dict with ``trainable``, ``frozen``, ``total`` (each a count of
    scalars), ``lora`` (trainable LoRA factors, ours or PEFT's), ``norm``
    (trainable normalisation affine parameters) and ``per_layer``: for every
    layer with trainable parameters, how many (a LoRA-wrapped convolution
    counts its A and B under the convolution's own name).
    """
    norm_params = {id(p) for _, m in _norm_layers(model) for p in m.parameters(recurse=False)}
    trainable = frozen = lora = norm = 0
    per_layer: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        if not p.requires_grad:
            frozen += n
            continue
        trainable += n
        if ".lora_" in f".{name}":
            lora += n
        elif id(p) in norm_params:
            norm += n
        owner = _owner(name)
        per_layer[owner] = per_layer.get(owner, 0) + n
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen,
            "lora": lora, "norm": norm, "per_layer": per_layer}
