"""An asyncio TCP fault proxy for tests: client → proxy → server, misbehaving on demand.

How it works: :class:`FaultProxy` runs an asyncio loop in a daemon thread,
listens on a free loopback port and, for every accepted connection, opens
one to the target and runs two pumps (one per direction) that read up to
16 KiB, apply the knobs and write it on. The knobs are plain attributes,
read by the pumps before every chunk, so a test can change them at any time
from its own thread:

* ``latency_s``: a delay before each chunk is forwarded;
* ``bandwidth``: bytes/s in each direction (``None``: unlimited);
* ``blackhole``: stop reading and forwarding, keep the sockets open (TCP
  flow control then stalls both peers: nothing fails, nothing moves);
* ``byte_limit``: forward at most this many bytes (both directions, all
  connections, counted in ``forwarded``), then reset every connection, and
  reset new ones as soon as they are accepted, until the limit is raised.

Actions: :meth:`reset` closes every connection abruptly now (RST, by
``SO_LINGER`` 0, as a crashed peer or a middlebox would), :meth:`reset_after`
does it once when ``n`` more bytes have been forwarded (with
``graceful=True`` it closes them with a FIN instead, as a server that stops
early or an idle-timeout middlebox does: the client sees a body cut short),
:meth:`heal` puts every knob back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Any

CHUNK = 16 * 1024


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy to ``target_port`` on loopback with runtime fault knobs (see the module docstring)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.latency_s = 0.0
        self.bandwidth: int | None = None
        self.blackhole = False
        self.byte_limit: int | None = None
        self.forwarded = 0  # bytes written on, both directions
        self.resets = 0  # times connections were reset
        self.port = 0
        self._reset_at: int | None = None
        self._graceful = False
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def reset(self) -> None:
        """Reset every open connection now."""
        self._call(self._reset_all())

    def reset_after(self, n: int, graceful: bool = False) -> None:
        """Reset (``graceful``: close) every open connection once ``n`` more bytes have been forwarded."""
        self._reset_at = self.forwarded + n
        self._graceful = graceful

    def heal(self) -> None:
        self.latency_s, self.bandwidth, self.blackhole, self.byte_limit, self._reset_at = 0.0, None, False, None, None

    # -- the loop's side --------------------------------------------------
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reset_all(self, graceful: bool = False) -> None:
        for pair in list(self._conns):
            for writer in pair:
                if graceful:
                    writer.close()  # FIN, after what was written so far
                else:
                    _rst(writer)
        self._conns.clear()
        self.resets += 1

    def _room(self) -> int | None:
        """Bytes that may still be forwarded before a reset, or ``None`` for no limit."""
        marks = [m for m in (self.byte_limit, self._reset_at) if m is not None]
        return min(marks) - self.forwarded if marks else None

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        room = self._room()
        if room is not None and room <= 0 and self.byte_limit is not None:
            _rst(c_writer)
            return
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _rst(c_writer)
            return
        pair = (c_writer, s_writer)
        self._conns.add(pair)
        pumps = [
            asyncio.ensure_future(self._pump(c_reader, s_writer)),
            asyncio.ensure_future(self._pump(s_reader, c_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            if pair in self._conns:  # ended by a peer: pass a reset on as a reset, a close as a close
                self._conns.discard(pair)
                for writer in pair:
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                while self.blackhole:
                    await asyncio.sleep(0.02)
                data = await reader.read(CHUNK)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                while self.blackhole:
                    await asyncio.sleep(0.02)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                room = self._room()
                if room is not None and len(data) >= room:
                    writer.write(data[: max(room, 0)])
                    self.forwarded += max(room, 0)
                    graceful = False
                    if self._reset_at is not None and self.forwarded >= self._reset_at:
                        self._reset_at = None  # one-shot
                        graceful = self._graceful
                    await self._reset_all(graceful)
                    return
                writer.write(data)
                self.forwarded += len(data)
                await writer.drain()
                if self.bandwidth:
                    await asyncio.sleep(len(data) / self.bandwidth)
        except (ConnectionError, OSError):
            for pair in [p for p in self._conns if writer in p]:
                self._conns.discard(pair)
                for w in pair:
                    _rst(w)
