"""DATA as a stream: the bytes after 354, piece by piece, into the message the spool keeps.

Pure (bytes in, bytes out), so the front door can write each piece to the spool's file as it
arrives and never hold a message in memory (as Postfix's cleanup writes the queue file while
smtpd reads). On the stream it finds the end of data (only ``<CRLF>.<CRLF>``, RFC 5321
§4.1.1.4), removes dot-stuffing (§4.5.2), enforces the size and line-length limits, counts
``Received:`` headers for loop detection, and turns bare CR and bare LF into CRLF, so only
CRLF ever leaves the relay and no SMTP-smuggling variant (``<LF>.<LF>``, ``<CR>.<CR>``,
``<LF>.<CRLF>`` ...) ends a message early: they stay inside the one message, where the
next hop sees an ordinary, dot-stuffed line.

Memory per session: the piece being decoded (at most the read size, 64 KiB), a copy of it
while it is rewritten, and a few bytes of carry.
"""

from __future__ import annotations

import re

END = b"\r\n.\r\n"
LINE_MAX = 998  # RFC 5322 §2.1.1, CRLF not counted
_NEWLINES = re.compile(rb"\r\n|\r|\n")
_RECEIVED = re.compile(rb"(?im)^received:")


class BodyDecoder:
    """Feed it what the client sends after 354; it returns what to store."""

    def __init__(self, *, size_limit: int | None, line_limit: int = LINE_MAX) -> None:
        self._size_limit = size_limit
        self._line_limit = line_limit
        self._carry = b"\r\n"  # the CRLF that ended DATA's line: ".\r\n" at once is an end
        self._first = True
        self._line_start = False
        self._line = 0  # octets of the current line so far
        self._head = b""  # the partial header line, while in the header
        self.in_header = True
        self.hops = 0
        self.size = 0
        self.bare_newlines = 0
        self.too_big = False
        self.too_long = False
        self.done = False

    @property
    def refused(self) -> bool:
        return self.too_big or self.too_long

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Returns (message bytes to store, bytes after the end of data: the next command)."""
        buffer = self._carry + chunk
        end = buffer.find(END)
        if end >= 0:
            self.done = True
            self._carry = b""
            return self._decode(buffer[: end + 2]), buffer[end + len(END) :]
        cut = len(buffer) - (len(END) - 1)  # an end mark may begin in the last 4 octets
        if cut > 0 and buffer[cut - 1 : cut] == b"\r":
            cut -= 1  # never split a CRLF
        if cut <= 0:
            self._carry = buffer
            return b"", b""
        self._carry = buffer[cut:]
        return self._decode(buffer[:cut]), b""

    def _decode(self, piece: bytes) -> bytes:
        at_line_start, self._line_start = self._line_start, piece.endswith(b"\r\n")
        if at_line_start and piece[:1] == b".":
            piece = piece[1:]
        piece = piece.replace(b"\r\n.", b"\r\n")
        if self._first:
            piece = piece[2:]  # the carried CRLF of the DATA line
            self._first = False
        if not piece:
            return b""
        crlf = piece.count(b"\r\n")
        if piece.count(b"\n") != crlf or piece.count(b"\r") != crlf:
            piece, found = _NEWLINES.subn(b"\r\n", piece)
            self.bare_newlines += found - crlf
        self._check_lines(piece)
        if self.in_header:
            self._scan_header(piece)
        self.size += len(piece)
        if self._size_limit is not None and self.size > self._size_limit:
            self.too_big = True
        return b"" if self.refused else piece

    def _check_lines(self, piece: bytes) -> None:
        """Whether any line is over the limit, by jumps of a line limit (C-speed searches,
        about two per ``line_limit`` octets): a window of ``limit + 2`` octets from a line's
        start must hold its LF, and the last LF in it is where the next check starts."""
        limit = self._line_limit
        first = piece.find(b"\n")
        if first < 0:
            self._line += len(piece)
        else:
            if self._line + first - 1 > limit:
                self.too_long = True
            start, size = first + 1, len(piece)
            while size - start > limit + 1:
                newline = piece.rfind(b"\n", start, start + limit + 2)
                if newline < 0:
                    self.too_long = True
                    break
                start = newline + 1
            self._line = size - piece.rfind(b"\n") - 1
        if self._line > limit:
            self.too_long = True

    def _scan_header(self, piece: bytes) -> None:
        text = self._head + piece
        if text.startswith(b"\r\n"):
            end = 0
        else:
            found = text.find(b"\r\n\r\n")
            end = -1 if found < 0 else found + 2
        if end >= 0:
            self.in_header = False
            self._head = b""
            self.hops += len(_RECEIVED.findall(text, 0, end))
            return
        last = text.rfind(b"\r\n")
        self.hops += len(_RECEIVED.findall(text, 0, last + 2)) if last >= 0 else 0
        self._head = (text[last + 2 :] if last >= 0 else text)[-(self._line_limit + 2) :]
