"""Logging: journald with structured fields when it is there, plain stderr otherwise.

Every event an operator may search for has a stable MESSAGE_ID (see
units/cprd.catalog) and carries CPRD_VM, CPRD_PHASE and CPRD_MANIFEST fields, e.g.
``journalctl MESSAGE_ID=<id>`` or ``journalctl CPRD_VM=web1``.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


class Event(enum.Enum):
    """Operator-visible events and their MESSAGE_IDs (never change a published id)."""

    SAVE_STARTED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a61"
    VM_SUSPENDED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a62"
    VM_SAVED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a63"
    PREPARED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a64"
    COMMITTED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a65"
    ROLLBACK = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a66"
    VM_RESUMED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a67"
    VM_RESTORED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a68"
    VM_RESTORE_FAILED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a69"
    FAILURE = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a6a"
    PLAN = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a6b"
    VM_SHUTDOWN = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a6c"
    VM_LOST = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a6d"
    REFUSED = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a80"


def emit(
    logger: logging.Logger,
    level: int,
    event: Event,
    msg: str,
    *args: object,
    vm: str | None = None,
    phase: str | None = None,
    manifest: Path | str | None = None,
) -> None:
    """Log ``msg % args`` with the event's MESSAGE_ID and cprd's structured fields."""
    extra: dict[str, object] = {"MESSAGE_ID": event.value, "CPRD_EVENT": event.name}
    if vm is not None:
        extra["CPRD_VM"] = vm
    if phase is not None:
        extra["CPRD_PHASE"] = phase
    if manifest is not None:
        extra["CPRD_MANIFEST"] = str(manifest)
    logger.log(level, msg, *args, extra=extra)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        vm = getattr(record, "CPRD_VM", None)
        return (
            f"{record.levelname.lower()}: {vm}: {text}"
            if vm
            else f"{record.levelname.lower()}: {text}"
        )


def journald_available() -> bool:
    return JOURNAL_SOCKET.is_socket()


class _Fallback:
    """Mixed into JournalHandler: a record journald does not take (its socket present
    but nothing answering: ConnectionRefusedError on every send) goes to stderr instead
    of logging's "--- Logging error ---" traceback.  Logging never raises."""

    fallback: logging.Handler

    def handleError(self, record: logging.LogRecord) -> None:
        self.fallback.handle(record)


def _stderr_handler() -> logging.Handler:
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_PlainFormatter("%(message)s"))
    return stream


def setup(debug: bool = False, identifier: str = "cprd") -> None:
    """Route cprd's logging to journald when it runs, else to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers: list[logging.Handler] = []
    tty = sys.stderr.isatty()
    if journald_available() and os.environ.get("CPRD_LOG") != "stderr":
        from systemd.journal import JournalHandler

        class Journal(_Fallback, JournalHandler):  # type: ignore[misc]
            pass

        journal = Journal(SYSLOG_IDENTIFIER=identifier)
        # On a terminal stderr already shows every line: no second copy on a failure.
        journal.fallback = logging.NullHandler() if tty else _stderr_handler()
        handlers.append(journal)
    if not handlers or tty:
        handlers.append(_stderr_handler())
    for handler in handlers:
        root.addHandler(handler)
    if not debug:
        logging.getLogger("qemu").setLevel(logging.WARNING)
