# syntax=docker/dockerfile:1
# imgrec: one `imgrec serve` process (one uvicorn worker, one model copy) per container.
#
#   docker build -t imgrec:cpu .                                               # CPU, no PyTorch
#   docker build -t imgrec:gpu --target gpu --build-arg TORCH_VARIANT=cu128 .  # CUDA
#
# Two targets over one runtime stage: `cpu` (the default, the last stage) serves with ONNX
# Runtime and holds no PyTorch; `gpu` adds the pinned torch and torchvision of the chosen CUDA
# variant and the rest of the train extra of pyproject.toml, so it serves with the torch engine
# and can also train, export and quantize. The CUDA wheels carry their own CUDA runtime, so both
# images share the slim Python base; the host needs only the NVIDIA driver and container
# toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- deps: what serving needs, in a layer of its own; no PyTorch --------------------------
# Only pyproject.toml is copied here, so editing the source never reinstalls anything. The
# dependency lists are read from it, so the pins live in one place only.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# requirements.txt: the dependencies and the trace extra (the OpenTelemetry SDK and OTLP
# exporters, under 10 MB: an image is run by operators, who may point OTEL_* at a collector at any
# time; tracing stays off until they do); train.txt: the train extra with the extras it names
# (imgrec[export] -> imgrec[gpu]) spelled out; torch.txt: its torch and torchvision pins.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; f = lambda e: [r for d in x[e] for r in ([q for n in d[7:-1].split(',') for q in f(n)] if d.startswith('imgrec[') else [d])]; open('requirements.txt', 'w').write('\n'.join(p['dependencies'] + x['trace']) + '\n'); open('train.txt', 'w').write('\n'.join(f('train')) + '\n')" \
 && grep -E '^torch(vision)?==' train.txt > torch.txt \
 && pip install --no-cache-dir -r requirements.txt

# ---- deps-gpu: plus PyTorch, from the PyTorch index of the chosen variant -----------------
# (PyPI's wheel would bring CUDA libraries of its own choosing; cu126, cu128, ... or cpu), then
# the rest of the train extra (onnx, onnxscript, safetensors, matplotlib)
FROM deps AS deps-gpu
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r torch.txt \
 && pip install --no-cache-dir -r train.txt

# ---- build-cpu / build-gpu: the imgrec package itself ------------------------------------
# --no-deps: everything it needs is in the layers above; this adds the package and `imgrec`.
FROM deps AS build-cpu
COPY app ./app
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    pip install --no-cache-dir --no-deps /src

FROM deps-gpu AS build-gpu
COPY app ./app
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    pip install --no-cache-dir --no-deps /src

# ---- runtime: what both images are, less their virtual environment --------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="imgrec" \
      org.opencontainers.image.description="REST image recognition (pre-activation ResNet)" \
      org.opencontainers.image.licenses="Apache-2.0"
# the group's id is the user's: useradd --user-group would pick a system gid (999), and
# USER 10001:10001 would then run in a group that owns nothing
RUN groupadd --system --gid 10001 imgrec \
 && useradd --system --uid 10001 --gid imgrec --create-home --home-dir /home/imgrec imgrec \
 && mkdir -p /data \
 && chown imgrec:imgrec /data
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
# SIGTERM drains (readiness off, queued work answered) before it exits; SIGHUP loads the model
# directory anew and switches to it with no request lost.
STOPSIGNAL SIGTERM
CMD ["imgrec", "serve"]

# ---- gpu: the runtime with PyTorch (the torch engine: CUDA, bf16; training, export) --------
FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv

# ---- cpu: the runtime without PyTorch (ONNX Runtime); the default target ------------------
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
