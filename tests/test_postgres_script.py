"""``scripts/postgres.sh`` runs a real PostgreSQL server the way the tests need it: listening on
127.0.0.1 only, with password (scram-sha-256) authentication that refuses a wrong password,
and with a ``status`` command that reports it as running.

These tests check the server the test run started, at the URL in ``HEADWATER_TEST_POSTGRES``
(``bash scripts/postgres.sh start`` prints it); without that variable they fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import asyncpg
import pytest
from support.postgres import postgres_url

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "postgres.sh"
TCP_LISTEN = "0A"


def server_url() -> SplitResult:
    """The parts of the test server's URL (the test fails without one)."""
    parts = urlsplit(postgres_url())
    assert parts.scheme in {"postgresql", "postgres"}, f"not a PostgreSQL URL: {parts.geturl()}"
    assert parts.port is not None, f"no port in {parts.geturl()}"
    return parts


def decode_address(hex_address: str) -> str:
    """An address of /proc/net/tcp or tcp6: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets that listen on TCP ``port`` (Linux /proc/net)."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == TCP_LISTEN and int(hex_port, 16) == port:
                found.add(decode_address(address))
    return found


def connects(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host``:``port`` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:  # refused, or no such address/route here (e.g. no IPv6)
        return False


async def test_the_server_listens_on_127_0_0_1_only() -> None:
    """The URL names 127.0.0.1, the server is configured for it alone, the only listening
    socket on its port is bound to 127.0.0.1 (not 0.0.0.0 or ::), and other loopback addresses
    are refused."""
    url = server_url()
    port = url.port
    assert port is not None
    assert url.hostname == "127.0.0.1"
    connection = await asyncpg.connect(url.geturl(), timeout=5)
    try:
        assert await connection.fetchval("SHOW listen_addresses") == "127.0.0.1"
    finally:
        await connection.close()
    if Path("/proc/net/tcp").exists():
        assert listening_addresses(port) == {"127.0.0.1"}
    assert connects("127.0.0.1", port)
    assert not connects("127.0.0.2", port)
    assert not connects("::1", port)


async def test_the_right_password_is_accepted_and_a_wrong_one_refused() -> None:
    """The URL's credentials log in as ``headwater`` (stored as a SCRAM-SHA-256 verifier); the
    same user with a wrong password over TCP is refused."""
    url = server_url()
    connection = await asyncpg.connect(url.geturl(), timeout=5)
    try:
        assert await connection.fetchval("SELECT current_user") == "headwater"
        verifier = await connection.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = current_user"
        )
        assert verifier.startswith("SCRAM-SHA-256$")
    finally:
        await connection.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(url.geturl(), password="not-the-password", timeout=5)


def test_status_reports_the_server_running() -> None:
    """``bash scripts/postgres.sh status`` for the URL's port exits 0 (running and answering)."""
    port = server_url().port
    done = subprocess.run(
        ["bash", str(SCRIPT), "status"],
        env={**os.environ, "PG_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
