"""A batch reverse-proxy gateway for legacy REST APIs.

Splits JSON and multipart/mixed batches into upstream calls, optionally atomically; proxies the rest.
"""

__version__ = "0.1.0"
