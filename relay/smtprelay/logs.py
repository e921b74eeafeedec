"""Where log lines go: the original product's Log To, rebuilt on structlog.

Two channels. *Mail* events (one canonical line per accepted or refused message and per
delivery attempt, plus transcripts when ``debug`` is on) go to ``logging.target``: a day file
``<spoolDir>/sysMMDD.txt``, stdout, RFC 5424 syslog, or nowhere. *System* events (start-up,
shutdown, errors) always reach stdout as well, so ``kubectl logs`` is never empty.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol, TextIO

import structlog

from smtprelay.config import Logging, split_hostport
from smtprelay.metrics import METRICS

_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FACILITY_MAIL = 2


class Sink(Protocol):
    def write(self, event: MutableMapping[str, Any]) -> None: ...


def _json(event: MutableMapping[str, Any]) -> str:
    return json.dumps(event, default=str, separators=(",", ":"))


class StreamSink:
    """JSON lines, unbuffered; a human-friendly rendering on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pretty = stream.isatty()
        self._console = structlog.dev.ConsoleRenderer(colors=False) if self._pretty else None
        self._lock = threading.Lock()

    def write(self, event: MutableMapping[str, Any]) -> None:
        if self._console is not None:
            line = str(self._console(None, "", dict(event)))
        else:
            line = _json(event)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def day_file_name(day: dt.date) -> str:
    return f"sys{day.month:02d}{day.day:02d}.txt"


class DayFileSink:
    """``sysMMDD.txt`` in the spool directory, a new file each day, pruned by age.

    The name carries no year, so a file last written in an earlier year is started afresh
    rather than appended to.
    """

    def __init__(
        self, directory: Path, retention_days: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._directory = directory
        self._retention = retention_days
        self._clock = clock
        self._day: dt.date | None = None
        self._handle: TextIO | None = None
        self._day_starts = self._day_ends = 0.0  # the open file's day, in clock seconds
        self._lock = threading.Lock()

    def _open(self, today: dt.date) -> TextIO:
        if self._handle is not None:
            self._handle.close()
        path = self._directory / day_file_name(today)
        mode = "a"
        try:
            written = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).date()
            if written.year != today.year or (today - written).days > 1:
                mode = "w"  # a stale file of the same month and day
        except FileNotFoundError:
            pass
        self.prune(today)
        self._day = today
        handle = path.open("a" if mode == "a" else "w", encoding="utf-8")
        self._handle = handle
        return handle

    def prune(self, today: dt.date) -> list[Path]:
        """Remove day files last written more than ``retention_days`` before ``today``."""
        removed = []
        cutoff = dt.datetime.combine(today, dt.time(), dt.UTC).timestamp() - (
            self._retention * 86400
        )
        for path in self._directory.glob("sys[0-9][0-9][0-9][0-9].txt"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed

    def write(self, event: MutableMapping[str, Any]) -> None:
        now = self._clock()
        line = _json(event) + "\n"
        with self._lock:
            handle = self._handle
            if handle is None or not self._day_starts <= now < self._day_ends:
                today = dt.datetime.fromtimestamp(now, dt.UTC).date()
                handle = self._handle if self._day == today and self._handle else self._open(today)
                self._day_starts = dt.datetime.combine(today, dt.time(), dt.UTC).timestamp()
                self._day_ends = self._day_starts + 86400
            try:
                handle.write(line)
                handle.flush()
                if self._clock is not time.time:  # the write stamped the real time already
                    os.utime(handle.fileno(), (now, now))
            except OSError:
                self._discard()  # drop what is buffered: memory stays bounded on a full disk
                raise

    def _discard(self) -> None:
        handle, self._handle, self._day = self._handle, None, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


class SyslogSink:
    """RFC 5424 messages, facility mail, over UDP or TCP (octet-counted, RFC 6587).

    Sending happens on a thread behind a bounded queue, so a slow or unreachable log server
    never stalls mail; when the queue is full, events are dropped and counted (``dropped``).
    A TCP connection that breaks is reopened for the next event.
    """

    MAX_UDP = 8192  # larger datagrams fragment or are refused; transcripts can be long
    QUEUE = 10_000

    def __init__(self, server: str, protocol: str, hostname: str) -> None:
        self._address = split_hostport(server, 514)
        self._protocol = protocol
        self._hostname = (hostname or "-")[:255]
        self._sock: socket.socket | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="syslog", daemon=True)
        self._thread.start()

    def format(self, event: MutableMapping[str, Any]) -> bytes:
        severity = _SEVERITY.get(str(event.get("level", "info")), 6)
        stamp = event.get("timestamp") or dt.datetime.now(dt.UTC).isoformat()
        msgid = "".join(c for c in str(event.get("event", "-")) if 33 <= ord(c) <= 126)[:32]
        header = (
            f"<{_FACILITY_MAIL * 8 + severity}>1 {stamp} {self._hostname} smtprelay "
            f"{os.getpid()} {msgid or '-'} -"
        )
        return f"{header} {_json(event)}".encode()

    def write(self, event: MutableMapping[str, Any]) -> None:
        try:
            self._queue.put_nowait(self.format(event))
        except queue.Full:
            self.dropped += 1

    def _connect(self) -> socket.socket:
        infos = socket.getaddrinfo(*self._address, type=socket.SOCK_DGRAM)
        family = infos[0][0] if infos else socket.AF_INET
        kind = socket.SOCK_DGRAM if self._protocol == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        if kind == socket.SOCK_STREAM:
            sock.settimeout(5)
            try:
                sock.connect(self._address)
            except OSError:
                sock.close()
                raise
        return sock

    def _send(self, payload: bytes) -> None:
        try:
            if self._sock is None:
                self._sock = self._connect()
            if self._protocol == "udp":
                self._sock.sendto(payload[: self.MAX_UDP], self._address)
            else:
                self._sock.sendall(f"{len(payload)} ".encode() + payload)
        except OSError as error:
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            self.dropped += 1
            sys.stderr.write(f"smtprelay: syslog to {self._address}: {error}\n")

    def _run(self) -> None:
        while (payload := self._queue.get()) is not None:
            self._send(payload)
            self._queue.task_done()
        self._queue.task_done()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _Router:
    def __init__(self) -> None:
        self.stdout: Sink = StreamSink(sys.stdout)
        self.mail: Sink | None = self.stdout
        self.debug = False

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        channel = event.pop("_channel", "system")
        if channel == "system":
            _write(self.stdout, event)
            if self.mail is not None and self.mail is not self.stdout:
                _write(self.mail, event)
        elif self.mail is not None and (channel == "mail" or self.debug):
            _write(self.mail, event)
        raise structlog.DropEvent


