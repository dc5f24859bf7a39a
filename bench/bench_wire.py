"""What a push's data messages cost on the wire: protobuf message objects against the in-place encoding.

A push sends its bytes in ``FileData`` messages (``PushRequest``/``UploadRequest``).
This streams ``--gib`` GiB of 1 MiB data messages over one gRPC call to a server in
another process that only counts them, two ways:

* ``protobuf``: the client builds ``PushRequest(data=FileData(...))`` and gRPC serializes
  it; the server's generated handler parses it and reads ``.data`` (what mzstore did);
* ``in place``: the client writes the encoding with :func:`mzstore.transport.wire.file_data`
  and the server reads it with :func:`~mzstore.transport.wire.push_request`, the data a
  view into the received message (what mzstore does).

Each client message is built from a fresh ``bytes`` read of the data, as a push reads its
file. It prints the median wall time and CPU seconds of each side per GiB over ``--runs``
rounds, and the ratio of the two ways' total CPU.

    .venv/bin/python bench/bench_wire.py [--gib 1] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from _common import cpu_pid, cpu_self

from mzstore.transport.wire import FileDataMessage, file_data, push_request
from mzstore.v1 import store_pb2 as pb

MESSAGE = 1 << 20
PATHS = {"protobuf": "/bench.Wire/Protobuf", "in place": "/bench.Wire/InPlace"}


def _count(requests: Iterator[pb.PushRequest | FileDataMessage], context: grpc.ServicerContext) -> pb.PushResponse:
    n = 0
    for req in requests:
        n += len(req.data) if isinstance(req, FileDataMessage) else len(req.data.data)
    return pb.PushResponse(bytes_raw=n)


def _serve(ready_fd: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 8 * MESSAGE)])
    handlers = {
        "Protobuf": grpc.stream_unary_rpc_method_handler(
            _count, pb.PushRequest.FromString, pb.PushResponse.SerializeToString
        ),
        "InPlace": grpc.stream_unary_rpc_method_handler(_count, push_request, pb.PushResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Wire", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    os.write(ready_fd, str(port).encode())
    server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="GiB per round (default 1)")
    ap.add_argument("--runs", type=int, default=5, help="rounds; medians are reported (default 5)")
    args = ap.parse_args()
    count = max(1, int(args.gib * 1024))
    block = os.urandom(MESSAGE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _serve(w)
        finally:
            os._exit(0)
    os.close(w)
    port = int(os.read(r, 32))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * MESSAGE)])

    def protobuf() -> Iterator[pb.PushRequest]:
        for i in range(count):
            data = bytes(memoryview(block))  # a fresh read
            yield pb.PushRequest(data=pb.FileData(file=0, offset=i * MESSAGE, data=data))

    def in_place() -> Iterator[bytes]:
        for i in range(count):
            yield file_data(0, i * MESSAGE, bytes(memoryview(block)))

    calls = {
        "protobuf": (
            channel.stream_unary(
                PATHS["protobuf"],
                request_serializer=pb.PushRequest.SerializeToString,
                response_deserializer=pb.PushResponse.FromString,
            ),
            protobuf,
        ),
        "in place": (
            channel.stream_unary(PATHS["in place"], response_deserializer=pb.PushResponse.FromString),
            in_place,
        ),
    }
    results: dict[str, list[tuple[float, float, float]]] = {way: [] for way in calls}
    try:
        for call, messages in calls.values():  # one warm-up round each
            assert call(messages(), timeout=600).bytes_raw == count * MESSAGE
        for _ in range(args.runs):
            for way, (call, messages) in calls.items():
                c0, s0, t0 = cpu_self(), cpu_pid(pid), time.perf_counter()
                reply = call(messages(), timeout=600)
                wall = time.perf_counter() - t0
                c1, s1 = cpu_self(), cpu_pid(pid)
                assert reply.bytes_raw == count * MESSAGE
                assert s0 is not None and s1 is not None
                results[way].append((wall, c1 - c0, s1 - s0))
    finally:
        channel.close()
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    gib = count * MESSAGE / 2**30
    print(f"{gib:.2f} GiB in 1 MiB data messages over one gRPC stream, loopback, medians of {args.runs}")
    print(f"  {'':<10} {'wall s':>7} {'client CPU-s/GiB':>17} {'server CPU-s/GiB':>17} {'total':>6}")
    totals = {}
    for way, rows in results.items():
        wall, client, server = (statistics.median(x[i] for x in rows) for i in range(3))
        totals[way] = statistics.median((x[1] + x[2]) / gib for x in rows)
        print(f"  {way:<10} {wall:7.2f} {client / gib:17.2f} {server / gib:17.2f} {totals[way]:6.2f}")
    print(f"  in place / protobuf, total CPU: x{totals['in place'] / totals['protobuf']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
