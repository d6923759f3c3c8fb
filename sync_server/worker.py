"""A gunicorn ``gthread`` worker that does not give a thread to a slow client.

Plain ``gthread`` hands a connection to a pool thread as soon as it is accepted, and that
thread then blocks reading the request head: 60 clients that send their headers a byte at a
time hold every thread and ``/v1/health`` times out (issue 14). Here the worker's event
loop reads the request head (and a small body with a declared length, which covers every
device update) without blocking; only a complete request goes to a thread. A connection
that has not delivered it within ``HEAD_TIMEOUT_S`` is closed. Larger bodies (crop batches,
packages, chunked uploads) are read by the thread under a socket timeout (``SO_RCVTIMEO``),
and responses are written under ``SO_SNDTIMEO``, so a client that stops reading or sending
frees its thread. In production put a buffering reverse proxy in front (docs/server.md).

    gunicorn -k infantino.sync_server.worker.GuardedThreadWorker -c python:infantino.sync_server.gunicorn_conf ...
"""
from __future__ import annotations

import errno
import os
import re
import selectors
import socket
import struct
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

HEAD_TIMEOUT_S = float(os.environ.get("INFANTINO_HEAD_TIMEOUT_S", "10"))  # whole head (+ small body) from accept
IO_TIMEOUT_S = float(os.environ.get("INFANTINO_IO_TIMEOUT_S", "30"))  # one stalled read or write in a thread
BUFFER_BODY_BYTES = 256 * 1024  # bodies up to this size (declared) are read by the event loop (an update is ~20 KB)
MAX_HEAD_BYTES = 64 * 1024

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n", re.I)
_NO_BUFFER = re.compile(rb"\r\n(?:transfer-encoding:[^\r]*chunked|expect:[ \t]*100-continue)", re.I)


def request_ready(buf: bytes) -> bool:
    """Whether ``buf`` holds a whole request head, plus its body when that is small and declared."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return len(buf) > MAX_HEAD_BYTES  # oversized: let gunicorn's parser refuse it
    head = buf[:end + 2]
    if _NO_BUFFER.search(head):
        return True
    match = _LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    return length > BUFFER_BODY_BYTES or len(buf) >= end + 4 + length


def _io_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel-level read/write timeouts: they hold in blocking mode, which gunicorn's threads use."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class GuardedThreadWorker(ThreadWorker):
    """``gthread`` with the request head read by the event loop (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reading: deque = deque()  # (deadline, conn) of connections whose request is not complete

    def _guarded(self) -> bool:
        return not self.cfg.is_ssl  # TLS is the proxy's job; a TLS socket keeps gunicorn's own path

    def accept(self, listener):
        if not self._guarded():
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        _io_timeouts(client_sock, IO_TIMEOUT_S)
        self._read_head(TConn(self.cfg, client_sock, client_addr, listener.getsockname()), b"")

    def on_client_socket_readable(self, conn, client):
        """A keep-alive connection woke up: read its next request head in the loop too."""
        if not self._guarded():
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn, conn.parser.unreader.take_buffered() if conn.parser is not None else b"")

    def finish_request(self, conn, fs):
        """A kept-alive connection whose next request is already buffered (pipelined) goes on at once:
        its socket will not become readable for it."""
        super().finish_request(conn, fs)
        parser = getattr(conn, "parser", None)
        if (self._guarded() and parser is not None and hasattr(parser, "unreader")
                and parser.unreader.buf.getbuffer().nbytes and conn in self.keepalived_conns):
            self.on_client_socket_readable(conn, conn.sock)

    def _read_head(self, conn, pending: bytes) -> None:
        conn.infantino_buf = bytearray(pending)
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + HEAD_TIMEOUT_S
        self.reading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_data, conn))
        if pending and request_ready(bytes(pending)):
            self._on_head_data(conn, conn.sock, recv=False)

    def _on_head_data(self, conn, client, recv: bool = True) -> None:
        if recv:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                return
            conn.infantino_buf += data
        if request_ready(bytes(conn.infantino_buf)):
            self.poller.unregister(conn.sock)
            self.reading.remove(conn)
            conn.data_ready = True  # gunicorn must not wait for data again in the thread
            self.enqueue_req(conn)

    def _drop(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        if conn in self.reading:
            self.reading.remove(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """Also close connections that did not send a whole request head in time."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.reading if c.timeout <= now]:
            self._drop(conn)

    def handle(self, conn):
        buf = getattr(conn, "infantino_buf", None)
        if buf is not None:
            conn.infantino_buf = None
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(buf))
        return super().handle(conn)
