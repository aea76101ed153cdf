#!/usr/bin/env bash
# Put a foundation model's weights where the loader finds them with no flag
# (bids_adhd.learn.foundation.IMAGE_MODELS_DIR = /opt/bids_adhd/models/<name>/)
# and check them by sha256. The Dockerfile runs this at build time.
#
#   docker/fetch-weights.sh NAME DEST_DIR [SHA256]
#
# NAME      manifest name in models/ (ct-fm, fmcib)
# DEST_DIR  /opt/bids_adhd/models/NAME in the image
# SHA256    the expected sha256 of the weights file the loader reads
#           (DEST_DIR/model.safetensors; for FMCIB the file converted from the
#           published PyTorch checkpoint). Empty: the manifest's (models/NAME.json
#           "sha256"). If neither is known the build stops, unless SHA256 is the
#           word 'unverified': then the digests are only recorded (DEST_DIR/SHA256SUMS
#           and model.provenance.json) and a warning printed. A sha256 in the
#           manifest is enforced by fetch-model whatever SHA256 says.
#
# Environment:
# WEIGHTS_FROM  a local copy of the published file (CT-FM: model.safetensors;
#               FMCIB: model_weights.torch) to use instead of downloading
#               (air-gapped builds; the tests use it). It is checked the same way.
# PYTHON        the interpreter that has bids_adhd installed (default: python3)
#
# The download and any conversion are `bids_adhd fetch-model NAME --dest DEST_DIR`
# (huggingface_hub for CT-FM, the manifest's URL for FMCIB, whose PyTorch checkpoint
# is read with torch.load(weights_only=True) and written as safetensors), or
# `... --from WEIGHTS_FROM`. Its hub cache goes to a temporary HF_HOME that is
# deleted afterwards. fetch-model writes DEST_DIR/model.provenance.json: the origin,
# the commit the hub resolved, the sha256 of the download and of the file the
# loader reads (which checks it against that record on every run). The file is
# then loaded into the encoder the manifest names (keys, shapes), so a wrong file
# fails the build, not the first group run.
set -euo pipefail

NAME=${1:?usage: fetch-weights.sh NAME DEST_DIR [SHA256]}
DEST=${2:?usage: fetch-weights.sh NAME DEST_DIR [SHA256]}
EXPECTED=${3:-}
PYTHON=${PYTHON:-python3}

log() { echo "fetch-weights.sh: $*" >&2; }

bindir=$("$PYTHON" -c 'import sys, sysconfig; print(sysconfig.get_path("scripts"))')
# the manifest's sha256 (may be empty) and file name, without importing torch
{ read -r manifest_sha; read -r filename; } < <("$PYTHON" -c '
import json, sys
from bids_adhd.config import models_dir
m = json.loads((models_dir() / f"{sys.argv[1]}.json").read_text())
print(m.get("sha256") or "")
print(m["source"]["filename"])' "$NAME")
[ -n "${filename:-}" ] || { log "cannot read the manifest models/$NAME.json"; exit 66; }
if [ -z "$EXPECTED" ]; then
    EXPECTED=$manifest_sha
fi
if [ -z "$EXPECTED" ]; then
    log "no sha256 for $NAME: neither the build argument nor models/$NAME.json has one."
    arg=${NAME^^}
    log "Pass the digest of a trusted download (docker build --build-arg ${arg//-/}_SHA256=<64 hex>),"
    log "or fill in models/$NAME.json's \"sha256\", or record an unchecked file's digests with the value 'unverified'."
    exit 65
fi
if [ "$EXPECTED" != unverified ] && ! [[ "$EXPECTED" =~ ^[0-9a-fA-F]{64}$ ]]; then
    log "'$EXPECTED' is not a sha256 (64 hex digits)"
    exit 64
fi
if [ -n "$manifest_sha" ] && [ "$EXPECTED" != unverified ] \
   && [ "${EXPECTED,,}" != "${manifest_sha,,}" ]; then
    log "the sha256 given ($EXPECTED) differs from models/$NAME.json's ($manifest_sha)"
    exit 65
fi

mkdir -p "$DEST"
work=$(mktemp -d "${TMPDIR:-/tmp}/fetch-weights.XXXXXX")
trap 'rm -rf "$work"' EXIT
from=()
if [ -n "${WEIGHTS_FROM:-}" ]; then
    log "using the local file $WEIGHTS_FROM"
    from=(--from "$WEIGHTS_FROM")
fi
# downloads (or imports WEIGHTS_FROM), converts a PyTorch checkpoint, writes the provenance record
HF_HOME="$work/hf" HF_HUB_DISABLE_TELEMETRY=1 HOME="$work" \
    "$bindir/bids_adhd" fetch-model "$NAME" --dest "$DEST" ${from[@]+"${from[@]}"}
rm -rf "$DEST/.cache"          # huggingface_hub's local_dir metadata (copied into model.provenance.json)
[ -s "$DEST/${filename%%.*}.provenance.json" ] || { log "fetch-model wrote no provenance record"; exit 65; }

actual=$(sha256sum "$DEST/$filename" | awk '{print $1}')
if [ "$EXPECTED" = unverified ]; then
    log "WARNING: $NAME weights NOT verified (no sha256 given); their sha256 is $actual, recorded in" \
        "$DEST/SHA256SUMS and $DEST/${filename%%.*}.provenance.json"
elif [ "${actual,,}" != "${EXPECTED,,}" ]; then
    log "sha256 mismatch for $DEST/$filename: got $actual, expected $EXPECTED"
    rm -f "$DEST/$filename" "$DEST/${filename%%.*}.provenance.json"
    exit 65
else
    log "sha256 verified: $actual"
fi
(cd "$DEST" && sha256sum "$filename" >SHA256SUMS)

# the file must load into the encoder the manifest names, and the loader must find it
# with no flag and no cache (an empty HOME, no BIDS_ADHD_WEIGHTS_DIR)
env -u BIDS_ADHD_WEIGHTS_DIR HOME="$work/empty-home" "$PYTHON" -W ignore - "$NAME" "$DEST" <<'EOF'
import sys
from pathlib import Path
from bids_adhd.learn.foundation import (DEFAULT_KEY_PREFIXES, IMAGE_MODELS_DIR, build_encoder,
                                        count_parameters, find_weights, load_manifest, load_weights)
name, dest = sys.argv[1], Path(sys.argv[2]).resolve()
manifest = load_manifest(name)
path = Path(dest) / manifest["source"]["filename"]
encoder = build_encoder(manifest)
info = load_weights(encoder, path, sha256=manifest.get("sha256"),
                    key_prefixes=manifest.get("state_dict", {}).get("key_prefixes") or DEFAULT_KEY_PREFIXES,
                    name=name)
print(f"fetch-weights.sh: {name}: {count_parameters(encoder):,} parameters loaded from {path}"
      f" (key prefix {info['key_prefix']!r})", file=sys.stderr)
if dest.parent == IMAGE_MODELS_DIR.resolve():
    found = find_weights(name)
    if found is None or Path(found).resolve() != path:
        sys.exit(f"fetch-weights.sh: the loader does not find {path} (it found {found})")
EOF
chmod -R a+rX "$DEST"
log "$NAME ready in $DEST"
