# Slim, non-root image running the same CLI as everywhere else.
# Runtime dependencies are pinned by constraints.txt (see README "Constraints").
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
# The [postgres] extra: asyncpg, for a journal shared by replicas (journal.url); unused with SQLite.
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt ".[postgres]"

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway && chown gateway /var/lib/gateway
COPY config/gateway.yaml /etc/gateway/gateway.yaml
# Every command (serve, check-config, recover, batches, healthcheck) reads this when --config is absent.
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml
USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8080
# GETs readyz at the config's listen address and gateway.prefix (3 s timeout); exit 0 ready, 1 not.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["gateway", "healthcheck"]
CMD ["gateway", "serve"]
