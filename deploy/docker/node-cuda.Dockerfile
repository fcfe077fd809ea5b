# medfed hospital node with CUDA: trains on the hospital's GPU (docker run --gpus all ...).
# Build from the repository root: docker build -f deploy/docker/node-cuda.Dockerfile -t medfed-node-cuda .
# Stage 1: the medfed wheel, built from the checkout (its only source files).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY shared_models shared_models
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV PIP_NO_CACHE_DIR=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Stage 2: the image runs the installed wheel; no source checkout inside.
COPY --from=wheel /dist /tmp/dist
RUN pip install "torch>=2.8" && pip install /tmp/dist/medfed-*.whl && rm -rf /tmp/dist
RUN useradd --system --home /var/lib/medfed medfed && mkdir -p /var/lib/medfed \
    && chown medfed /var/lib/medfed
USER medfed
EXPOSE 9401
VOLUME ["/var/lib/medfed"]
ENTRYPOINT ["medfed", "node", "start"]
CMD ["--coordinator", "coordinator:9092", "--ca", "/credentials/ca.pem", "--key", "/credentials/hospital.key", "--data", "/data", "--device", "cuda", "--state", "/var/lib/medfed", "--metrics-port", "9401", "--metrics-host", "0.0.0.0"]
