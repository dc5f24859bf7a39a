"""Helpers shared by the benchmark scripts (tables, logging, hashing, the machine, a server's address)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * MIB):
            h.update(block)
    return h.hexdigest()


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def meminfo_total_kib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each package, ``?`` for one that is not installed."""
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "?"
    return versions


def read_address(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for ``mzstore serving <root> on HOST:PORT[ over TLS]`` on the server's stdout."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"mzstore serve did not start (exit {proc.poll()}); output so far: {buf!r}")
        if sel.select(left):
            data = os.read(proc.stdout.fileno(), 4096)
            if data:
                buf += data
    sel.close()
    found = re.findall(r" on (\S+:\d+)", buf.split(b"\n", 1)[0].decode())
    if not found:
        raise RuntimeError(f"cannot find the address in {buf!r}")
    return found[-1]


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a child still running, wait up to 30 s for it, then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_self() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_pid(pid: int | None) -> float | None:
    """User + system CPU seconds of another process, from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_kept(http_url: str, size: int, timeout: float) -> float:
    """Seconds until the ``mzstore_decoded_files_bytes`` of the server whose HTTP plane is ``http_url``
    reaches ``size``: the file its faces served is kept decoded on its disk."""
    import urllib.request

    start = time.monotonic()
    while True:
        with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as r:
            text = r.read().decode()
        kept = next(
            (float(line.split()[-1]) for line in text.splitlines() if line.startswith("mzstore_decoded_files_bytes ")),
            0.0,
        )
        if kept >= size:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the server kept {kept:.0f} of {size} bytes decoded after {timeout:.0f} s")
        time.sleep(0.2)


#: Runs argv[1:] as a grandchild and passes its exit status and output through. On Linux a
#: process's ru_maxrss starts from the RSS of the process it was forked from (the address
#: space it had at exec), so a child spawned straight from a big benchmark would report
#: the benchmark's peak. A fresh process forked from a small launcher starts from the
#: launcher's few MiB instead, which is below what any child needs for its imports.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def run_child(
    script: str | Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, Any]:
    """``script --child ARGS`` in a fresh process started from the small launcher; its last line of output, as JSON."""
    cmd = [sys.executable, "-S", "-c", _LAUNCHER, sys.executable, str(Path(script).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
