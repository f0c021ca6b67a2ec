# stream-attention-serve on a CUDA runtime image.
#
#   docker build -t stream-attention .
#   docker run --gpus all -p 8000:8000 stream-attention                     # embedded default model
#   docker run --gpus all -p 8000:8000 -e STREAM_ATTENTION_MODEL=<hub id> \
#       -v $HOME/.cache/huggingface:/home/app/.cache/huggingface stream-attention
#
# Every server flag is also an environment variable: STREAM_ATTENTION_<FLAG_NAME>.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-dev and gcc: Triton compiles a small launcher module with the system compiler at
# first use of every kernel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

# torch from the CUDA wheel index in its own layer: it is most of the image and changes
# least. The package then brings the rest of its dependencies from pyproject.toml.
RUN pip install --upgrade pip && pip install --index-url ${TORCH_INDEX} torch

COPY pyproject.toml README.md /src/
COPY stream_attention /src/stream_attention
RUN pip install "/src[hf,server]" && rm -rf /src

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
USER app
WORKDIR /home/app
# Created as the app user so named volumes mounted here start out writable by it.
RUN mkdir -p /home/app/.cache/huggingface /home/app/.triton

ENV STREAM_ATTENTION_HOST=0.0.0.0 \
    STREAM_ATTENTION_PORT=8000 \
    HF_HOME=/home/app/.cache/huggingface \
    TRITON_CACHE_DIR=/home/app/.triton
EXPOSE 8000

# Liveness: /health answers while the model loads (the start period covers the load) and
# turns 503 once the engine has died. docker-compose.yml probes the same route with the
# same timings; /ready is the readiness route, for load balancers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1

# exec form: SIGTERM reaches uvicorn, which drains in-flight requests (--shutdown-timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["stream-attention-serve"]
CMD []
