# syntax=docker/dockerfile:1
# dlmuse-bids: DLMUSE brain segmentation BIDS App, GPU-capable (CUDA) and CPU.
#
#   docker build -t dlmuse/dlmuse-bids:0.1.0 .                          # with the model weights
#   docker build --build-arg FETCH_MODELS=0 -t dlmuse/dlmuse-bids:ci .  # without (CI-size)
#
# The PyTorch wheel brings its own CUDA libraries (the cuda-toolkit/nvidia-* wheels), so the
# CUDA "base" image is enough: it adds the NVIDIA container settings and the driver requirement.
# torch 2.13.0 from PyPI depends on cuda-toolkit 13.0 (pip's resolver), so the default base is
# CUDA 13.0; NVIDIA documents driver >= 580 for it (not tested here). For older drivers,
# build with a CUDA 12 base and the matching wheel index, e.g.
#   --build-arg CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---- base: Python 3.12 (Ubuntu 24.04's) on the CUDA base image ----
FROM ${CUDA_BASE} AS base
# Ubuntu's archive keeps only the newest build of each package, so pinning apt versions would
# break the build at the next security update; the base image tag pins the release (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with torch and dlmuse-bids, and the model weights ----
FROM base AS build
# As above: Ubuntu's archive does not keep older builds to pin (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# torch first, from its own index, so that installing the project keeps this (CUDA) build
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dlmuse_bids/ dlmuse_bids/
# The runtime stays small: fail the build if anything pulled in torchvision, timm or nnunetv2.
RUN python -m pip install --no-cache-dir . \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('torchvision', 'timm', 'nnunetv2') if u.find_spec(m)]; sys.exit(f'unwanted packages installed: {bad}' if bad else 0)"

# The template of the orientation check (MNI152NLin2009cAsym, res-02 T1w and brain mask, a few
# MB) from TemplateFlow, into a read-only home: nothing is downloaded at run time.
RUN python -c "from pathlib import Path; from dlmuse_bids.template import fetch_template; print(fetch_template(Path('/opt/templateflow')))"

# The official weights (CBICA, non-commercial licence), fetched and checked (size, sha256) now,
# so that nothing is downloaded at run time. FETCH_MODELS=0 builds an image without them (CI);
# mount a models directory on /opt/dlmuse/models to use it.
ARG FETCH_MODELS=1
RUN mkdir -p /opt/dlmuse/models \
    && case "${FETCH_MODELS}" in \
        1) dlmuse models fetch --dest /opt/dlmuse/models \
           && dlmuse models verify /opt/dlmuse/models ;; \
        0) echo "FETCH_MODELS=0: building without the model weights" ;; \
        *) echo "FETCH_MODELS must be 0 or 1, not '${FETCH_MODELS}'" >&2; exit 64 ;; \
    esac

# ---- final: the app, its weights, a non-root user; no build tools ----
FROM base AS final
# Ubuntu 24.04 images come with a user "ubuntu" holding uid 1000; give that uid to our user.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --no-log-init --uid 1000 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin dlmuse
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/templateflow /opt/templateflow
COPY --from=build /opt/dlmuse /opt/dlmuse

# Nothing needs a writable home: caches go to /tmp (writable whatever uid runs the image, e.g.
# `docker run -u "$(id -u):$(id -g)"`), TemplateFlow and the models are read-only image paths.
# Threads are not set here: the app sizes them from --nprocs, cgroup limits and SLURM.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    HF_HOME=/tmp/huggingface \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NIPYPE_NO_ET=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DLMUSE_MODEL_DIR=/opt/dlmuse/models \
    DLMUSE_OFFLINE=1 \
    DLMUSE_BIDS_CONTAINER=docker:dlmuse/dlmuse-bids:0.1.0

LABEL org.opencontainers.image.title="dlmuse-bids" \
      org.opencontainers.image.description="DLMUSE brain segmentation (DLICV + DLMUSE nnU-Net v2 models) of T1w MRI as a BIDS App. Code: Apache-2.0. Built-in DLICV/DLMUSE model weights: CBICA, non-commercial licence (huggingface.co/nichart)." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/dlmuse-bids/dlmuse-bids" \
      org.opencontainers.image.url="https://github.com/dlmuse-bids/dlmuse-bids" \
      org.opencontainers.image.licenses="Apache-2.0"

# uid of "dlmuse"; numeric so that runtimes can check it is not root
USER 1000:1000
WORKDIR /tmp
# The app starts, as this user, with this environment.
RUN dlmuse-bids --version && dlmuse models path
ENTRYPOINT ["dlmuse-bids"]
