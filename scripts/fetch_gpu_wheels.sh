#!/usr/bin/env bash
# Download the server's dependencies that the GPU machine's image lacks (pure Python, plus
# uvloop and httptools: uvicorn picks them up and streams with less CPU per token), as
# wheels for its Python 3.12, into ./.whl (ignored by git). Run here, then name `.whl` in
# the device call's `carry`; scripts/gpu_run.sh installs them when the folder is present.
set -euo pipefail
cd "$(dirname "$0")/.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
mkdir -p .whl
python3 -m pip download "${common[@]}" "${plat[@]}" \
  fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv \
  annotated-types typing-inspection h11 sniffio opentelemetry-api importlib-metadata zipp \
  uvloop httptools prometheus-client httpx httpcore anyio certifi idna xgrammar apache-tvm-ffi
ls -la .whl
