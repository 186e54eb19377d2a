"""A private PostgreSQL cluster for the tests and the bench: initdb in a temporary directory, a unix
socket only (no TCP), trust auth, run as the `postgres` system user when we are root.

`PgCluster.start()` raises PgUnavailable (with the reason) when the server binaries are missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

REQUIRE_VARIABLE = "GATEWAY_REQUIRE_POSTGRES"
"""Set to 1 (CI does) to fail instead of skipping when PostgreSQL cannot be started."""
BIN_VARIABLE = "GATEWAY_PG_BIN"
"""Directory holding initdb and pg_ctl (default: the newest /usr/lib/postgresql/*/bin)."""


class PgUnavailable(Exception):
    """PostgreSQL cannot be started here (binaries missing, no `postgres` user when root)."""


def find_bin_dir() -> str:
    given = os.environ.get(BIN_VARIABLE)
    candidates = [given] if given else sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if directory and os.access(os.path.join(directory, "initdb"), os.X_OK):
            return directory
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    raise PgUnavailable(
        f"no PostgreSQL server binaries (initdb, pg_ctl) in {given or '/usr/lib/postgresql/*/bin'} "
        f"or on PATH; install postgresql (Debian: apt-get install postgresql) or set {BIN_VARIABLE}"
    )


def _run_as() -> dict[str, Any]:
    """subprocess arguments that drop root to the `postgres` user (the server refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise PgUnavailable("running as root, and no `postgres` system user to run the server") from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class PgCluster:
    """One server in its own directory; databases are made per test with `create_database`."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self.bin_dir = find_bin_dir()
        self.directory = tempfile.mkdtemp(prefix="gwpg-")  # short: a unix socket path is <108 bytes
        self.data = os.path.join(self.directory, "data")
        self._as = _run_as()
        if self._as:
            os.chown(self.directory, self._as["user"], self._as["group"])
        self._databases = 0

    def _tool(self, name: str, *args: str) -> None:
        result = subprocess.run(
            [os.path.join(self.bin_dir, name), *args], capture_output=True, text=True, timeout=120,
            cwd=self.directory, **self._as,
        )
        if result.returncode != 0:
            raise PgUnavailable(f"{name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def start(self) -> PgCluster:
        if not os.path.exists(self.data):
            self._tool("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                       "--no-sync", "--no-instructions")
        options = f"-c listen_addresses='' -k {self.directory} -c max_connections=300"
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._tool("pg_ctl", "-D", self.data, "-l", os.path.join(self.directory, "server.log"),
                   "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(PgUnavailable, subprocess.TimeoutExpired):
            self._tool("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.directory}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh empty database (createdb over the socket); returns its URL."""
        self._databases += 1
        name = f"{prefix}{os.getpid()}_{self._databases}"
        result = subprocess.run(
            [os.path.join(self.bin_dir, "createdb"), "-h", self.directory, "-U", "postgres", name],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise PgUnavailable(f"createdb failed: {result.stderr.strip()}")
        return self.url(name)


@contextlib.contextmanager
def running_cluster(*, fsync: bool = False) -> Iterator[PgCluster]:
    cluster = PgCluster(fsync=fsync).start()
    try:
        yield cluster
    finally:
        cluster.remove()
