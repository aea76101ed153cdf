"""Foundation models: manifests in ``models/``, weight files, the encoder.

A manifest (``models/<name>.json``) says where the weights come from (hub
repository, revision, file name, sha256), which MONAI class and keyword
arguments build the encoder, and what input it was trained on.

Weights are read from a local safetensors file only (never unpickled; no
network at run time). :func:`find_weights` defines the search order:

1. an explicit path (``--weights PATH``): must exist;
2. the cache: ``$BIDS_ADHD_WEIGHTS_DIR/<name>/<file>`` if that variable is
   set, else ``~/.cache/bids_adhd/models/<name>/<file>``
   (``bids_adhd fetch-model <name>`` downloads there);
3. the image's baked-in copy: ``/opt/bids_adhd/models/<name>/<file>``.

``bids_adhd fetch-model`` is this module's command (``add_cli_arguments`` /
``run_cli``).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..config import ModelConfig, models_dir
from ..errors import DataError, MissingInputError, OutputError, UsageError

LOG = logging.getLogger("bids_adhd.foundation")

ENV_WEIGHTS_DIR = "BIDS_ADHD_WEIGHTS_DIR"
#: Set (to anything but "" or "0") where a randomly initialised encoder must never stand in for the
#: pre-trained one: the container images set it, so a missing weights file is exit 66, not a warning.
ENV_REQUIRE_WEIGHTS = "BIDS_ADHD_REQUIRE_WEIGHTS"
DEFAULT_CACHE_ROOT = Path("~/.cache/bids_adhd/models")
IMAGE_MODELS_DIR = Path("/opt/bids_adhd/models")
#: Key prefixes stripped from a checkpoint when the manifest names none.
DEFAULT_KEY_PREFIXES = ("", "encoder.", "model.", "module.", "backbone.", "net.",
                        "model.encoder.", "module.encoder.")
#: Buffers a checkpoint may leave out (BatchNorm's step counter; unused with momentum set).
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)
#: Only classes from these packages may be named in a manifest.
ALLOWED_CLASS_PREFIXES = ("monai.networks.",)
_MAX_HEADER = 100 * 1024 * 1024


# --------------------------------------------------------------------------- manifests
def manifest_names() -> list[str]:
    return sorted(p.stem for p in models_dir().glob("*.json"))


def load_manifest(name: str) -> dict:
    """The manifest ``models/<name>.json`` as a dict (``UsageError`` for an unknown name)."""
    path = models_dir() / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"unknown foundation model {name!r}; known: {', '.join(manifest_names()) or 'none'}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"model manifest {path} is not valid JSON: {exc}") from None
    for key in ("name", "source", "architecture"):
        if key not in manifest:
            raise DataError(f"model manifest {path} lacks the key {key!r}")
    manifest["_path"] = str(path)
    return manifest


def _filename(manifest: Mapping) -> str:
    return manifest["source"].get("filename", "model.safetensors")


# --------------------------------------------------------------------------- where the file is
def cache_dir(name: str) -> Path:
    """``$BIDS_ADHD_WEIGHTS_DIR/<name>`` or ``~/.cache/bids_adhd/models/<name>``."""
    root = os.environ.get(ENV_WEIGHTS_DIR)
    return (Path(root).expanduser() if root else DEFAULT_CACHE_ROOT.expanduser()) / name


def weight_search_paths(name: str, filename: str | None = None) -> list[Path]:
    """The places :func:`find_weights` looks, in order (without an explicit path)."""
    filename = filename or _filename(load_manifest(name))
    return [cache_dir(name) / filename, IMAGE_MODELS_DIR / name / filename]


def find_weights(name: str, explicit: str | os.PathLike | None = None) -> Path | None:
    """The weights file of foundation model ``name``, or None when there is none.

    Search order: ``explicit`` (``MissingInputError`` if it does not exist),
    then the cache (``$BIDS_ADHD_WEIGHTS_DIR/<name>/`` or
    ``~/.cache/bids_adhd/models/<name>/``), then the image
    (``/opt/bids_adhd/models/<name>/``). The file name comes from the manifest.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingInputError(f"weights file {path} not found (--weights)")
        return path
    for path in weight_search_paths(name):
        if path.is_file():
            return path
    return None


