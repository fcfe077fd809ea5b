# medfed coordinator: nginx on the public port routing by role (Fleet API for hospitals,
# Control API for operators' certificates) with bounded requests, a Flower SuperLink on
# loopback with TLS and node authentication, and metrics.
# Build from the repository root: docker build -f deploy/docker/coordinator.Dockerfile -t medfed-coordinator .
# Stage 1: the medfed wheel, built from the checkout (its only source files).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY shared_models shared_models
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Stage 2: the image runs the installed wheel; no source checkout inside.
COPY --from=wheel /dist /tmp/dist
# The proxy: Debian's nginx, run by medfed (its files all in the state folder), never as a service.
RUN apt-get update && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "torch>=2.8" --index-url https://download.pytorch.org/whl/cpu \
    && pip install "$(ls /tmp/dist/medfed-*.whl)[coordinator]" && rm -rf /tmp/dist
RUN useradd --system --home /var/lib/medfed medfed && mkdir -p /var/lib/medfed /certs \
    && chown medfed /var/lib/medfed
USER medfed
# 9400 (metrics) is for the container network only: never publish it
EXPOSE 9092 9400
VOLUME ["/var/lib/medfed"]
ENTRYPOINT ["medfed", "coordinator", "start"]
CMD ["--certs", "/certs", "--host", "0.0.0.0", "--port", "9092", "--state", "/var/lib/medfed", "--metrics-port", "9400", "--metrics-host", "0.0.0.0"]
