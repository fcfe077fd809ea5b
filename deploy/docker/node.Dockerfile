# medfed hospital node (CPU). The site's images are mounted read-only at /data.
# Build from the repository root: docker build -f deploy/docker/node.Dockerfile -t medfed-node .
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
RUN pip install "torch>=2.8" --index-url https://download.pytorch.org/whl/cpu \
    && pip install /tmp/dist/medfed-*.whl && rm -rf /tmp/dist
RUN useradd --system --home /var/lib/medfed medfed && mkdir -p /var/lib/medfed \
    && chown medfed /var/lib/medfed
USER medfed
EXPOSE 9401
VOLUME ["/var/lib/medfed"]
ENTRYPOINT ["medfed", "node", "start"]
CMD ["--coordinator", "coordinator:9092", "--ca", "/credentials/ca.pem", "--key", "/credentials/hospital.key", "--data", "/data", "--state", "/var/lib/medfed", "--metrics-port", "9401", "--metrics-host", "0.0.0.0"]
