"""Work on a list in chunks, split over this process and one forked child, results in order.

For a command that reads many small files and formats them (``queue list``): the reads
are system calls and the formatting is Python, both CPU-bound in one process, so on a
machine with two cores a second process halves the wall time. The child takes every other
chunk and sends its output through a pipe; the parent computes its own chunks and yields
both in the list's order, so the caller writes one stream, as it would alone.

The work on a chunk yields its output in pieces, each saying how many of the chunk's items
it has consumed so far. Memory stays bounded by a piece, whatever a chunk's output: the
pipe holds at most ``_PIPE`` octets and the child waits when it is full. If the child fails
or dies, even in the middle of a chunk, the parent does the rest of that chunk (from the
first item not consumed) and of the child's chunks itself: the output is the same, only
slower.
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False  # typing itself costs `queue list` ~5 ms of start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator, Sequence
    from typing import TypeVar

    T = TypeVar("T")
    # a chunk -> its output in pieces: (octets, a count, items of the chunk consumed so far)
    Work = Callable[[Sequence[T]], Iterator[tuple[bytes, int, int]]]
_HEADER = 13  # payload length, count, items consumed (4 octets each), last piece of its chunk
_PIPE = 1 << 20  # the child may run this far ahead of the parent's writes


def processors() -> int:
    """How many processors this process may use (its container's CPU limit included)."""
    from smtprelay.cpus import available_cpus  # only a large queue forks: no cost otherwise

    return available_cpus()


def ordered(
    items: Sequence[T], work: Work[T], *, size: int, fork: bool
) -> Generator[tuple[bytes, int], None, None]:
    """The output and count of each piece of ``work`` on each chunk of ``size`` items, in
    order; with ``fork``, every other chunk is done by a child process."""
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    if not fork or len(chunks) < 2:
        for chunk in chunks:
            yield from _done_here(work, chunk)
        return
    read_end, write_end = os.pipe()
    try:  # noqa: SIM105 -- no contextlib: ~1 ms of start-up
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE)
    except OSError:
        pass  # a smaller pipe only means more waiting
    pid = os.fork()
    if pid == 0:  # the child: odd chunks, then exit without the parent's cleanup
        os.close(read_end)
        code = 1
        try:
            for chunk in chunks[1::2]:
                _send(write_end, work(chunk))
            code = 0
        finally:
            os._exit(code)  # also on BaseException (SIGINT, the parent gone: EPIPE)
    os.close(write_end)
    try:
        yield from _merged(chunks, work, read_end)
    finally:
        os.close(read_end)  # a child still writing gets EPIPE and exits
        try:  # noqa: SIM105 -- no contextlib: ~1 ms of start-up
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # reaped already: the caller ignores SIGCHLD


def _done_here(work: Work[T], chunk: Sequence[T]) -> Iterator[tuple[bytes, int]]:
    for payload, count, _ in work(chunk):
        yield payload, count


def _merged(chunks: list[Sequence[T]], work: Work[T], read_end: int) -> Iterator[tuple[bytes, int]]:
    """The parent's chunks done here, the child's read from ``read_end``, in order; once
    the child's output ends short, the rest is done here."""
    alive = True
    for index, chunk in enumerate(chunks):
        consumed = 0
        if index % 2 and alive:
            while (received := _receive(read_end)) is not None:
                payload, count, consumed, last = received
                yield payload, count
                if last:
                    break
            else:
                alive = False  # failed or died: from its first item not consumed, here
            if alive:
                continue
        yield from _done_here(work, chunk[consumed:])


def _send(fd: int, pieces: Iterator[tuple[bytes, int, int]]) -> None:
    """Each piece of one chunk as a frame, the last one marked (one piece held back to
    know which is last)."""
    held: tuple[bytes, int, int] | None = None
    for piece in pieces:
        if held is not None:
            _write_all(fd, _frame(*held, last=False))
        held = piece
    _write_all(fd, _frame(*(held or (b"", 0, 0)), last=True))


def _frame(payload: bytes, count: int, consumed: int, *, last: bool) -> bytes:
    header = len(payload).to_bytes(4, "little") + count.to_bytes(4, "little")
    return header + consumed.to_bytes(4, "little") + (b"\1" if last else b"\0") + payload


def _receive(fd: int) -> tuple[bytes, int, int, bool] | None:
    """The next frame from the child, or None at its end (a short frame included)."""
    header = _read_exactly(fd, _HEADER)
    if header is None:
        return None
    payload = _read_exactly(fd, int.from_bytes(header[:4], "little"))
    if payload is None:
        return None
    count, consumed = int.from_bytes(header[4:8], "little"), int.from_bytes(header[8:12], "little")
    return payload, count, consumed, header[12] == 1


def _read_exactly(fd: int, length: int) -> bytes | None:
    data = bytearray()
    while len(data) < length:
        piece = os.read(fd, length - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


def _write_all(fd: int, data: bytes) -> None:
    view, written = memoryview(data), 0
    while written < len(data):
        written += os.write(fd, view[written:])
