"""OpenTelemetry tracing (the `otel` extra): spans through the SDK, exported as OTEL_* says.

Imported only when `tracing.enabled` is set (see gateway/tracing.py).
"""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.tracing import Tracing


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, config: GatewayConfig) -> None:
        raise NotImplementedError("being written")
