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
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..config import ModelConfig, models_dir
from ..errors import DataError, MissingInputError, OutputError, UsageError

LOG = logging.getLogger("bids_adhd.foundation")

ENV_WEIGHTS_DIR = "BIDS_ADHD_WEIGHTS_DIR"
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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def load_weights(encoder: nn.Module, path: str | os.PathLike, *, sha256: str | None = None,
                 key_prefixes=DEFAULT_KEY_PREFIXES, name: str = "the encoder") -> dict:
    """Load a safetensors file into ``encoder`` after checking it completely.

    Checks, in order: the sha256 (when ``sha256`` is given), the safetensors
    header, then keys (after stripping one of ``key_prefixes``), shapes and
    finiteness against ``encoder.state_dict()``. Any failure is a one-line
    ``DataError``; the encoder is untouched unless every check passes.

    Returns ``{"weights_path", "sha256", "sha256_verified", "key_prefix"}``.
    """
    path = Path(path)
    actual = sha256_file(path)
    if sha256 and actual.lower() != sha256.lower():
        raise DataError(f"weights file {path} has sha256 {actual[:16]}..., expected {sha256[:16]}... for {name}: "
                        "the file is corrupt or another revision; delete it and fetch it again")
    tensors = read_safetensors(path)
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
        raise DataError(f"weights file {path} does not match {name}: " + "; ".join(problems))
    bad = [k for k, v in renamed.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"weights file {path} holds non-finite values in {_few(bad)}")

    encoder.load_state_dict(renamed, strict=False)
    return {"weights_path": str(path), "sha256": actual, "sha256_verified": bool(sha256),
            "key_prefix": prefix}


def _missing_message(name: str, manifest: Mapping) -> str:
    places = " or ".join(str(p) for p in weight_search_paths(name, _filename(manifest)))
    return (f"no weights for foundation model {name!r}: looked in {places}. Run 'bids_adhd fetch-model {name}', "
            f"or download {manifest['source'].get('url', manifest['source'].get('repo_id'))} to "
            f"{cache_dir(name) / _filename(manifest)}, or pass --weights PATH")


def load_encoder(cfg: ModelConfig, weights: str | os.PathLike | None = None, *,
                 manifest: Mapping | None = None, architecture_only: bool = False) -> tuple[nn.Module, dict]:
    """The foundation encoder of ``cfg.foundation``, with its pre-trained weights when there are any.

    - ``cfg.pretrained`` False: randomly initialised on purpose (``weights`` is ignored).
    - ``weights`` given: that file (``MissingInputError`` if it does not exist).
    - otherwise :func:`find_weights`; when nothing is found the encoder is
      RANDOMLY INITIALISED, a prominent WARNING is logged and
      ``info["pretrained"]`` is False with ``info["warning"]`` set: the group
      level must report this.
    - ``architecture_only``: build on the ``meta`` device (no memory, no
      weights); for counting parameters.

    ``manifest`` overrides the packaged manifest (tests). Returns
    ``(encoder, info)`` with info keys ``foundation``, ``pretrained``,
    ``weights_path``, ``sha256``, ``sha256_verified``, ``key_prefix`` (when
    loaded), ``warning`` (None, or why the encoder is not the pre-trained
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
        banner = "!" * 78
        LOG.warning("%s\nWARNING: THE %s ENCODER IS RANDOMLY INITIALISED - results are NOT those of the "
                    "pre-trained model.\n%s\n%s", banner, name.upper(), msg, banner)
        info.update(warning=f"encoder randomly initialised: {msg}", init="random (weights missing)")
        return encoder, info
    prefixes = manifest.get("state_dict", {}).get("key_prefixes", DEFAULT_KEY_PREFIXES)
    loaded = load_weights(encoder, path, sha256=manifest.get("sha256"), key_prefixes=prefixes, name=name)
    if not loaded["sha256_verified"]:
        LOG.info("%s: no sha256 in the manifest to verify %s against; its sha256 is %s",
                 name, path, loaded["sha256"])
    info.update(loaded, pretrained=True, init="pretrained")
    LOG.info("%s weights loaded from %s", name, path)
    return encoder, info


# --------------------------------------------------------------------------- fetch-model
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default="ct-fm",
                        help=f"foundation model (manifest in models/; default ct-fm; known: "
                             f"{', '.join(manifest_names())})")
    parser.add_argument("--revision", default=None,
                        help="hub revision (branch, tag or commit; default: the manifest's)")
    parser.add_argument("--dest", default=None, metavar="DIR",
                        help=f"directory to download into (default: the cache, ${ENV_WEIGHTS_DIR}/<name> or "
                             f"{DEFAULT_CACHE_ROOT}/<name>)")
    parser.add_argument("--force", action="store_true", help="download again even if the file is there")


def _verify(path: Path, manifest: Mapping) -> str:
    check_safetensors_header(path)
    actual = sha256_file(path)
    expected = manifest.get("sha256")
    if expected and actual.lower() != expected.lower():
        raise DataError(f"{path} has sha256 {actual[:16]}..., expected {expected[:16]}...: delete it and fetch again")
    return actual


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, decided quickly; None when it may be.

    huggingface_hub retries a failed name lookup for about 25 s; an offline
    machine is recognised here at once (``HF_HUB_OFFLINE`` set, or the hub's
    host name does not resolve). Behind a proxy (``HTTPS_PROXY`` ...) the
    lookup is left to the proxy and nothing is probed.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}"
    return None


def run_cli(args: argparse.Namespace) -> int:
    """Download the weights file into the cache; offline: exit 66 saying where to put it.

    Exit codes: 0 done (or already there), 66 (MissingInputError) when the
    download fails for any reason (offline, hub unreachable, huggingface_hub
    not installed), 65 when the downloaded file is not the expected one, 73
    when the destination cannot be created.
    """
    manifest = load_manifest(args.name)
    source = manifest["source"]
    filename = _filename(manifest)
    dest = Path(args.dest).expanduser() if args.dest else cache_dir(args.name)
    target = dest / filename
    revision = args.revision or source.get("revision") or None
    if target.is_file() and not args.force:
        digest = _verify(target, manifest)
        print(f"{target} already present (sha256 {digest})")
        return 0
    where = (f"download https://huggingface.co/{source['repo_id']}/resolve/{revision or 'main'}/{filename} "
             f"by hand and put it at {target} (or pass --weights PATH at run time)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingInputError(f"huggingface_hub is not installed (pip install 'bids_adhd[fetch]'); {where}") from None
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {dest}: {exc.strerror or exc}") from None
    unreachable = _hub_unreachable()
    if unreachable:
        raise MissingInputError(f"cannot reach the Hugging Face hub ({unreachable}); {where}")
    LOG.info("downloading %s/%s (revision %s) into %s", source["repo_id"], filename, revision or "main", dest)
    try:
        got = Path(hf_hub_download(repo_id=source["repo_id"], filename=filename, revision=revision,
                                   local_dir=str(dest), etag_timeout=10))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # offline, DNS, HTTP, hub errors: all mean "could not get it"
        reason = " ".join(str(exc).split()).split(". ")[0][:160]
        raise MissingInputError(f"could not download {source['repo_id']}/{filename} "
                                f"({type(exc).__name__}: {reason}); {where}") from None
    if got.resolve() != target.resolve():
        got.replace(target)
    digest = _verify(target, manifest)
    print(f"{target} (sha256 {digest}{'' if manifest.get('sha256') else ', not verified: none in the manifest'})")
    return 0