def _write(sink: Sink, event: MutableMapping[str, Any]) -> None:
    """Logging never fails a transaction: a line a full or failing volume (or a closed
    stdout) cannot take is dropped and counted."""
    try:
        sink.write(event)
    except Exception:
        METRICS.log_dropped.inc()


_ROUTER = _Router()
_PROCESS = {"pid": os.getpid()}  # set again by configure(), which each worker calls


def _add_pid(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every line names the process that wrote it (as Postfix's ``smtp[1234]:``): with
    several workers, which one received and which one delivered a message."""
    event.setdefault("pid", _PROCESS["pid"])
    return event


def _configure_structlog() -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_pid,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _ROUTER,
        ],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )


_configure_structlog()


class _StdlibBridge(logging.Handler):
    """Warnings and errors that libraries (aiosmtpd, asyncio) log reach the system channel."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        event: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            event["exc_info"] = record.exc_info
        system_log().log(record.levelno, message, **event)


_BRIDGE = _StdlibBridge(logging.WARNING)


def configure(
    settings: Logging, *, spool_dir: Path, hostname: str, clock: Callable[[], float] = time.time
) -> None:
    """Point the mail channel at ``settings.target``."""
    _PROCESS["pid"] = os.getpid()
    sink: Sink | None
    if settings.target == "file":
        spool_dir.mkdir(parents=True, exist_ok=True)
        sink = DayFileSink(spool_dir, settings.retention_days, clock)
    elif settings.target == "syslog":
        assert settings.syslog_server is not None
        sink = SyslogSink(settings.syslog_server, settings.syslog_protocol, hostname)
    elif settings.target == "stdout":
        sink = _ROUTER.stdout
    else:
        sink = None
    close()
    _ROUTER.mail = sink
    _ROUTER.debug = settings.debug
    root = logging.getLogger()
    if _BRIDGE not in root.handlers:
        root.addHandler(_BRIDGE)
    # aiosmtpd logs every session at INFO; only its warnings and errors are wanted
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def close() -> None:
    """Flush and close the mail target (the last events of a shutdown reach syslog too)."""
    sink = _ROUTER.mail
    if sink is not None and sink is not _ROUTER.stdout:
        closer = getattr(sink, "close", None)
        if closer is not None:
            closer()
    _ROUTER.mail = _ROUTER.stdout


_LOGGERS: dict[str, Any] = {}


def _channel(name: str) -> Any:
    """One bound logger per channel, made once (binding costs a logger object per line)."""
    logger = _LOGGERS.get(name)
    if logger is None:
        logger = _LOGGERS[name] = structlog.get_logger().bind(_channel=name)
    return logger


def mail_log() -> Any:
    return _channel("mail")


def system_log() -> Any:
    return _channel("system")


def transcript_log() -> Any:
    """SMTP transcripts: written to the mail target only when ``logging.debug`` is on."""
    return _channel("debug")


def debug_enabled() -> bool:
    return _ROUTER.debug
