"""The ADHD classifier: foundation encoder + pooling + MLP head, and its adaptations.

``build_model(cfg)`` is the one place that turns a :class:`ModelConfig` into a
model whose ``requires_grad`` flags say what trains:

=============  ==========================================================
adaptation     what trains
=============  ==========================================================
lora           our LoRA (:mod:`bids_adhd.learn.lora`) on ``cfg.lora_target``,
               norm affine parameters if ``train_norm``, the head
peft-lora      the same with PEFT's ``LoraConfig`` (flat factorisation only)
linear-probe   the head only; BatchNorm frozen *and* kept in eval mode
full           everything
scratch        everything, from a random initialisation (no weights loaded)
=============  ==========================================================

The stem takes ``len(cfg.channels)`` input channels: a 1-channel pre-trained
stem is widened by :func:`adapt_stem` after the weights are loaded.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Sequence

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import UsageError
from .data import model_frame
from .foundation import (count_parameters, encoder_family, encoder_fingerprint, load_encoder, load_manifest,
                         lora_target)
from .lora import NORM_TYPES, inject_lora, parameter_report, set_norm_trainable

LOG = logging.getLogger("bids_adhd.classifier")

STEM_MODES = ("average", "duplicate")
POOLINGS = ("avg", "multiscale", "avgmax", "spatial")
#: ``pooling: spatial`` average-pools every feature map to this many cells per axis
SPATIAL_GRID = 2


def adapt_stem(encoder: nn.Module, in_channels: int, mode: str = "average", attr: str | None = None) -> nn.Module:
    """Give a 1-channel stem convolution ``in_channels`` inputs, in place (after loading weights).

    ``average``: each input channel gets the pre-trained kernel divided by
    ``in_channels``, so an input whose channels are all equal to ``x`` gives
    exactly what the 1-channel stem gives for ``x`` (up to rounding).
    ``duplicate``: each channel gets the full kernel (the response to equal
    channels is ``in_channels`` times larger).
    The new weight keeps the old one's dtype, device and ``requires_grad``.
    ``attr``: the stem's attribute (default: the encoder family's, e.g.
    ``conv_init`` for CT-FM, ``conv1`` for FMCIB). Returns the encoder.
    """
    attr = attr or encoder_family(encoder).stem
    if mode not in STEM_MODES:
        raise UsageError(f"stem_init must be one of {', '.join(STEM_MODES)} (got {mode!r})")
    old = getattr(encoder, attr)
    if not isinstance(old, nn.Conv3d):
        raise TypeError(f"{attr} is a {type(old).__name__}, not an nn.Conv3d")
    if old.in_channels == in_channels:
        return encoder
    if old.in_channels != 1 or old.groups != 1:
        raise UsageError(f"can only widen a 1-channel stem (this one has {old.in_channels} input channels)")
    new = nn.Conv3d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        w = old.weight.repeat(1, in_channels, 1, 1, 1)
        new.weight.copy_(w / in_channels if mode == "average" else w)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    setattr(encoder, attr, new)
    if hasattr(encoder, "in_channels"):
        encoder.in_channels = in_channels
    if hasattr(encoder, "n_input_channels"):
        encoder.n_input_channels = in_channels
    return encoder


def encoder_feature_channels(encoder: nn.Module) -> list[int]:
    """Channels of each feature map the encoder's family adapter returns (CT-FM: 32 ... 512; FMCIB: 512 ... 4096)."""
    return encoder_family(encoder).feature_channels(encoder)


