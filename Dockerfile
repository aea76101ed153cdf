# syntax=docker/dockerfile:1
# bids_adhd — diffusion-MRI BIDS App, CUDA image.
#
#   docker build -t bidsadhd/bids_adhd:0.1.0 .
#   (or, pinned: --build-arg CTFM_SHA256=<64 hex> --build-arg FMCIB_SHA256=<64 hex>)
#   docker run --rm --read-only --gpus all -v /data:/data:ro -v /out:/out \
#       bidsadhd/bids_adhd:0.1.0 /data /out participant
#
# docs/deploy.md has the whole story (Apptainer, Boutiques, Slurm). tests/test_container.py
# lints this file with hadolint and runs docker/install.sh, the install step below, in a
# fresh virtual environment.

# Base: the official PyTorch CUDA *runtime* image (no compilers, no CUDA toolkit),
# pinned by version. torch 2.9.1 satisfies monai 1.6 (torch >= 2.8); CUDA 12.8 runs on
# Volta to Blackwell GPUs with an NVIDIA driver >= 570 (>= 525 with CUDA's minor-version
# compatibility). For a bit-for-bit reproducible build pin the digest as well: look it
# up once with
#   docker buildx imagetools inspect pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
# and build with
#   --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime@sha256:<digest>
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# The name this image is published under; written into every output's
# dataset_description.json (GeneratedBy.Container) via BIDS_ADHD_IMAGE.
ARG BIDS_ADHD_IMAGE=bidsadhd/bids_adhd:0.1.0
# sha256 of each model's weights file as the loader reads it (model.safetensors; for
# FMCIB the file converted from the published model_weights.torch). Empty: the
# manifest's (models/<name>.json "sha256"); neither known: the build stops.
# 'unverified' (the default, because neither manifest has a verified sha256 yet:
# docs/model.md says why) downloads, converts and loads the file and RECORDS its
# digests (SHA256SUMS, model.provenance.json: origin, resolved hub commit, sha256 of
# the download and of the converted file), which the loader then checks on every
# run. Pin them with the values `bids_adhd fetch-model <name>` prints on a trusted
# machine.
ARG CTFM_SHA256=unverified
ARG FMCIB_SHA256=unverified
# The interpreter of the base image (conda's, on PATH).
ARG PYTHON=python

LABEL org.opencontainers.image.title="bids_adhd" \
      org.opencontainers.image.description="Diffusion-MRI BIDS App: DIPY preprocessing and DTI maps (participant), LoRA-adapted CT foundation-model ADHD classifier (group; FMCIB and CT-FM weights included)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/bids-adhd/bids_adhd" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. The package, its pinned dependencies and the BIDS validator (bids-validator-deno
#    from PyPI; no Node, no mrtrix3: nothing at run time needs them). install.sh pins
#    the base image's torch/CUDA wheels so pip cannot replace them, and fails if torch
#    changed. No apt packages are needed.
COPY setup.cfg pyproject.toml README.md /src/
COPY bids_adhd /src/bids_adhd
COPY pipelines /src/pipelines
COPY models /src/models
COPY docker /src/docker
#    The console script is also linked into /usr/local/bin, for login shells
#    (Boutiques runs `/bin/sh -l` in the container) whose PATH lacks conda's bin.
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHON="${PYTHON}" \
        bash /src/docker/install.sh /src \
    && exe="$(command -v bids_adhd)" \
    && { [ "${exe}" = /usr/local/bin/bids_adhd ] || ln -s "${exe}" /usr/local/bin/bids_adhd; } \
    && rm -rf /root/.cache

# 2. The weights of both foundation models, where the loader finds them with no flag
#    (bids_adhd.learn.foundation.IMAGE_MODELS_DIR = /opt/bids_adhd/models/<name>/):
#    FMCIB (the `paper` preset's encoder; its PyTorch checkpoint from Zenodo is read
#    with torch.load(weights_only=True) and converted to safetensors here, once) and
#    CT-FM (paper-ctfm and the baselines; safetensors from the Hugging Face hub).
#    Each is checked or recorded by sha256 and loaded once into its encoder.
RUN PYTHON="${PYTHON}" bash /src/docker/fetch-weights.sh fmcib /opt/bids_adhd/models/fmcib "${FMCIB_SHA256}" \
    && PYTHON="${PYTHON}" bash /src/docker/fetch-weights.sh ct-fm /opt/bids_adhd/models/ct-fm "${CTFM_SHA256}" \
    && rm -rf /src /root/.cache /tmp/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp \
           --shell /usr/sbin/nologin bidsapp

# 3. Run time. The root file system may be read only (docker run --read-only,
#    Apptainer): every cache and config a library writes goes under /tmp, which is a
#    volume (below) or a tmpfs (--tmpfs /tmp); results go to OUTPUT_DIR and the work
#    dir (default OUTPUT_DIR/.bids_adhd_work, or --work-dir). HOME is /tmp too, and
#    USER/LOGNAME are set (getpass.getuser() needs them for a uid with no passwd
#    entry), so any other uid (docker run -u "$(id -u):$(id -g)") works the same.
# BIDS_ADHD_REQUIRE_WEIGHTS: the weights are in the image, so a missing weights file
# (e.g. a pipeline naming another model) must stop the group level (exit 66) instead of training a randomly initialised
# encoder with a warning. Presets with `pretrained: false` (scratch) are unaffected.
ENV BIDS_ADHD_CONTAINER=docker \
    BIDS_ADHD_IMAGE=${BIDS_ADHD_IMAGE} \
    BIDS_ADHD_REQUIRE_WEIGHTS=1 \
    HOME=/tmp \
    USER=bidsapp \
    LOGNAME=bidsapp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    XDG_STATE_HOME=/tmp/.local/state \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    MPLBACKEND=Agg \
    NIPYPE_CONFIG_DIR=/tmp/.config/nipype \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    DIPY_HOME=/tmp/.cache/dipy \
    NILEARN_DATA=/tmp/.cache/nilearn_data \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TORCH_HOME=/tmp/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    CUDA_CACHE_PATH=/tmp/.cache/nv \
    DENO_DIR=/tmp/.cache/deno \
    DENO_NO_UPDATE_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /tmp
# numeric, so the host need not resolve it (the user 'bidsapp' made above)
USER 10001:10001
# A fresh writable /tmp for every container, also under --read-only without --tmpfs
# (an anonymous volume; docker run --rm removes it). --tmpfs /tmp overrides it.
VOLUME ["/tmp"]

ENTRYPOINT ["bids_adhd"]
CMD ["--help"]
