# Slim, non-root image running the same CLI as everywhere else.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway && chown gateway /var/lib/gateway
COPY config/gateway.yaml /etc/gateway/gateway.yaml
USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/_gateway/healthz', timeout=2).status == 200 else 1)"
CMD ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
