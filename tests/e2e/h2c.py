"""A small HTTP/2 (h2c, prior knowledge) client on the ``h2`` library, for request shapes that
``requests`` cannot send: bodies in many DATA frames, an empty last DATA frame, trailers,
and a stream reset by the client before the answer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)


def request(address: tuple[str, int], method: str, path: str, body: bytes = b"", *,
            headers: list[tuple[str, str]] | None = None, frames: int = 1,
            empty_last_frame: bool = False, trailers: list[tuple[str, str]] | None = None,
            reset: bool = False, reset_when: Callable[[], Any] | None = None,
            timeout: float = 10.0) -> H2Response | None:
    """Send one request over a new h2c connection and return the answer.

    The body goes in ``frames`` DATA frames; the stream then ends with an empty DATA frame
    (``empty_last_frame``), with a HEADERS frame of ``trailers``, or with the last DATA
    frame. With ``reset`` the client resets the stream right after sending and returns None;
    with ``reset_when`` too, once that call returns (it waits for what the test needs first).
    """
    sock = socket.create_connection(address, timeout=timeout)
    try:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", method), (":path", path), (":scheme", "http"),
                                   (":authority", "localhost"), *(headers or [])])
        size = max(1, -(-len(body) // max(frames, 1)))
        pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
        ends_with_data = not (empty_last_frame or trailers)
        for n, piece in enumerate(pieces):
            conn.send_data(stream, piece, end_stream=ends_with_data and n == len(pieces) - 1)
        if empty_last_frame:
            conn.send_data(stream, b"", end_stream=True)
        elif trailers:
            conn.send_headers(stream, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        if reset:
            if reset_when is not None:
                reset_when()
            conn.reset_stream(stream)
            sock.sendall(conn.data_to_send())
            return None
        return _read_answer(sock, conn, stream)
    finally:
        sock.close()


def _read_answer(sock: socket.socket, conn: h2.connection.H2Connection, stream: int) -> H2Response:
    status, headers, trailers, body = 0, {}, {}, bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before the answer ended")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                headers = dict(event.headers)
                status = int(headers.pop(":status"))
            elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream:
                trailers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                raise ConnectionError(f"stream reset by the server (error {event.error_code})")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                return H2Response(status, headers, bytes(body), trailers)
        sock.sendall(conn.data_to_send())