class ADHDClassifier(nn.Module):
    """Encoder feature maps -> global pooling -> MLP head -> class logits.

    Parameters
    ----------
    encoder : nn.Module
        A foundation encoder its family adapter reads (MONAI ``SegResEncoder``,
        ``ResNet``). TRUNCATED IN PLACE to the levels the pooling reads.
    pooling : {'avg', 'multiscale', 'avgmax', 'spatial'}
        ``avg``: global average of the last map (512 features for CT-FM, as
        CT-FM's own feature extraction). ``multiscale``: the global averages
        of every level, concatenated (32+64+128+256+512 = 992 for CT-FM).
        ``avgmax``: the global average and the global maximum of every level
        (2 x 992). ``spatial``: every level average-pooled to a 2x2x2 grid of
        octants, which keeps coarse location (8 x 992). See docs/group.md.
    head_hidden : int
        Hidden width of the head (Linear -> ReLU -> Dropout -> Linear); 0 for
        a single Linear layer.
    num_classes : int
    dropout : float
        Dropout between the two head layers.
    head_norm : bool
        Put a ``BatchNorm1d`` without affine parameters in front of the head
        (standardises the pooled features with statistics of the training
        data; as in MAE's linear probing). Adds no parameters.
    feature_channels : list of int, optional
        Channels per level; read from the encoder when not given.
    levels : list of int, optional
        The encoder levels the pooling reads (default: the last for ``avg``,
        all for the others). The encoder is truncated after the deepest one
        read (:meth:`EncoderFamily.truncate`): the levels past it are removed,
        not merely skipped, so nothing in them is run, trained, counted or
        saved; ``truncated`` names what was removed (relative to ``encoder``).
    family : EncoderFamily, optional
        The adapter that reads the encoder (:func:`~bids_adhd.learn.foundation.encoder_family`;
        guessed from the encoder when not given).
    frame : ModelFrame, optional
        Applied to the input first: the template-grid array in the model's
        own orientation and value range (:func:`~bids_adhd.learn.data.model_frame`).
        Everything outside the network (augmentation, saliency, prediction)
        stays on the template grid.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "avg", head_hidden: int = 128, num_classes: int = 2,
                 dropout: float = 0.0, feature_channels: Sequence[int] | None = None, head_norm: bool = False,
                 levels: Sequence[int] | None = None, family=None, frame=None):
        super().__init__()
        if pooling not in POOLINGS:
            raise UsageError(f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})")
        self.encoder = encoder
        self.pooling = pooling
        self.family = family or encoder_family(encoder)
        self.frame = frame
        channels = list(feature_channels or self.family.feature_channels(encoder))
        if levels:
            bad = [v for v in levels if not 0 <= int(v) < len(channels)]
            if bad:
                raise UsageError(f"feature_levels {list(levels)}: the encoder has levels 0 to {len(channels) - 1}")
            self.levels = tuple(sorted(int(v) for v in levels))
        else:
            self.levels = (len(channels) - 1,) if pooling == "avg" else tuple(range(len(channels)))
        #: the number of levels kept; the encoder is truncated after level depth - 1
        self.depth = max(self.levels) + 1
        #: the encoder's modules removed by the truncation (names relative to the encoder)
        self.truncated = tuple(self.family.truncate(encoder, self.depth))
        chosen = [channels[i] for i in self.levels]
        self.num_features = {"avg": sum(chosen), "multiscale": sum(chosen), "avgmax": 2 * sum(chosen),
                             "spatial": SPATIAL_GRID ** 3 * sum(chosen)}[pooling]
        norm = [nn.BatchNorm1d(self.num_features, affine=False)] if head_norm else []
        if head_hidden:
            self.head = nn.Sequential(*norm, nn.Linear(self.num_features, head_hidden), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Linear(head_hidden, num_classes))
        else:
            self.head = nn.Sequential(*norm, nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))
        #: keep the encoder's BatchNorm in eval mode during training (running statistics frozen)
        self.freeze_norm_stats = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector, shape ``(N, num_features)``."""
        if self.frame is not None:
            x = self.frame.apply(x)
        maps = self._encode(x)
        maps = [maps[i] for i in self.levels]
        if self.pooling == "avgmax":
            return torch.cat([torch.cat([m.float().mean(dim=(2, 3, 4)), m.float().amax(dim=(2, 3, 4))], dim=1)
                              for m in maps], dim=1)
        if self.pooling == "spatial":
            return torch.cat([nn.functional.adaptive_avg_pool3d(m.float(), SPATIAL_GRID).flatten(1) for m in maps],
                             dim=1)
        # avg and multiscale: the global averages of the levels read (avg's default: the last one)
        return torch.cat([m.float().mean(dim=(2, 3, 4)) for m in maps], dim=1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The truncated encoder's ``depth`` feature maps (for CT-FM, MONAI's own ``SegResEncoder.forward``)."""
        return self.family.encode(self.encoder, x)

    def was_truncated(self, key: str) -> bool:
        """Whether a state-dict key (``encoder.layers.4.…``) belongs to a module the truncation removed."""
        return any(key.startswith(f"encoder.{name}.") for name in self.truncated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def _peft_targets(encoder: nn.Module, target: str) -> list[str]:
    pattern = re.compile(target)
    return [n for n, m in encoder.named_modules() if isinstance(m, nn.Conv3d) and pattern.search(n)]


def _inject_peft(encoder: nn.Module, cfg: ModelConfig, target: str) -> list[str]:
    if cfg.lora_factorisation != "flat":
        raise UsageError("adaptation peft-lora supports lora_factorisation flat only (PEFT's Conv3d LoRA)")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("adaptation peft-lora needs PEFT: pip install 'bids_adhd[peft]'") from None
    names = _peft_targets(encoder, target)
    if not names:
        raise UsageError(f"lora_target {target!r} matches no Conv3d layer")
    dilated = [n for n in names if encoder.get_submodule(n).dilation != (1, 1, 1)]
    if dilated:
        raise UsageError(f"PEFT's Conv3d LoRA ignores dilation; {len(dilated)} target(s) are dilated "
                         f"(e.g. {dilated[0]}): use adaptation lora")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, encoder)
    for n, p in encoder.named_parameters():     # PEFT freezes the base; make sure of it
        p.requires_grad_(".lora_" in f".{n}")
    return names


def _adapt(encoder: nn.Module, cfg: ModelConfig, target: str) -> list[str]:
    """Set what trains in ``encoder`` for ``cfg.adaptation``; returns the LoRA-wrapped layer names."""
    if cfg.adaptation == "lora":
        return inject_lora(encoder, target, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           factorisation=cfg.lora_factorisation, train_norm=cfg.train_norm)
    if cfg.adaptation == "peft-lora":
        names = _inject_peft(encoder, cfg, target)
        set_norm_trainable(encoder, cfg.train_norm)
        return names
    if cfg.adaptation == "linear-probe":
        encoder.requires_grad_(False)
        if cfg.train_norm:
            LOG.info("linear-probe: train_norm ignored, the encoder (BatchNorm included) stays frozen")
    else:  # full, scratch
        encoder.requires_grad_(True)
    return []


def build_model(cfg: ModelConfig, weights=None, *, architecture_only: bool = False,
                manifest=None, fingerprint: bool = False) -> tuple[ADHDClassifier, dict]:
    """The classifier ``cfg`` describes, with ``requires_grad`` set for its adaptation.

    ``weights``: an explicit weights file (else the search of
    :func:`~bids_adhd.learn.foundation.find_weights`).
    ``architecture_only``: build on the ``meta`` device without weights (for
    counting parameters; such a model cannot run). ``manifest`` overrides the
    packaged ``models/<cfg.foundation>.json`` (tests). The manifest gives the
    encoder family adapter, the default LoRA target and the input frame.

    Returns ``(model, info)``; info holds the encoder info of
    :func:`~bids_adhd.learn.foundation.load_encoder` (``pretrained``,
    ``weights_path``, ``sha256``, ``warning``, ...), plus ``family``,
    ``orientation``, ``adaptation``, ``in_channels``, ``lora_target``,
    ``lora_layers`` (replaced layer names, in the levels that run),
    ``encoder_parameters`` (the whole base encoder as published, adapted stem
    included, LoRA excluded), ``encoder_parameters_run`` (the same for the
    levels the read-out keeps: the classifier truncates the encoder after the
    deepest level read), ``truncated`` (the encoder modules removed),
    ``head_parameters``, ``full_finetune_trainable`` (whole encoder + head) and
    ``parameters`` (:func:`parameter_report` of the model as built, i.e. truncated).
    ``fingerprint``: also ``encoder_fingerprint``
    (:func:`~bids_adhd.learn.foundation.encoder_fingerprint` of the whole
    encoder, taken before the truncation; what an adapter records).
    """
    manifest = dict(manifest) if manifest is not None else load_manifest(cfg.foundation)
    family, frame = encoder_family(manifest), model_frame(manifest.get("input"))
    target = lora_target(manifest, cfg.lora_target) if cfg.adaptation in ("lora", "peft-lora") else None
    enc_cfg = cfg
    if cfg.adaptation == "scratch" and cfg.pretrained:
        LOG.info("adaptation scratch: the encoder is randomly initialised (pretrained ignored)")
        enc_cfg = dataclasses.replace(cfg, pretrained=False)
    encoder, info = load_encoder(enc_cfg, weights, manifest=manifest, architecture_only=architecture_only)
    in_channels = len(cfg.channels)
    with torch.device("meta") if architecture_only else torch.device("cpu"):
        adapt_stem(encoder, in_channels, cfg.stem_init, family.stem)
        encoder_parameters = count_parameters(encoder)
        # LoRA goes on the whole encoder first: the seeded random draws (LoRA, then head) stay those of
        # the untruncated model, so a seed gives the same initial adapter as before the truncation existed
        names = _adapt(encoder, cfg, target)
        if fingerprint:
            info["encoder_fingerprint"] = encoder_fingerprint(encoder)
        model = ADHDClassifier(encoder, pooling=cfg.pooling, head_hidden=cfg.head_hidden,
                               num_classes=cfg.num_classes, dropout=cfg.head_dropout,
                               head_norm=cfg.head_norm, levels=cfg.feature_levels,
                               family=family, frame=frame)
        names = [n for n in names if not model.was_truncated(f"encoder.{n}.")]
        encoder_run = sum(p.numel() for n, p in encoder.named_parameters() if ".lora_" not in f".{n}")
    model.freeze_norm_stats = cfg.adaptation == "linear-probe"
    head_parameters = count_parameters(model.head)
    info.update(family=family.name, orientation="".join(frame.target), adaptation=cfg.adaptation,
                in_channels=in_channels, lora_target=target, lora_layers=names,
                encoder_parameters=encoder_parameters, encoder_parameters_run=encoder_run,
                truncated=list(model.truncated), head_parameters=head_parameters,
                full_finetune_trainable=encoder_parameters + head_parameters,
                parameters=parameter_report(model))
    return model, info


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: every trainable parameter plus the normalisation buffers.

    BatchNorm running statistics move during training even when the affine
    parameters are frozen (except with ``freeze_norm_stats``), so they belong
    to the adapter. Tensors are detached CPU copies, ready for
    ``safetensors.torch.save_file``.
    """
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    for mname, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            for bname, b in m.named_buffers(recurse=False):
                if b is not None:
                    out[f"{mname}.{bname}" if mname else bname] = b.detach().cpu().clone()
    return out
