"""A throwaway PostgreSQL cluster for tests: initdb in a temp folder, pg_ctl start on 127.0.0.1 and a free port,
trust authentication, stopped and deleted afterwards. Runs as the `postgres` user when the tests run as root
(initdb refuses root). `find_pg_bin()` is None when the server binaries are not installed (the tests then skip;
Debian: apt-get install postgresql)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def find_pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    if owner is None:
        return cmd
    return ["runuser", "-u", owner, "--", *cmd]


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yields a postgresql:// URL to a fresh database; everything is removed afterwards."""
    bindir = find_pg_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="mt-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if owner is not None:
        shutil.chown(root, owner)
        shutil.chown(sock, owner)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = {"check": True, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "timeout": 120}
    try:
        subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "mt", "-A", "trust", "-E", "UTF8",
                                  "--no-sync"], owner), **run)
        opts = f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=100"
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                  "-w", "-t", "60", "start"], owner), **run)
        subprocess.run(_as_owner([str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb",
                                  "-h", "127.0.0.1", "-p", str(port), "-U", "mt", "modeltrace"], owner), **run)
        yield f"postgresql://mt@127.0.0.1:{port}/modeltrace"
    finally:
        if data.exists():
            subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                                     owner), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
