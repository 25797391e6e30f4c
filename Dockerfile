# imh-service: one image for `imh serve` (API) and `imh worker`.
#
#   docker build -t imh-service:cpu .                               # CPU torch
#   docker build --build-arg TORCH_INDEX=cu128 -t imh-service:cu128 .  # CUDA torch
#
# TORCH_INDEX names a PyTorch wheel index (https://download.pytorch.org/whl/<index>): cpu,
# or any CUDA variant it publishes torch ${TORCH_VERSION} for. The CUDA wheels carry their
# own CUDA runtime, so the same slim base serves both; the host needs only the NVIDIA
# driver and container toolkit.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first, pinned, from the chosen index: the project's `torch>=2.3` is then already
# met, and the constraint makes any later attempt to swap it for PyPI's build fail loudly.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt

# Dependencies in their own layer, so editing the code does not reinstall them.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -c /opt/torch-constraint.txt -r /tmp/requirements.txt

# The packages pyproject.toml installs (tool.setuptools.packages.find), nothing else.
COPY architectures/ architectures/
COPY samplers/ samplers/
COPY discriminators/ discriminators/
COPY classifiers/ classifiers/
COPY evaluation/ evaluation/
COPY service/ service/
COPY zoo/ zoo/
RUN pip install --no-deps . && pip check


FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMH_HOST=0.0.0.0 \
    IMH_MODEL_STORE=/data/models
RUN useradd --system --user-group --uid 10001 --create-home --home-dir /home/imh imh \
    && mkdir -p /data/models \
    && chown imh:imh /data/models
COPY --from=build /opt/venv /opt/venv

USER imh
WORKDIR /home/imh
# The default ports of `imh serve` (8000) and `imh worker` (its probes and /metrics, 8001).
EXPOSE 8000 8001
# Liveness of whichever command runs: on IMH_PORT when set, else on the commands' default
# ports (serve 8000, worker 8001). No curl in a slim image, so stdlib urllib; the empty
# ProxyHandler ignores any HTTP_PROXY the engine passes in, which would otherwise send the
# loopback probe to the proxy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD for port in ${IMH_PORT:-8000 8001}; do \
            python -c "import sys, urllib.request as r; r.build_opener(r.ProxyHandler({})).open(f'http://127.0.0.1:{sys.argv[1]}/healthz', timeout=2)" "$port" 2>/dev/null && exit 0; \
        done; exit 1
ENTRYPOINT ["imh"]
CMD ["serve"]