# --------------------------------------------------------------------------- building
def _import_class(dotted: str):
    if not dotted.startswith(ALLOWED_CLASS_PREFIXES):
        raise DataError(f"model manifest names class {dotted!r}; only {', '.join(ALLOWED_CLASS_PREFIXES)}* "
                        "classes are allowed")
    module_name, _, cls_name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"cannot import {dotted} named in the model manifest: {exc}") from None


def build_encoder(manifest: Mapping | str) -> nn.Module:
    """The encoder the manifest describes, randomly initialised (MONAI's default init)."""
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    arch = manifest["architecture"]
    cls = _import_class(arch["class"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.get("kwargs", {}).items()}
    return cls(**kwargs)


class EncoderFamily:
    """How the classifier reads one family of encoders (the only model-specific code).

    ``stem``: the attribute of the first convolution (widened for more than one
    input channel). ``levels(encoder)``: the modules that produce the feature
    maps, in order. ``feature_channels(encoder)``: the channels of each map.
    ``truncate(encoder, depth)``: drop, in place, everything after the output
    of level ``depth - 1`` (it would run for nothing); returns the dropped
    module names. ``encode(encoder, x)``: every feature map the (truncated)
    encoder produces.
    """

    name = ""
    stem = ""

    def levels(self, encoder: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def feature_channels(self, encoder: nn.Module) -> list[int]:
        raise NotImplementedError

    def truncate(self, encoder: nn.Module, depth: int) -> list[str]:
        raise NotImplementedError

    def encode(self, encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class SegResEncoderFamily(EncoderFamily):
    """MONAI ``SegResEncoder`` (CT-FM): ``conv_init``, then ``layers[i]`` = blocks + downsample.

    ``SegResEncoder.forward`` runs ``conv_init`` and then, per entry of
    ``layers``, ``blocks`` (its output is that level's feature map) and
    ``downsample``. Truncated to ``depth`` levels, MONAI's own forward returns
    the first ``depth`` maps, computed by the same operations in the same order
    as the full encoder's (so bit-identical). The last kept level's
    ``downsample`` becomes ``nn.Identity`` (as MONAI builds the last level of
    any encoder): its output was never read.
    """

    name, stem = "segresnet_encoder", "conv_init"

    def levels(self, encoder):
        return list(encoder.layers)

    def feature_channels(self, encoder):
        return [int(encoder.init_filters) * 2 ** i for i in range(len(encoder.layers))]

    def truncate(self, encoder, depth):
        n = len(encoder.layers)
        if depth >= n or getattr(encoder, "head_module", None) is not None:
            return []                       # a head module reads every level: leave the encoder whole
        removed = [f"layers.{i}" for i in range(depth, n)]
        last = encoder.layers[depth - 1]
        if not isinstance(last["downsample"], nn.Identity):
            last["downsample"] = nn.Identity()
            removed.append(f"layers.{depth - 1}.downsample")
        encoder.layers = encoder.layers[:depth]
        encoder.blocks_down = tuple(encoder.blocks_down[:depth])
        return removed

    def encode(self, encoder, x):
        maps = encoder(x)
        return [maps] if isinstance(maps, torch.Tensor) else list(maps)


class ResNetFamily(EncoderFamily):
    """MONAI ``ResNet`` (FMCIB's trunk): stem ``conv1``/``bn1``/``act``/``maxpool``, then ``layer1``..``layer4``.

    The feature maps are the four stage outputs; the global average of the
    last one is what ``ResNet.forward`` returns with ``feed_forward=False``
    (``ResNet.forward`` returns only that, so the stages are run here).
    Truncation deletes the stages after the last one read (``ResNet.forward``
    then no longer works; the classifier does not call it).
    """

    name, stem = "resnet", "conv1"
    STAGES = ("layer1", "layer2", "layer3", "layer4")

    def levels(self, encoder):
        return [getattr(encoder, s) for s in self.STAGES if hasattr(encoder, s)]

    def feature_channels(self, encoder):
        out = []
        for stage in self.levels(encoder):
            convs = [m for m in stage[-1].modules() if isinstance(m, nn.Conv3d)]
            out.append(int(convs[-1].out_channels))
        return out

    def truncate(self, encoder, depth):
        removed = [s for s in self.STAGES[depth:] if hasattr(encoder, s)]
        for s in removed:
            delattr(encoder, s)
        return removed

    def encode(self, encoder, x):
        x = encoder.act(encoder.bn1(encoder.conv1(x)))
        if not encoder.no_max_pool:
            x = encoder.maxpool(x)
        outputs = []
        for stage in self.levels(encoder):
            x = stage(x)
            outputs.append(x)
        return outputs


FAMILIES: dict[str, EncoderFamily] = {f.name: f for f in (SegResEncoderFamily(), ResNetFamily())}


def encoder_family(manifest_or_encoder) -> EncoderFamily:
    """The family adapter named by a manifest (``architecture.family``), or guessed from an encoder."""
    if isinstance(manifest_or_encoder, Mapping):
        key = manifest_or_encoder["architecture"].get("family", "segresnet_encoder")
        if key not in FAMILIES:
            raise DataError(f"model manifest names family {key!r}; known: {', '.join(FAMILIES)}")
        return FAMILIES[key]
    enc = manifest_or_encoder
    if hasattr(enc, "conv_init") and hasattr(enc, "layers"):
        return FAMILIES["segresnet_encoder"]
    if all(hasattr(enc, a) for a in ("conv1", "layer1")):
        return FAMILIES["resnet"]
    raise TypeError(f"no encoder family adapter for {type(enc).__name__}")


def lora_target(manifest: Mapping, configured: str = "") -> str:
    """The LoRA target pattern: the pipeline's if set, else the manifest's ``lora.target``."""
    target = configured or manifest.get("lora", {}).get("target", "")
    if not target:
        raise DataError(f"model manifest {manifest.get('name')!r} has no lora.target and the pipeline sets no "
                        "lora_target")
    return target


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_fingerprint(model: nn.Module) -> str:
    """sha256 over the base encoder's parameters (names, shapes, dtypes, bytes), LoRA factors excluded.

    ``model``: an encoder, or a module with an ``encoder`` attribute. Computed
    on the whole encoder as built (``build_model(..., fingerprint=True)`` does
    so before the classifier truncates it), before any training, it identifies
    the base an adapter was trained on: the pre-trained weights, or the seeded
    random initialisation.
    """
    encoder = getattr(model, "encoder", model)
    h = hashlib.sha256()
    for name, p in sorted(encoder.named_parameters(), key=lambda kv: kv[0]):
        if ".lora_" in f".{name}":
            continue
        name = name.replace(".base_layer.", ".")          # LoRAConv3d keeps the base conv as base_layer
        t = p.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- reading files
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, read without loading tensors.

    A safetensors file is an 8-byte little-endian header length, a JSON object,
    then raw tensor bytes. Anything else — a PyTorch ``.pt``/``.bin`` (a zip
    or a pickle), a truncated download, an HTML error page — is refused here
    with ``DataError``, whatever the file's extension; nothing is unpickled.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        raw = fh.read(n) if 2 <= n <= _MAX_HEADER and 8 + n <= size else b""
    header = None
    if raw[:1] == b"{":
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if isinstance(header, dict):
        return header
    # Not safetensors: say what it looks like, but never open it with pickle.
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        kind = "zip (torch.save)" if head[:2] == b"PK" else "pickle"
        raise DataError(f"weights file {path} is a PyTorch {kind} checkpoint, not safetensors; bids_adhd never "
                        "unpickles weights: convert it on a trusted machine with "
                        "safetensors.torch.save_file(state_dict, 'model.safetensors')")
    raise DataError(f"weights file {path} is not a safetensors file ({size} bytes; bad header: "
                    "truncated download or another format)")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU (header checked first)."""
    check_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())
        raise DataError(f"weights file {path} is corrupt: {msg}") from None


def _strip_prefix(keys: list[str], expected: set[str], prefixes) -> tuple[str, dict[str, str]]:
    """Pick the known prefix under which most keys are expected ones; map file key -> model key."""
    best, best_hits = "", -1
    for prefix in prefixes:
        hits = sum(1 for k in keys if k.startswith(prefix) and k[len(prefix):] in expected)
        if hits > best_hits:
            best, best_hits = prefix, hits
    mapping = {k: k[len(best):] if k.startswith(best) else k for k in keys}
    return best, mapping


def _few(items, n: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def match_state_dict(tensors: Mapping[str, torch.Tensor], encoder: nn.Module, *, where: str,
                     key_prefixes=DEFAULT_KEY_PREFIXES, name: str = "the encoder") -> tuple[dict, str]:
    """``tensors`` renamed to ``encoder``'s keys, strict: ``(state_dict, stripped prefix)``.

    One of ``key_prefixes`` is stripped (the one under which most keys are
    expected ones); then every key of ``encoder.state_dict()`` must be there
    (``num_batches_tracked`` may be absent), no other key may be, every shape
    must match and every value be finite. Otherwise a one-line ``DataError``
    naming ``where`` (the file) and the offending keys.
    """
    expected = encoder.state_dict()
    prefix, mapping = _strip_prefix(list(tensors), set(expected), key_prefixes)
    renamed = {mapping[k]: v for k, v in tensors.items()}
    missing = [k for k in expected if k not in renamed and not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    unexpected = [k for k in tensors if mapping[k] not in expected]
    wrong = [f"{k} {tuple(renamed[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in renamed and tuple(renamed[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s) (file vs model): {_few(wrong)}")
    if problems:
        raise DataError(f"weights file {where} does not match {name}: " + "; ".join(problems))
    bad = [k for k, v in renamed.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"weights file {where} holds non-finite values in {_few(bad)}")
    return renamed, prefix


def load_weights(encoder: nn.Module, path: str | os.PathLike, *, sha256: str | None = None,
                 key_prefixes=DEFAULT_KEY_PREFIXES, name: str = "the encoder") -> dict:
    """Load a safetensors file into ``encoder`` after checking it completely.

    Checks, in order: the sha256 (when ``sha256`` is given), the safetensors
    header, then keys (after stripping one of ``key_prefixes``), shapes and
    finiteness against ``encoder.state_dict()`` (:func:`match_state_dict`).
    Any failure is a one-line ``DataError``; the encoder is untouched unless
    every check passes.

    Returns ``{"weights_path", "sha256", "sha256_verified", "key_prefix"}``.
    """
    path = Path(path)
    actual = sha256_file(path)
    if sha256 and actual.lower() != sha256.lower():
        raise DataError(f"weights file {path} has sha256 {actual[:16]}..., expected {sha256[:16]}... for {name}: "
                        "the file is corrupt or another revision; delete it and fetch it again")
    tensors = read_safetensors(path)
    renamed, prefix = match_state_dict(tensors, encoder, where=str(path), key_prefixes=key_prefixes, name=name)
    encoder.load_state_dict(renamed, strict=False)
    return {"weights_path": str(path), "sha256": actual, "sha256_verified": bool(sha256),
            "key_prefix": prefix}


def _missing_message(name: str, manifest: Mapping) -> str:
    places = " or ".join(str(p) for p in weight_search_paths(name, _filename(manifest)))
    source = manifest["source"]
    url = source.get("url", source.get("repo_id"))
    if source.get("checkpoint_format"):            # a PyTorch checkpoint: converted once, on a trusted machine
        how = f"or download {url} and run 'bids_adhd fetch-model {name} --from FILE'"
    else:
        how = f"or download {url} to {cache_dir(name) / _filename(manifest)}"
    return (f"no weights for foundation model {name!r}: looked in {places}. Run 'bids_adhd fetch-model {name}', "
            f"{how}, or pass --weights PATH")


def load_encoder(cfg: ModelConfig, weights: str | os.PathLike | None = None, *,
                 manifest: Mapping | None = None, architecture_only: bool = False) -> tuple[nn.Module, dict]:
    """The foundation encoder of ``cfg.foundation``, with its pre-trained weights when there are any.

    - ``cfg.pretrained`` False: randomly initialised on purpose (``weights`` is ignored).
    - ``weights`` given: that file (``MissingInputError`` if it does not exist).
    - otherwise :func:`find_weights`; when nothing is found the encoder is
      RANDOMLY INITIALISED, a prominent WARNING is logged and
      ``info["pretrained"]`` is False with ``info["warning"]`` set: the group
      level must report this. Where ``$BIDS_ADHD_REQUIRE_WEIGHTS`` is set
      (the container images) it is ``MissingInputError`` (exit 66) instead.
    - ``architecture_only``: build on the ``meta`` device (no memory, no
      weights); for counting parameters.

    ``manifest`` overrides the packaged manifest (tests). Returns
    ``(encoder, info)`` with info keys ``foundation``, ``pretrained``,
    ``weights_path``, ``sha256``, ``sha256_verified``, ``sha256_source``
    (``manifest``, ``provenance`` or None: what it was checked against),
    ``key_prefix`` (when loaded), ``warning`` (None, or why the encoder is not the pre-trained
    one) and ``init`` (``pretrained``, ``random (pretrained: false)``,
    ``random (weights missing)`` or ``none (meta device)``).
    """
    manifest = dict(manifest) if manifest is not None else load_manifest(cfg.foundation)
    name = manifest.get("name", cfg.foundation)
    info: dict[str, Any] = {"foundation": name, "pretrained": False, "weights_path": None, "sha256": None,
                            "sha256_verified": False, "warning": None, "init": "random (pretrained: false)"}
    if architecture_only:
        with torch.device("meta"):
            encoder = build_encoder(manifest)
        info.update(warning="architecture only (meta device): no weights", init="none (meta device)")
        return encoder, info
    encoder = build_encoder(manifest)
    if not cfg.pretrained:
        if weights is not None:
            LOG.warning("pretrained is false in this pipeline: ignoring --weights %s", weights)
        LOG.info("%s encoder randomly initialised on purpose (pretrained: false)", name)
        return encoder, info
    path = find_weights(name, weights)
    if path is None:
        msg = _missing_message(name, manifest)
        if os.environ.get(ENV_REQUIRE_WEIGHTS, "") not in ("", "0"):
            raise MissingInputError(f"{msg} ({ENV_REQUIRE_WEIGHTS} is set: a randomly initialised encoder is refused)")
        banner = "!" * 78
        LOG.warning("%s\nWARNING: THE %s ENCODER IS RANDOMLY INITIALISED - results are NOT those of the "
                    "pre-trained model.\n%s\n%s", banner, name.upper(), msg, banner)
        info.update(warning=f"encoder randomly initialised: {msg}", init="random (weights missing)")
        return encoder, info
    prefixes = manifest.get("state_dict", {}).get("key_prefixes", DEFAULT_KEY_PREFIXES)
    expected, origin = expected_sha256(manifest, path)
    loaded = load_weights(encoder, path, sha256=expected, key_prefixes=prefixes, name=name)
    loaded["sha256_source"] = origin
    if not loaded["sha256_verified"]:
        LOG.info("%s: no sha256 in the manifest to verify %s against; its sha256 is %s",
                 name, path, loaded["sha256"])
    info.update(loaded, pretrained=True, init="pretrained")
    LOG.info("%s weights loaded from %s", name, path)
    return encoder, info


# --------------------------------------------------------------------------- provenance
def provenance_path(weights: str | os.PathLike) -> Path:
    """``<dir>/<stem>.provenance.json`` beside a weights file: what fetch-model recorded about it."""
    weights = Path(weights)
    return weights.with_name(weights.name.split(".")[0] + ".provenance.json")


def read_provenance(weights: str | os.PathLike) -> dict | None:
    path = provenance_path(weights)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path} is not valid JSON; delete it and run 'bids_adhd fetch-model' again") from None
    return record if isinstance(record, dict) else None


def expected_sha256(manifest: Mapping, weights: str | os.PathLike) -> tuple[str | None, str | None]:
    """The sha256 ``weights`` must have and where that comes from: the manifest, else the provenance record."""
    if manifest.get("sha256"):
        return manifest["sha256"], "manifest"
    record = read_provenance(weights)
    if record and record.get("sha256"):
        return str(record["sha256"]), "provenance"
    return None, None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- conversion (trusted machine)
def read_torch_checkpoint(path: str | os.PathLike, manifest: Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a PyTorch checkpoint, read with ``torch.load(weights_only=True)`` only.

    A file that needs full unpickling (any object other than tensors and
    plain containers) is refused with ``DataError``: nothing else is ever
    unpickled. The state dict is taken from the first of the manifest's
    ``state_dict.containers`` (FMCIB: ``trunk_state_dict``, ``state_dict``)
    found, else the file's top level. Returns ``(tensors, container)``.
    """
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = " ".join(str(exc).split())[:120]
        raise DataError(f"{path} needs full unpickling ({first}...): refused; only plain tensor checkpoints "
                        "are converted") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    container = ""
    if isinstance(obj, Mapping):
        for key in manifest.get("state_dict", {}).get("containers", []):
            if isinstance(obj.get(key), Mapping):
                obj, container = obj[key], key
                break
    if not isinstance(obj, Mapping) or not obj:
        raise DataError(f"{path} holds no state dict (looked for {manifest.get('state_dict', {}).get('containers')})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{path}: {container or 'the state dict'} holds non-tensor entries: {_few(bad)}")
    return {str(k): v for k, v in obj.items()}, container


def convert_checkpoint(src: str | os.PathLike, manifest: Mapping, target: str | os.PathLike,
                       origin: Mapping | None = None) -> dict:
    """Check ``src`` against the manifest's architecture, strict, and write it as safetensors at ``target``.

    ``src`` is a safetensors file or a PyTorch checkpoint (read with
    ``weights_only=True``, :func:`read_torch_checkpoint`). Every key of the
    encoder must be matched (:func:`match_state_dict`). A safetensors file is
    then copied byte for byte (so its upstream sha256 stays valid); a PyTorch
    checkpoint is written as safetensors with the encoder's own key names.
    Both atomically; a provenance record
    (:func:`provenance_path`) keeps both sha256 sums, the container and
    prefix that were stripped, and ``origin``. Returns that record.
    """
    src, target = Path(src), Path(target)
    name = manifest.get("name", "the encoder")
    src_sha = sha256_file(src)
    want = manifest.get("checkpoint_sha256") if manifest.get("source", {}).get("checkpoint_format") else None
    if want and src_sha.lower() != str(want).lower():
        raise DataError(f"{src} has sha256 {src_sha[:16]}..., expected {str(want)[:16]}... for {name}")
    with open(src, "rb") as fh:
        magic = fh.read(8)
    try:
        check_safetensors_header(src)
        tensors, container, is_safetensors = read_safetensors(src), "", True
    except DataError:
        if not (magic[:2] == b"PK" or magic[:1] == b"\x80"):
            raise
        (tensors, container), is_safetensors = read_torch_checkpoint(src, manifest), False
    with torch.device("meta"):
        encoder = build_encoder(manifest)
    prefixes = manifest.get("state_dict", {}).get("key_prefixes", DEFAULT_KEY_PREFIXES)
    renamed, prefix = match_state_dict(tensors, encoder, where=str(src), key_prefixes=prefixes, name=name)
    if is_safetensors:
        import shutil
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    else:
        from safetensors.torch import save as st_save
        _atomic_write_bytes(target, st_save({k: v.contiguous() for k, v in renamed.items()}))
    digest = sha256_file(target)
    if manifest.get("sha256") and digest.lower() != manifest["sha256"].lower():
        target.unlink()
        raise DataError(f"the converted {target.name} has sha256 {digest[:16]}..., expected "
                        f"{manifest['sha256'][:16]}... for {name}: another revision of the checkpoint")
    record = {"name": name, "file": target.name, "sha256": digest, "source_file": src.name,
              "source_sha256": src_sha, "container": container, "key_prefix": prefix, "tensors": len(renamed),
              "torch": torch.__version__, "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(origin or {})}
    _atomic_write_bytes(provenance_path(target), (json.dumps(record, indent=2) + "\n").encode())
    return record


# --------------------------------------------------------------------------- fetch-model
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default="ct-fm",
                        help=f"foundation model (manifest in models/; default ct-fm; known: "
                             f"{', '.join(manifest_names())})")
    parser.add_argument("--from", dest="from_path", default=None, metavar="PATH",
                        help="convert/import a checkpoint you brought (safetensors, or a PyTorch file read with "
                             "weights_only=True) instead of downloading")
    parser.add_argument("--revision", default=None,
                        help="hub revision (branch, tag or commit; default: the manifest's)")
    parser.add_argument("--dest", default=None, metavar="DIR",
                        help=f"directory to write into (default: the cache, ${ENV_WEIGHTS_DIR}/<name> or "
                             f"{DEFAULT_CACHE_ROOT}/<name>)")
    parser.add_argument("--force", action="store_true", help="download again even if the file is there")


def _verify(path: Path, manifest: Mapping) -> str:
    check_safetensors_header(path)
    actual = sha256_file(path)
    expected, origin = expected_sha256(manifest, path)
    if expected and actual.lower() != expected.lower():
        raise DataError(f"{path} has sha256 {actual[:16]}..., expected {expected[:16]}... ({origin}): delete it "
                        "and fetch again")
    return actual


def _host_unreachable(url: str) -> str | None:
    """Why the host of ``url`` cannot be reached, decided at once (its name does not resolve); None when it may be.

    Behind a proxy (``HTTPS_PROXY`` ...) the lookup is left to the proxy and
    nothing is probed.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(url).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}"
    return None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, decided quickly; None when it may be.

    huggingface_hub retries a failed name lookup for about 25 s; an offline
    machine is recognised here at once (``HF_HUB_OFFLINE`` set, or the hub's
    host name does not resolve).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _host_unreachable(constants.ENDPOINT)


def _download_url(url: str, path: Path, timeout: float = 30.0) -> None:
    """Stream ``url`` into ``path`` (atomically); any failure is ``MissingInputError``."""
    import shutil
    import urllib.request

    unreachable = _host_unreachable(url)
    if unreachable:
        raise MissingInputError(f"cannot reach {url.split('/')[2]} ({unreachable})")
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 22)
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise MissingInputError(f"could not download {url} ({type(exc).__name__}: {str(exc)[:120]})") from None


def _fetch_hub(args, manifest: Mapping, dest: Path, target: Path) -> dict:
    """Download a safetensors file from the Hugging Face hub to ``target``; returns the provenance origin."""
    source, filename = manifest["source"], _filename(manifest)
    revision = args.revision or source.get("revision") or None
    where = (f"download https://huggingface.co/{source['repo_id']}/resolve/{revision or 'main'}/{filename} "
             f"by hand and run 'bids_adhd fetch-model {args.name} --from FILE' (or pass --weights PATH at run time)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingInputError(f"huggingface_hub is not installed (pip install 'bids_adhd[fetch]'); {where}") from None
    unreachable = _hub_unreachable()
    if unreachable:
        raise MissingInputError(f"cannot reach the Hugging Face hub ({unreachable}); {where}; expected at {target}")
    LOG.info("downloading %s/%s (revision %s) into %s", source["repo_id"], filename, revision or "main", dest)
    try:
        got = Path(hf_hub_download(repo_id=source["repo_id"], filename=filename, revision=revision,
                                   local_dir=str(dest), etag_timeout=10))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # offline, DNS, HTTP, hub errors: all mean "could not get it"
        reason = " ".join(str(exc).split()).split(". ")[0][:160]
        raise MissingInputError(f"could not download {source['repo_id']}/{filename} "
                                f"({type(exc).__name__}: {reason}); {where}; expected at {target}") from None
    return {"origin": f"huggingface:{source['repo_id']}@{revision or 'main'}", "downloaded": str(got),
            **_hub_resolved(dest, filename)}


def _hub_resolved(dest: Path, filename: str) -> dict:
    """The commit and ETag (for an LFS or Xet file, normally its sha256) huggingface_hub recorded for a download into ``dest``."""
    try:
        from huggingface_hub._local_folder import read_download_metadata   # private, hence the guard
        meta = read_download_metadata(dest, filename)
    except Exception:  # noqa: BLE001 - any failure only means there is nothing to record
        return {}
    return {"revision_resolved": meta.commit_hash, "etag": meta.etag} if meta is not None else {}


def _fetch_url(args, manifest: Mapping, dest: Path, target: Path) -> dict:
    """Download a PyTorch checkpoint (``source.url``) next to ``target``; returns its path in the origin."""
    source = manifest["source"]
    raw = dest / source.get("checkpoint_filename", "checkpoint.pt")
    if not raw.is_file() or args.force:
        try:
            _download_url(source["url"], raw)
        except MissingInputError as exc:
            raise MissingInputError(f"{exc.message}; download it by hand and run 'bids_adhd fetch-model "
                                    f"{args.name} --from FILE' on a trusted machine (it converts to {target})") from None
    return {"origin": source["url"], "downloaded": str(raw)}


def run_cli(args: argparse.Namespace) -> int:
    """Put the model's safetensors file (and its provenance record) in the cache.

    Without ``--from``: a safetensors source is downloaded from the hub and
    checked; a PyTorch source (``source.checkpoint_format: torch``, FMCIB) is
    downloaded and converted once (:func:`convert_checkpoint`, only
    ``torch.load(weights_only=True)``), then the download is deleted. With
    ``--from PATH``: that file is checked/converted instead. The loader itself
    stays safetensors-only.

    Exit codes: 0 done (or already there), 66 (MissingInputError) when the
    download fails (offline, unreachable, huggingface_hub missing) or PATH does
    not exist, 65 when the file is not the expected one or needs full
    unpickling, 73 when the destination cannot be created.
    """
    manifest = load_manifest(args.name)
    dest = Path(args.dest).expanduser() if args.dest else cache_dir(args.name)
    target = dest / _filename(manifest)
    if args.from_path is None and target.is_file() and not args.force:
        print(f"{target} already present (sha256 {_verify(target, manifest)})")
        return 0
    if args.from_path is not None and not Path(args.from_path).expanduser().is_file():
        raise MissingInputError(f"--from {args.from_path}: no such file")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {dest}: {exc.strerror or exc}") from None
    if args.from_path is not None:
        src, origin = Path(args.from_path).expanduser(), {"origin": f"--from {Path(args.from_path).name}"}
    elif manifest["source"].get("checkpoint_format") == "torch":
        origin = _fetch_url(args, manifest, dest, target)
        src = Path(origin["downloaded"])
    else:
        origin = _fetch_hub(args, manifest, dest, target)
        src = Path(origin["downloaded"])
    origin.pop("downloaded", None)
    if src.resolve() == target.resolve():          # downloaded in place: convert through a side copy
        src = src.rename(src.with_name(f".{src.name}.download"))
    record = convert_checkpoint(src, manifest, target, origin)
    if args.from_path is None:
        src.unlink(missing_ok=True)
    verified = "verified against the manifest" if manifest.get("sha256") else "recorded in " + \
        provenance_path(target).name + "; not in the manifest"
    print(f"{target} (sha256 {record['sha256']}, {verified}; source sha256 {record['source_sha256']})")
    return 0
