#!/usr/bin/env python3
"""Link benchmark (issues 14 and 10): time-to-weights over a rate-limited network link.

The server runs in its own network namespace behind a veth pair whose two
ends are rate-limited with ``tc`` (``tbf``, both directions); the client runs
in the root namespace and reaches it at 10.203.0.2. In the server's
namespace, beside ``mzstore serve``, nginx serves the raw ``.safetensors``
file: ``curl`` of that file over the same link, in the same run, is the
baseline. For each link rate it times, interleaved, ``--runs`` times:

* ``raw``: ``curl -o DIR/model.safetensors`` of the raw file from nginx
  (into the page cache, as curl leaves it); ``raw + fsync``: the same, then
  an fsync of the file, what a crash-safe download costs;
* ``pull``: ``mzstore pull REF -o DIR --no-cache`` (the CLI, a fresh process:
  start-up, manifest, fetch, decode, verify, write, fsync, rename), for the
  ``lossless`` and ``int8`` copies of the checkpoint, over the HTTP data
  plane (the default) and, with ``--grpc``, over gRPC (``--transport grpc``,
  the before); ``--no-fsync`` rows: the same pull with ``--no-fsync``
  (nothing synced: compare with ``raw``; the default pull is crash-safe:
  compare with ``raw + fsync``);
* ``load``: ``Client.load_state_dict(REF)`` to a CPU state dict in a fresh
  process (the figure is the call: client set-up + manifest + every tensor;
  interpreter start and ``import torch`` are left out, as any loader pays them);

and prints the medians, each beside the raw one (``x raw`` = raw seconds /
mzstore seconds: above 1 is faster than moving the raw file), the link-bound
ideal (raw bytes / stored bytes), and the targets of issue 14. Server CPU
seconds per stored GB served are measured around every mzstore transfer,
per plane (issue 14, benchmark 2: the HTTP figure is the steady state of a
running server; the first read of each blob in a server process also checks
it against its digest, so one warm-up pull per codec and plane runs before
the timed ones and its cost is printed separately).

Needs root (``ip netns``, ``tc``), nginx and curl; leaves nothing behind
(the namespace, veth and processes are removed, even on Ctrl-C).

Usage::

    sudo .venv/bin/python bench/bench_link.py [--rates 100mbit,1gbit,10gbit] [--runs 3] [--slow-runs 1]
                                              [--size-gb 1.0737] [--grpc] [--no-load] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import cpu_model, cpu_pid, fmt, log, read_address, sha256_file, stop, table
from bench_lossless import make_synthetic

NS = "mzbench-srv"
VETH_HOST, VETH_SRV = "mzb-h", "mzb-s"
HOST_IP, SRV_IP = "10.203.0.1", "10.203.0.2"
GRPC_PORT, HTTP_PORT, NGINX_PORT = 50051, 50052, 8080
CODECS = ("lossless", "int8")
GB = 1e9
#: Issue 14's targets, x raw: (rate, codec) -> minimum.
TARGETS = {("1gbit", "lossless"): 1.45, ("1gbit", "int8"): 2.1, ("10gbit", "lossless"): 1.0, ("10gbit", "int8"): 1.2}
#: Issue 14: server CPU per stored GB served over HTTP.
CPU_TARGET_S_PER_GB = 0.05

NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {ip}:{port};
        root {root};
        {extra}
    }}
}}
"""

LOAD_CHILD = """
import json, sys, time
from mzstore.client import Client
import torch
server, ref, plane = sys.argv[1:4]
start = time.perf_counter()
with Client(server, cache=False, data_plane=plane) as c:
    sd = c.load_state_dict(ref)
    kind = type(c.transport).__name__
seconds = time.perf_counter() - start
n = sum(t.numel() * t.element_size() for t in sd.values())
print(json.dumps({"seconds": seconds, "bytes": n, "transport": kind}))
"""


# --------------------------------------------------------------------------- the link


def sh(*cmd: str, ns: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", NS, *cmd] if ns else list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True)


def teardown_link() -> None:
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "link", "del", VETH_HOST, check=False)


