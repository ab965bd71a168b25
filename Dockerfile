# syntax=docker/dockerfile:1
# The gateway as a container: `docker build -t openai-policy-gateway .`, then
#   docker run -p 8080:8080 -e OPENAI_API_KEY -e GATEWAY_API_KEY=... openai-policy-gateway
# Mount your own config over /etc/gateway/gateway.yaml; every key is in docs/config.md.

# --- build: install the package and its dependencies into a virtualenv ------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/gateway
WORKDIR /src
# Only what the package build reads: a change to tests or docs does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/gateway/bin/pip install .

# --- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed, unprivileged uid/gid so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --create-home \
        --shell /usr/sbin/nologin gateway

COPY --from=build /opt/gateway /opt/gateway
COPY config/ /etc/gateway/
# The price list the shipped config reads (pricing.file); a mounted config may point elsewhere.
ENV GATEWAY_PRICES_FILE=/etc/gateway/prices.yaml

# The working directory is the gateway's own: the default store, sqlite:///./gateway.db, lives here.
WORKDIR /var/lib/gateway
USER 10001:10001

EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["gateway"]
CMD ["serve", "--host", "0.0.0.0", "--config", "/etc/gateway/gateway.yaml"]
