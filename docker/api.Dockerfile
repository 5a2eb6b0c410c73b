# wanrender API: the HTTP API and the reaper against a fleet's NATS (no GPU, no models).
#   docker build -f docker/api.Dockerfile -t wanrender-api .
# It binds 0.0.0.0 inside the container, so it refuses to start until the data
# volume holds an API key: docker compose run --rm api keys add NAME --data /data
FROM python:3.12-slim-bookworm
ARG UID=10001
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANRENDER_HOME=/data/home
WORKDIR /opt/wanrender
COPY pyproject.toml README.md ./
COPY src ./src
# The package with its dependencies (torch included: the request checks import it;
# nothing renders here); versions are pinned by pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
    && useradd --create-home --uid "${UID}" wanrender \
    && mkdir -p /data \
    && chown wanrender /data
USER ${UID}
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["wanrender"]
CMD ["serve", "--nats", "nats://nats:4222", "--creds", "/fleet/api.creds", "--workers", "0", "--listen", "0.0.0.0:8000", "--data", "/data"]