@contextlib.contextmanager
def link() -> Iterator[None]:
    """The server's namespace and the veth pair to it (removed afterwards)."""
    teardown_link()
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_SRV)
        sh("ip", "link", "set", VETH_SRV, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        sh("ip", "addr", "add", f"{SRV_IP}/24", "dev", VETH_SRV, ns=True)
        sh("ip", "link", "set", VETH_SRV, "up", ns=True)
        sh("ip", "link", "set", "lo", "up", ns=True)
        yield
    finally:
        teardown_link()


def rate_bytes(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale / 8
    raise SystemExit(f"--rates: {rate!r} is not like 100mbit or 1gbit")


def limit(rate: str | None) -> None:
    """Rate-limit both ends of the link with tbf (``None``: no limit)."""
    for dev, ns in ((VETH_SRV, True), (VETH_HOST, False)):
        sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
        if rate is None:
            continue
        burst = max(256 * 1024, int(rate_bytes(rate) * 0.004))  # >= rate / HZ, so the rate is reachable
        sh(
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            str(burst),
            "latency",
            "100ms",
            ns=ns,
        )


# --------------------------------------------------------------------------- servers


def mzstore_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("mzstore")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mzstore.cli"]


@dataclass
class Servers:
    grpc: str
    pid: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    nginx: int = 0  # the nginx master's pid (its worker is a child)

    def nginx_cpu(self) -> float:
        """CPU seconds of nginx's master and workers."""
        kids = sh("pgrep", "-P", str(self.nginx), check=False).stdout.split()
        return sum(cpu_pid(int(p)) or 0.0 for p in [self.nginx, *kids])


@contextlib.contextmanager
def servers(work: Path, raw_dir: Path) -> Iterator[Servers]:
    """``mzstore serve`` and nginx in the server's namespace."""
    prefix = work / "nginx"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, ip=SRV_IP, port=NGINX_PORT, root=raw_dir, extra=""))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS, nginx, "-c", str(conf), "-p", str(prefix)]))
        errlog = open(work / "server.log", "wb")
        where = ["--root", str(work / "store"), "--listen", f"{SRV_IP}:{GRPC_PORT}", "--http", f"{SRV_IP}:{HTTP_PORT}"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS, *mzstore_cmd(), "serve", *where], stdout=subprocess.PIPE, stderr=errlog
        )
        procs.append(server)
        address = read_address(server, timeout=60)
        deadline = time.monotonic() + 20
        while sh("curl", "-s", "-o", "/dev/null", f"http://{SRV_IP}:{NGINX_PORT}/", check=False).returncode == 7:
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start")
            time.sleep(0.1)
        yield Servers(address, server.pid, procs, procs[0].pid)
    finally:
        for proc in reversed(procs):
            stop(proc)


# --------------------------------------------------------------------------- measurements


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Sample:
    seconds: float
    stored: int = 0  # stored bytes the server sent
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    transport: str = ""


