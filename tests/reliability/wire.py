"""A plain-socket SMTP client for hostile input: it sends exactly the bytes it is given."""

from __future__ import annotations

import re
import socket

REPLY_LINE = re.compile(rb"^[2-5][0-9]{2}([ -].*)?$")


class Wire:
    """One SMTP session over a raw socket; ``reply`` reads one (multi-line) reply."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self._buffer = b""
        self.greeting = self.reply()

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def reply(self) -> bytes:
        """The next complete reply (every line), or b"" when the relay closed."""
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self._buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b"\r\n".join(lines)
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            assert REPLY_LINE.match(line), line
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
