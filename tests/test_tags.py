"""Tags that converge (issue 16): versioned ref objects, highest version wins, read repair, tombstones.

The race the issue reported is run for real: two gRPC servers over the same
local nodes, six clients pushing different models to one tag at once, half
through each server, round after round. Node outages are real refused
connections: the S3 node (moto on loopback) sits behind a TCP fault proxy
that resets every connection while the node is "down". The merge rule itself
is checked by a property test over real local nodes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faultproxy import FaultProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3 import moto_server, s3_bucket_url, s3_client, s3_env  # noqa: F401
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import FormatError, MzstoreError, NotFound, Unavailable
from mzstore.format.refs import RefValue, RefVersion, newest
from mzstore.server.app import build_server
from mzstore.settings import Settings
from mzstore.storage import Store, open_node
from mzstore.storage.admin import fsck, gc
from mzstore.storage.node import LocalNode, Node
from mzstore.storage.store import ref_key
from mzstore.storage.tags import HybridClock, offer

SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=256 * 1024)
DIGESTS = [f"sha256:{i:064x}" for i in range(1, 9)]


def _model(root: Path, seed: int) -> Path:
    path = root / f"m{seed}" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(64, 64, generator=gen), "b": torch.full((64,), float(seed))}, str(path))
    return path


def _raw(node: Node, key: str) -> bytes | None:
    try:
        return node.read(key)
    except NotFound:
        return None


# --- the value format -----------------------------------------------------------


def test_versioned_values_round_trip_and_old_refs_read_as_version_zero() -> None:
    value = RefValue(DIGESTS[0], RefVersion(1733420000123, 4, "abc123"))
    assert RefValue.decode(value.encode()) == value
    tomb = RefValue(None, RefVersion(5, 0, "w"))
    assert RefValue.decode(tomb.encode()).deleted
    legacy = RefValue.decode(f"{DIGESTS[1]}\n".encode())
    assert legacy == RefValue(DIGESTS[1], RefVersion())
    assert tomb.newer_than(legacy) and value.newer_than(tomb) and not legacy.newer_than(value)
    assert newest([legacy, None, value, tomb]) == value
    for bad in (
        b"",
        b"sha256:xyz",
        b'{"digest":"sha256:00","version":[1,0,"w"]}',
        b'{"digest":null,"version":[-1,0,"w"]}',
        b'{"digest":null,"version":[1.5,0,"w"]}',
        b'{"digest":null,"version":[1,0,"a/../b"]}',
        b'{"digest":null}',
        b"\xff\xfe",
    ):
        with pytest.raises(FormatError):
            RefValue.decode(bad)


def test_the_clock_never_falls_behind_what_it_saw() -> None:
    now = [100.0]
    clock = HybridClock("w1", now=lambda: now[0])
    a = clock.tick()
    b = clock.tick()
    assert b > a and b.time_ms == a.time_ms and b.counter == a.counter + 1
    clock.observe(RefVersion(500_000, 7, "zz"))  # a server whose clock runs 400 s ahead wrote this
    c = clock.tick()
    assert (c.time_ms, c.counter) > (500_000, 7)
    now[0] = 1000.0
    assert clock.tick() == RefVersion(1_000_000, 0, "w1")


# --- conditional writes on each kind of node --------------------------------------


def test_a_local_node_never_replaces_a_newer_value_under_concurrent_writers(tmp_path: Path) -> None:
    """Sixteen threads offer values in random order; the node ends on the newest (the lock makes each step atomic)."""
    node = LocalNode(tmp_path / "n")
    values = [RefValue(DIGESTS[i % 8], RefVersion(1000 + i, 0, "w")) for i in range(64)]
    order = list(values)
    import random

    random.Random(0).shuffle(order)
    threads = [
        threading.Thread(target=lambda part=order[i::16]: [offer(node, "refs/a/t", v) for v in part]) for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert RefValue.decode(node.read("refs/a/t")) == max(values, key=RefValue.order)


def test_an_s3_node_writes_conditionally(s3_env: str, s3_bucket_url: str) -> None:  # noqa: F811
    node = open_node(s3_bucket_url)
    key = "refs/a/t"
    old, new = RefValue(DIGESTS[0], RefVersion(10, 0, "a")), RefValue(DIGESTS[1], RefVersion(20, 0, "b"))
    assert offer(node, key, old)  # none there: If-None-Match: *
    assert offer(node, key, new)  # If-Match: the ETag of what was read
    assert not offer(node, key, old)  # older: refused, nothing written
    assert RefValue.decode(node.read(key)) == new
    seen: list[bytes | None] = []

    def racing(current: bytes | None) -> bool:
        # Another writer slips a newer value in between this writer's read and its PUT.
        if not seen:
            s3 = s3_client(s3_env)
            bucket, _, prefix = s3_bucket_url[len("s3://") :].partition("/")
            s3.put_object(
                Bucket=bucket, Key=f"{prefix}/{key}", Body=RefValue(DIGESTS[2], RefVersion(30, 0, "c")).encode()
            )
        seen.append(current)
        return current is None or RefValue(DIGESTS[3], RefVersion(25, 0, "d")).newer_than(RefValue.decode(current))

    assert not node.write_if(key, RefValue(DIGESTS[3], RefVersion(25, 0, "d")).encode(), racing)
    assert len(seen) == 2, "the PUT's If-Match failed, so the writer read again and then declined"
    assert RefValue.decode(node.read(key)).digest == DIGESTS[2]


# --- the race of the issue --------------------------------------------------------


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_concurrent_tag_moves_through_two_servers_converge(tmp_path: Path, n_nodes: int) -> None:
    """2 servers x N nodes, 5 rounds of 6 concurrent pushes to one tag.

    After each round every node holds the same ref object; the winner is a push that no other push
    began after (an acknowledged write is never replaced by one acknowledged before it began); and
    deleting the ref on any one node, or losing that node, leaves the tag on the winner.
    """
    nodes = [tmp_path / f"node{i}" for i in range(n_nodes)]
    servers = [build_server(Store([open_node(p) for p in nodes], replicas=2), "127.0.0.1:0", SMALL) for _ in range(2)]
    sources = [_model(tmp_path / "src", seed) for seed in range(30)]
    key = ref_key("race/m", "latest")
    try:
        for round_ in range(5):
            done: list[tuple[float, float, str]] = []
            errors: list[BaseException] = []
            start = threading.Barrier(6)

            def push(
                i: int,
                round_: int = round_,
                start: threading.Barrier = start,
                done: list[tuple[float, float, str]] = done,
                errors: list[BaseException] = errors,
            ) -> None:
                try:
                    with Client(servers[i % 2].address, cache=False) as c:
                        start.wait()
                        began = time.monotonic()
                        info = c.push(sources[round_ * 6 + i], "race/m:latest")
                        done.append((began, time.monotonic(), info.digest))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=push, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            held = [_raw(LocalNode(p), key) for p in nodes]
            assert held[0] is not None and all(h == held[0] for h in held), f"round {round_}: nodes disagree: {held}"
            winner = RefValue.decode(held[0]).digest
            acked = next(ack for _, ack, digest in done if digest == winner)
            assert not [d for began, _, d in done if began > acked], "a push that began after the winner's ack lost"
            assert fsck(Store([open_node(p) for p in nodes], replicas=2)).ok
            for lost in range(n_nodes):
                rest = [open_node(p) for i, p in enumerate(nodes) if i != lost]
                assert Store(rest, replicas=1).get_ref("race/m", "latest") == winner
            (nodes[round_ % n_nodes] / key).unlink()
            for server in servers:
                with Client(server.address, cache=False) as c:
                    assert c.manifest("race/m:latest")[1] == winner
                assert server.store.wait_repairs(30)  # type: ignore[attr-defined]
            assert _raw(LocalNode(nodes[round_ % n_nodes]), key) == held[0], "the read repaired the deleted ref"
    finally:
        for server in servers:
            server.stop(1)


# --- a node that was away ---------------------------------------------------------


@pytest.fixture
def flaky_s3(
    s3_env: str,  # noqa: F811
    s3_bucket_url: str,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[Store, FaultProxy, Node, Node, Any]]:
    """A local node and an S3 node reached through a fault proxy; the proxy takes the S3 node down."""
    proxy = FaultProxy(int(s3_env.rsplit(":", 1)[1])).start()
    local = open_node(tmp_path / "local")
    remote = open_node(s3_bucket_url, endpoint_url=f"http://{proxy.address}")
    store = Store([local, remote], replicas=2)
    server = build_server(store, "127.0.0.1:0", SMALL)
    try:
        yield store, proxy, local, remote, server
    finally:
        server.stop(1)
        proxy.stop()


def _down(proxy: FaultProxy) -> None:
    proxy.byte_limit = proxy.forwarded  # from now on every connection is reset
    proxy.reset()


def test_a_node_that_missed_a_tag_move_is_reported_then_repaired_by_the_next_read(
    flaky_s3: tuple[Store, FaultProxy, Node, Node, Any], tmp_path: Path
) -> None:
    store, proxy, local, remote, server = flaky_s3
    with Client(server.address, cache=False) as c:
        v1 = c.push(_model(tmp_path, 1), "away/m:v1").digest
        v2 = c.push(_model(tmp_path, 2), "away/m:v2").digest
        c.tag("away/m:v1", "away/m:latest")
        _down(proxy)
        with pytest.raises(MzstoreError):  # every node must take a tag move: this one is not acknowledged
            c.tag("away/m:v2", "away/m:latest")
        proxy.heal()
        key = ref_key("away/m", "latest")
        assert RefValue.decode(_raw(remote, key) or b"").digest == v1, "the node that was away kept the old ref"
        report = fsck(Store([local, remote], replicas=2))
        assert not report.ok and [d for d in report.diverged if d.startswith("away/m:latest")]
        assert c.manifest("away/m:latest")[1] == v2  # the highest version wins...
        assert store.wait_repairs(30)
        assert RefValue.decode(_raw(remote, key) or b"").digest == v2  # ...and the read repaired the node
        assert fsck(Store([local, remote], replicas=2)).ok


def test_a_tag_removed_while_a_node_was_down_stays_removed(
    flaky_s3: tuple[Store, FaultProxy, Node, Node, Any], tmp_path: Path
) -> None:
    store, proxy, local, remote, server = flaky_s3
    with Client(server.address, cache=False) as c:
        c.push(_model(tmp_path, 3), "gone/m:v1")
        _down(proxy)
        with pytest.raises(MzstoreError):
            c.rm("gone/m:v1")
        proxy.heal()
        key = ref_key("gone/m", "v1")
        assert not RefValue.decode(_raw(remote, key) or b"").deleted, "the node that was down still has the tag"
        with pytest.raises(NotFound):
            c.manifest("gone/m:v1")
        assert ("gone/m", "v1") not in [(n, t) for n, t, _ in c.ls()]
        assert store.wait_repairs(30)
        assert RefValue.decode(_raw(remote, key) or b"").deleted, "the read gave the node the tombstone"
        # gc removes the tombstone once every node agrees and the grace period is over, not before.
        assert not [d for d in gc(store, grace_s=3600).deleted if "tombstone" in d]
        swept = gc(store, grace_s=0, now=time.time() + 1)
        assert len([d for d in swept.deleted if "tombstone" in d]) == 2
        assert _raw(local, key) is None and _raw(remote, key) is None


def test_gc_keeps_a_tombstone_a_node_disagrees_with(tmp_path: Path) -> None:
    a, b = LocalNode(tmp_path / "a"), LocalNode(tmp_path / "b")
    key = ref_key("x/m", "v1")
    a.write(key, [RefValue(None, RefVersion(1000, 0, "w")).encode()])
    b.write(key, [RefValue(DIGESTS[0], RefVersion(900, 0, "w")).encode()])
    store = Store([a, b])
    assert not gc(store, grace_s=0, now=time.time()).deleted
    assert RefValue.decode(a.read(key)).deleted


def test_old_refs_are_read_and_superseded(tmp_path: Path) -> None:
    """A store written before versions: bare digests are version zero, and any tag write beats them."""
    a, b = LocalNode(tmp_path / "a"), LocalNode(tmp_path / "b")
    src = _model(tmp_path, 4)
    server = build_server(Store([a, b]), "127.0.0.1:0", SMALL)
    try:
        with Client(server.address, cache=False) as c:
            digest = c.push(src, "old/m:v1").digest
            other = c.push(_model(tmp_path, 5), "old/m:v2").digest
            for node in (a, b):
                node.write(ref_key("old/m", "v1"), [f"{digest}\n".encode()])
            assert c.manifest("old/m:v1")[1] == digest
            b.write(ref_key("old/m", "v1"), [f"{other}\n".encode()])  # two old refs that disagree: a tie
            report = fsck(Store([a, b]))
            assert not report.ok and len(report.diverged) == 1
            c.tag("old/m:v2", "old/m:v1")
            assert all(RefValue.decode(n.read(ref_key("old/m", "v1"))).digest == other for n in (a, b))
            assert fsck(Store([a, b])).ok
    finally:
        server.stop(1)


def test_fsck_reports_and_repairs_from_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    a, b = LocalNode(tmp_path / "a"), LocalNode(tmp_path / "b")
    store = Store([a, b])
    server = build_server(store, "127.0.0.1:0", SMALL)
    try:
        with Client(server.address, cache=False) as c:
            c.push(_model(tmp_path, 6), "cli/m:v1")
            second = c.push(_model(tmp_path, 7), "cli/m:v2").digest
            c.tag("cli/m:v2", "cli/m:v1")
    finally:
        server.stop(1)
    key = ref_key("cli/m", "v1")
    assert RefValue.decode(a.read(key)).digest == second
    b.write(key, [RefValue(DIGESTS[0], RefVersion(1, 0, "old")).encode()])  # a node that missed the move
    flags = ["--node", f"file://{a.root}", "--node", f"file://{b.root}"]

    def mz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mzstore.cli", *args], capture_output=True, text=True, timeout=120)

    found = mz("fsck", *flags, "--json")
    assert found.returncode == 1
    assert [d for d in json.loads(found.stdout)["diverged"] if d.startswith("cli/m:v1")]
    fixed = mz("fsck", *flags, "--repair")
    assert fixed.returncode == 0, fixed.stderr
    assert "tag cli/m:v1" in fixed.stdout
    assert mz("fsck", *flags).returncode == 0
    assert a.read(key) == b.read(key)


# --- the merge rule, as a property ---------------------------------------------------


class Switchable:
    """A local node that can be switched off: every call then fails as an unreachable node does."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.url = node.url
        self.up = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.node, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.up:
                raise Unavailable(f"{self.url} is down")
            return attr(*args, **kwargs)

        return call


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "delete", "read", "late"]),
        st.integers(0, 2),  # which server
        st.integers(0, len(DIGESTS) - 1),
        st.sets(st.integers(0, 2), max_size=2),  # nodes down during the operation
        st.floats(-5, 5),  # how far the server's clock is off (seconds)
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_any_interleaving_of_writes_and_failures_converges_to_the_highest_acknowledged_version(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, set[int], float]]
) -> None:
    base = tmp_path_factory.mktemp("prop")
    nodes = [Switchable(LocalNode(base / f"n{i}")) for i in range(3)]
    now = [1000.0]
    stores = []
    for i in range(3):
        store = Store(nodes, replicas=1)  # type: ignore[arg-type]
        store.clock = HybridClock(f"s{i}", now=lambda i=i: now[0] + skew[i])
        stores.append(store)
    skew = [0.0, 0.0, 0.0]
    key = ref_key("p/m", "t")
    ever: list[RefValue] = []  # every value any node has held
    acknowledged: list[RefValue] = []
    for op, who, d, down, off in ops:
        now[0] += 0.0005  # half a millisecond: same-millisecond writes happen
        skew[who] = off
        for i, n in enumerate(nodes):
            n.up = i not in down
        try:
            if op == "write":
                acknowledged.append(stores[who]._write_ref(key, DIGESTS[d]))
            elif op == "delete":
                stores[who].delete_ref("p/m", "t")
                acknowledged.append(RefValue.decode(nodes[0].node.read(key)))
            elif op == "late" and ever:
                # A slow server's write of an older value arrives now, at every node that is up.
                stale = ever[d % len(ever)]
                for n in nodes:
                    if n.up:
                        offer(n, key, stale)  # type: ignore[arg-type]
            else:
                stores[who].ref_value("p/m", "t")
        except MzstoreError:
            pass  # an unacknowledged write may or may not take effect
        for s in stores:
            assert s.wait_repairs(30)
        for n in nodes:
            raw = _raw(n.node, key)
            if raw is not None:
                ever.append(RefValue.decode(raw))
        if len(acknowledged) >= 2:
            assert acknowledged[-1].newer_than(acknowledged[-2]), (
                "a later acknowledged write must win over an earlier one"
            )
    for n in nodes:
        n.up = True
    if not ever:
        return
    try:
        stores[0].ref_value("p/m", "t")
    except NotFound:
        pass
    assert stores[0].wait_repairs(30)
    final = [RefValue.decode(_raw(n.node, key) or b"") for n in nodes]
    assert all(v == final[0] for v in final), "every node holds the same value after one read"
    assert final[0] == newest(ever), "the highest version anyone wrote wins"
    if acknowledged:
        assert not acknowledged[-1].newer_than(final[0]), "the last acknowledged write is never rolled back"