def run_raw(srv: Servers, out: Path, name: str, fsync: bool = False) -> Sample:
    out.mkdir(parents=True, exist_ok=True)
    start, cpu, nginx = time.perf_counter(), children_cpu(), srv.nginx_cpu()
    sh("curl", "-sf", "-o", str(out / name), f"http://{SRV_IP}:{NGINX_PORT}/{name}")
    if fsync:
        fd = os.open(out / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    sample = Sample(seconds, (out / name).stat().st_size, srv.nginx_cpu() - nginx, children_cpu() - cpu, "nginx")
    shutil.rmtree(out)
    os.sync()  # the deletion (and the discard of its blocks) is not charged to the next timed run
    return sample


def curl_cpu(srv: Servers, url: str, nginx: bool) -> tuple[int, float]:
    """Bytes and server CPU seconds of one ``curl`` of ``url`` to /dev/null (the same client for both servers)."""
    before = srv.nginx_cpu() if nginx else cpu_pid(srv.pid) or 0.0
    size = int(sh("curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url).stdout)
    after = srv.nginx_cpu() if nginx else cpu_pid(srv.pid) or 0.0
    return size, after - before


def run_pull(srv: Servers, ref: str, out: Path, plane: str, check: str | None = None, fsync: bool = True) -> Sample:
    cpu_s, cpu_c = cpu_pid(srv.pid) or 0.0, children_cpu()
    start = time.perf_counter()
    flags = ["-o", str(out), "--no-cache", "--json", "--server", srv.grpc, "--transport", plane]
    flags += [] if fsync else ["--no-fsync"]
    done = sh(*mzstore_cmd(), "pull", ref, *flags)
    seconds = time.perf_counter() - start
    info = json.loads(done.stdout)
    sample = Sample(
        seconds,
        int(info.get("bytes_transferred", 0)),
        (cpu_pid(srv.pid) or 0.0) - cpu_s,
        children_cpu() - cpu_c,
        plane,
    )
    if check is not None and sha256_file(out / "model.safetensors") != check:
        raise RuntimeError(f"{ref}: the pulled file differs from the source")
    shutil.rmtree(out)
    os.sync()  # the deletion (and the discard of its blocks) is not charged to the next timed run
    return sample


def run_load(srv: Servers, ref: str, plane: str, stored: int) -> Sample:
    cpu_s, cpu_c = cpu_pid(srv.pid) or 0.0, children_cpu()
    done = sh(sys.executable, "-c", LOAD_CHILD, srv.grpc, ref, plane)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return Sample(info["seconds"], stored, (cpu_pid(srv.pid) or 0.0) - cpu_s, children_cpu() - cpu_c, info["transport"])


def median(samples: list[Sample], attr: str = "seconds") -> float:
    return statistics.median(getattr(s, attr) for s in samples)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100mbit,1gbit,10gbit", help="comma-separated tc rates")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per rate (medians are printed)")
    ap.add_argument("--slow-runs", type=int, default=1, help="runs at rates below 1gbit (a run takes minutes)")
    ap.add_argument("--size-gb", type=float, default=2**30 / GB, help="checkpoint size (default 1 GiB)")
    ap.add_argument("--grpc", action="store_true", help="also time pulls over gRPC (--transport grpc)")
    ap.add_argument("--no-load", action="store_true", help="skip the load_state_dict timings")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every sample here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_link needs root (ip netns, tc)")
    for tool in ("curl", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_link needs {tool}")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise SystemExit("bench_link needs nginx (apt-get install nginx)")
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for r in rates:
        rate_bytes(r)

    work = Path(tempfile.mkdtemp(prefix="bench-link-", dir=args.work))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, rates, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, rates: list[str], work: Path) -> int:
    raw_dir = work / "raw"
    raw_dir.mkdir()
    src = raw_dir / "model.safetensors"
    log(f"making a {args.size_gb:.2f} GB bf16 checkpoint")
    shape = make_synthetic(src, int(args.size_gb * GB))
    raw_bytes = src.stat().st_size
    raw_sha = sha256_file(src)
    model = work / "model"
    model.mkdir()
    os.link(src, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 32, "num_key_value_heads": 4}))
    out = work / "out"
    samples: dict[str, dict[str, list[Sample]]] = {}
    first: dict[str, Sample] = {}
    same_client: dict[str, list[float]] = {}

    with link(), servers(work, raw_dir) as srv:
        stored: dict[str, int] = {}
        for codec in CODECS:
            log(f"pushing {codec}")
            push = [*mzstore_cmd(), "push", str(model), f"bench/link:{codec}", "--server", srv.grpc, "-q"]
            sh(*push, *(["--codec", codec] if codec != "lossless" else []), ns=True)
        from mzstore.client import Client

        with Client(srv.grpc, cache=False) as c:
            for info in c.refs("bench/link"):
                stored[info.tag] = info.bytes_stored
        planes = ["http", "grpc"] if args.grpc else ["http"]
        for codec in CODECS:  # warm-up: each blob is checked against its digest once per server process
            for plane in planes:
                first[f"{codec}/{plane}"] = run_pull(srv, f"bench/link:{codec}", out, plane)
        biggest = max((work / "store" / "blobs").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
        blob_url = f"http://{SRV_IP}:{HTTP_PORT}/blobs/sha256:{biggest.name}"
        for _ in range(args.runs):  # the same client (curl) of one whole file from each server: CPU per GB
            for who, url in (("nginx", f"http://{SRV_IP}:{NGINX_PORT}/model.safetensors"), ("mzstore", blob_url)):
                size, cpu = curl_cpu(srv, url, who == "nginx")
                same_client.setdefault(who, []).append(cpu / (size / GB))
        for rate in rates:
            limit(rate)
            runs = args.runs if rate_bytes(rate) >= 1e9 / 8 else args.slow_runs
            per: dict[str, list[Sample]] = samples.setdefault(rate, {})
            for i in range(runs):
                log(f"{rate}: run {i + 1}/{runs}")
                per.setdefault("raw", []).append(run_raw(srv, out, "model.safetensors"))
                per.setdefault("raw + fsync", []).append(run_raw(srv, out, "model.safetensors", fsync=True))
                for codec in CODECS:
                    for plane in planes:
                        check = raw_sha if codec == "lossless" and i == 0 else None
                        s = run_pull(srv, f"bench/link:{codec}", out, plane, check)
                        per.setdefault(f"pull {codec} {plane}", []).append(s)
                    s = run_pull(srv, f"bench/link:{codec}", out, "http", fsync=False)
                    per.setdefault(f"pull {codec} http --no-fsync", []).append(s)
                    if not args.no_load:
                        s = run_load(srv, f"bench/link:{codec}", "auto", stored[codec])
                        per.setdefault(f"load {codec} {s.transport.replace('Transport', '').lower()}", []).append(s)
        limit(None)

    print()
    print(f"# bench_link: {raw_bytes / GB:.3f} GB bf16 checkpoint ({shape['layers']} layers), {cpu_model()}")
    print(f"# {os.cpu_count()} CPUs; server in netns {NS} behind veth + tc tbf; medians of --runs")
    print(f"# stored: lossless {stored['lossless'] / raw_bytes:.3f}, int8 {stored['int8'] / raw_bytes:.3f} of raw")
    rows: list[list[str]] = []
    target_rows: list[list[str]] = []
    for rate, per in samples.items():
        raw_s = median(per["raw"])
        nginx_gb = median(per["raw"], "server_cpu") / (raw_bytes / GB)
        client_raw = fmt(median(per["raw"], "client_cpu"), ".2f")
        rows.append(
            [
                rate,
                "raw (curl from nginx)",
                str(len(per["raw"])),
                fmt(raw_s, ".2f"),
                "1.00",
                "",
                fmt(nginx_gb, ".3f"),
                client_raw,
            ]
        )
        synced_s = median(per["raw + fsync"])
        rows.append(
            [
                rate,
                "raw + fsync",
                str(len(per["raw + fsync"])),
                fmt(synced_s, ".2f"),
                fmt(raw_s / synced_s, ".2f"),
                "",
                fmt(median(per["raw + fsync"], "server_cpu") / (raw_bytes / GB), ".3f"),
                fmt(median(per["raw + fsync"], "client_cpu"), ".2f"),
            ]
        )
        for what, ss in per.items():
            if what.startswith("raw"):
                continue
            codec = what.split()[1]
            sec = median(ss)
            ratio = raw_s / sec
            ideal = raw_bytes / stored[codec]
            cpu_gb = median(ss, "server_cpu") / (stored[codec] / GB)
            rows.append(
                [
                    rate,
                    what,
                    str(len(ss)),
                    fmt(sec, ".2f"),
                    fmt(ratio, ".2f"),
                    fmt(ideal, ".2f"),
                    fmt(cpu_gb, ".3f"),
                    fmt(median(ss, "client_cpu"), ".2f"),
                ]
            )
            want = TARGETS.get((rate, codec))
            if want is not None and what.startswith("pull") and what.endswith("http"):
                verdict = "met" if ratio >= want else "missed"
                target_rows.append([f"{rate} {codec} pull", f">= {want:.2f}x raw", f"{ratio:.2f}x", verdict])
                synced = synced_s / sec  # both crash-safe
                verdict = "met" if synced >= want else "missed"
                target_rows.append(
                    [f"{rate} {codec} pull (fsync)", f">= {want:.2f}x raw + fsync", f"{synced:.2f}x", verdict]
                )
            if want is not None and what.endswith("--no-fsync"):
                verdict = "met" if ratio >= want else "missed"
                target_rows.append([f"{rate} {codec} pull --no-fsync", f">= {want:.2f}x raw", f"{ratio:.2f}x", verdict])
    print(
        table(
            "time to weights over the link",
            ["link", "what", "n", "seconds", "x raw", "ideal", "server CPU s/GB", "client CPU s"],
            rows,
        )
    )
    warm_rows = [
        [key, fmt(s.seconds, ".2f"), fmt(s.server_cpu / (stored[key.split("/")[0]] / GB), ".3f")]
        for key, s in first.items()
    ]
    title = "first pull per server process (no link limit; blobs checked against their digests)"
    print(table(title, ["codec/plane", "seconds", "server CPU s/GB"], warm_rows))
    print(
        table(
            "server CPU per GB sent, the same client (curl of one whole file, no link limit), median",
            ["server", "runs", "CPU s/GB"],
            [[who, str(len(v)), fmt(statistics.median(v), ".3f")] for who, v in same_client.items()],
        )
    )
    http_cpu = [
        median(ss, "server_cpu") / (stored[w.split()[1]] / GB)
        for per in samples.values()
        for w, ss in per.items()
        if w.startswith("pull") and "http" in w
    ]
    if http_cpu:
        worst = max(http_cpu)
        verdict = "met" if worst <= CPU_TARGET_S_PER_GB else "missed"
        target_rows.append(
            ["server CPU / stored GB, pulls (HTTP)", f"<= {CPU_TARGET_S_PER_GB}", f"{worst:.3f}", verdict]
        )
    if "mzstore" in same_client:
        mine, nginx = statistics.median(same_client["mzstore"]), statistics.median(same_client.get("nginx", [0.0]))
        verdict = "met" if mine <= CPU_TARGET_S_PER_GB else "missed"
        figure = f"{mine:.3f} (nginx {nginx:.3f})"
        target_rows.append(["server CPU / GB, one curl (HTTP)", f"<= {CPU_TARGET_S_PER_GB}", figure, verdict])
    print(table("issue 14 targets", ["figure", "target", "measured", ""], target_rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "raw_bytes": raw_bytes,
                    "stored": stored,
                    "samples": {r: {w: [vars(s) for s in ss] for w, ss in per.items()} for r, per in samples.items()},
                    "first": {k: vars(s) for k, s in first.items()},
                    "same_client_cpu_s_per_gb": same_client,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
