# dlmuse-bids: DLMUSE brain segmentation BIDS App, GPU-capable (CUDA) and CPU.
#
#   tools/build-image                  # CUDA torch, with the weights, the template and the norms
#   tools/build-image --cpu --no-models --tag dlmuse-bids:ci
#   docker build -t dlmuse/dlmuse-bids:0.1.0 .        # the same as the first, by hand
#
# Debian's Python (3.11) in a virtual environment; torch from pip. The CUDA build of torch brings
# its CUDA libraries as wheels, so no CUDA base image is needed: the NVIDIA_* variables below let
# `docker run --gpus all` and `singularity --nv` expose the host's driver.
# No "syntax=" line: the engine's built-in frontend supports RUN --mount, and pulling another
# one would need a registry.
ARG BASE_IMAGE=debian:bookworm-slim

# ---- base: Debian's Python; what the final image runs on ----
FROM ${BASE_IMAGE} AS base
# Debian's archive keeps only the newest build of each package of a release, so pinning apt
# versions would break the build at the next point release; the base image pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with torch and dlmuse-bids, the template, the weights ----
FROM base AS build
# As above: Debian's archive does not keep older builds to pin (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Which torch: TORCH_BUILD=cuda (the default: pip's default index has the CUDA build on Linux)
# or cpu. A cpu build comes from a wheel in the build context's wheels/ folder (tools/build-image
# --cpu puts one there) or from an index given as TORCH_INDEX_URL; the build checks that the
# torch it installed is the build asked for. pip reads PIP_INDEX_URL and friends as usual, and
# an optional build secret "ca" (a CA bundle) is used for its downloads without being stored.
ARG TORCH_VERSION=2.13.0
ARG TORCH_BUILD=cuda
ARG TORCH_INDEX_URL=
ARG PIP_INDEX_URL
# A wheel file pins its version by its name; the index install is pinned to TORCH_VERSION (DL3013).
# hadolint ignore=DL3013
RUN --mount=type=bind,target=/ctx --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    for wheel in /ctx/wheels/torch-*.whl; do \
        if [ -f "$wheel" ]; then python -m pip install --no-cache-dir --no-deps "$wheel"; fi; \
    done; \
    python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}"; \
    python -c "import sys, torch; got = 'cuda' if torch.version.cuda else 'cpu'; \
sys.exit(0 if got == sys.argv[1] else f'TORCH_BUILD={sys.argv[1]} but pip installed the {got} build of torch {torch.__version__}')" \
        "${TORCH_BUILD}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dlmuse_bids/ dlmuse_bids/
# With the BIDS validator the app runs on its input. The runtime stays small: fail the build if
# anything pulled in torchvision, timm or nnunetv2. The project is this checkout (DL3013).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python -m pip install --no-cache-dir ".[validator]" \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('torchvision', 'timm', 'nnunetv2') if u.find_spec(m)]; sys.exit(f'unwanted packages installed: {bad}' if bad else 0)"

# The template of the orientation check (MNI152NLin2009cAsym, res-02 T1w and brain mask, a few
# MB) into a read-only TemplateFlow home, so nothing is downloaded at run time. It is taken from
# the build context's templateflow/ folder when that holds it (builds without access to
# TemplateFlow), else fetched when FETCH_TEMPLATE=1 (the default); FETCH_TEMPLATE=0 builds an
# image whose template check says "skipped".
ARG FETCH_TEMPLATE=1
RUN --mount=type=bind,target=/ctx \
    set -eu; \
    mkdir -p /opt/templateflow; \
    if [ -d /ctx/templateflow ]; then cp -R /ctx/templateflow/. /opt/templateflow/; fi; \
    case "${FETCH_TEMPLATE}" in \
        1) python -c "import os; from pathlib import Path; from dlmuse_bids.template import find_template, fetch_template; \
home = Path('/opt/templateflow'); files, why = find_template(home); print(files or fetch_template(home, os.environ))" ;; \
        0) echo "FETCH_TEMPLATE=0: the template check is skipped unless the context provided it" ;; \
        *) echo "FETCH_TEMPLATE must be 0 or 1, not '${FETCH_TEMPLATE}'" >&2; exit 64 ;; \
    esac

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

# NiChart's normative centile tables (CBICA/SBIA non-commercial licence, about 6 MB), for the
# centile tables of the outputs: from the build context's norms/ folder when it holds them
# (builds without internet; tools/build-image --norms-dir), else fetched when FETCH_NORMS=1 (the
# default); either way checked against their pinned sizes and sha256s. FETCH_NORMS=0 without a
# norms/ folder builds an image whose runs skip the centiles, saying so.
ARG FETCH_NORMS=1
RUN --mount=type=bind,target=/ctx \
    set -eu; \
    mkdir -p /opt/dlmuse/norms; \
    if [ -d /ctx/norms ]; then cp /ctx/norms/*.csv /opt/dlmuse/norms/; fi; \
    case "${FETCH_NORMS}" in \
        1) dlmuse norms fetch --dest /opt/dlmuse/norms && dlmuse norms verify /opt/dlmuse/norms ;; \
        0) if [ -d /ctx/norms ]; then dlmuse norms verify /opt/dlmuse/norms; \
           else echo "FETCH_NORMS=0: building without the normative tables"; fi ;; \
        *) echo "FETCH_NORMS must be 0 or 1, not '${FETCH_NORMS}'" >&2; exit 64 ;; \
    esac

# ---- final: the app, its weights, a non-root user; no build tools ----
FROM base AS final
RUN useradd --no-log-init --uid 1000 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin dlmuse
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/templateflow /opt/templateflow
COPY --from=build /opt/dlmuse /opt/dlmuse
# The commands also in /usr/local/bin: a login shell (`sh -l`, as Boutiques launches) resets PATH.
RUN ln -s /opt/venv/bin/dlmuse-bids /opt/venv/bin/dlmuse /opt/venv/bin/dlmuse-brainlife /usr/local/bin/

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
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DLMUSE_MODEL_DIR=/opt/dlmuse/models \
    DLMUSE_NORMS_DIR=/opt/dlmuse/norms \
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
RUN dlmuse-bids --version && dlmuse models path && dlmuse norms path
ENTRYPOINT ["dlmuse-bids"]
