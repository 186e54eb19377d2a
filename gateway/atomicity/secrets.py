"""Sensitive headers in the journal: kept apart from the rows that use them, encrypted when keyed.

A stored header list holds `[name, {"secret": ref}]` for a sensitive header; the value lives in the
journal's secrets table (erased once the batch is final), as `plain:...` or `fernet:...`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from gateway.errors import ConfigError

StoredHeaders = list[list[Any]]


class SecretUnavailable(Exception):
    """A journaled secret exists but this process cannot decrypt it (missing or different key)."""


class HeaderSealer:
    """Splits sensitive header values out of header lists and puts them back."""

    def __init__(self, sensitive: Iterable[str], key: bytes | None = None) -> None:
        self.sensitive = frozenset(name.lower() for name in sensitive)
        self._fernet = None if key is None else Fernet(key)

    @property
    def encrypting(self) -> bool:
        return self._fernet is not None

    def seal(
        self, batch_id: str, headers: Sequence[Sequence[str]]
    ) -> tuple[StoredHeaders, dict[str, str]]:
        """The header list to store and the secrets it refers to (ref -> stored value)."""
        stored: StoredHeaders = []
        secrets: dict[str, str] = {}
        for name, value in headers:
            if name.lower() not in self.sensitive:
                stored.append([name, value])
                continue
            ref = hashlib.sha256(f"{batch_id}\0{name.lower()}\0{value}".encode()).hexdigest()[:24]
            secrets[ref] = self._protect(value)
            stored.append([name, {"secret": ref}])
        return stored, secrets

    def unseal(
        self, stored: Iterable[Sequence[Any]], secrets: Mapping[str, str], *, strict: bool = True
    ) -> list[tuple[str, str]]:
        """The headers back. A secret that was erased is left out; one that is still stored but
        cannot be revealed (no key, another key) raises SecretUnavailable when `strict`, else is
        shown as `<sealed>` (for operators, who never see secret values anyway)."""
        headers: list[tuple[str, str]] = []
        for name, value in stored:
            if isinstance(value, str):
                headers.append((str(name), value))
            elif isinstance(value, dict) and value.get("secret") in secrets:
                plain = self._reveal(secrets[value["secret"]])
                if plain is None and strict:
                    raise SecretUnavailable(
                        f"the journaled {name} header cannot be decrypted with the configured "
                        "journal key (journal.key_env / journal.key_file)"
                    )
                headers.append((str(name), "<sealed>" if plain is None else plain))
        return headers

    def _protect(self, value: str) -> str:
        if self._fernet is None:
            return "plain:" + value
        return "fernet:" + self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def _reveal(self, stored: str) -> str | None:
        kind, _, data = stored.partition(":")
        if kind == "plain":
            return data
        if kind == "fernet" and self._fernet is not None:
            try:
                return self._fernet.decrypt(data.encode("ascii")).decode("utf-8")
            except (InvalidToken, UnicodeDecodeError):
                return None
        return None


def load_key(key_env: str | None, key_file: str | None, config_file: str = "<config>") -> bytes | None:
    """The journal encryption key from an environment variable or a file; None when not configured."""
    if key_env is not None:
        raw = os.environ.get(key_env)
        if not raw:
            raise ConfigError(config_file, "journal.key_env", f"environment variable {key_env} is not set")
        where = "journal.key_env"
    elif key_file is not None:
        try:
            raw = Path(key_file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(config_file, "journal.key_file", f"cannot read the key: {exc}") from None
        where = "journal.key_file"
    else:
        return None
    key = raw.strip().encode("ascii", "replace")
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(
            config_file, where, "not a Fernet key (32 url-safe base64-encoded bytes; see the README)"
        ) from None
    return key
