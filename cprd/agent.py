"""Guest-agent transport: qemu-ga over its host-side UNIX socket.

qemu.qmp cannot talk to qemu-ga (no greeting, and the 0xFF byte of
``guest-sync-delimited`` breaks its reader), so this is a small JSON-lines client.
Each operation opens its own connection, synchronises with ``guest-sync`` and a random
id (skipping stale replies left in the channel by earlier clients), then sends one
command.  ``guest-suspend-ram`` never replies on success: callers say so.

Every byte on this channel comes from the guest, which may be broken or hostile: any
sequence, any size, any speed.  A guest can cost only its own VM's operation, so the
input has a budget and everything that goes wrong ends as :class:`AgentError`:

- **Bytes per line:** :data:`MAX_LINE` (1 MiB).  cprd sends only ``guest-sync``,
  ``guest-ping`` and ``guest-suspend-ram``, whose replies are a few dozen bytes; the limit
  is that generous only because stale replies to other clients' commands (``guest-exec-
  status``, ``guest-get-fsinfo``, ...) may sit in the channel and are skipped.  libvirt caps
  agent replies at 10 MiB; cprd needs no such size.  A line over the limit, or a stream
  without a newline, ends the call at the limit: the socket is read in chunks, and no more
  than the limit plus one chunk is ever buffered (the call fails once it is exceeded).  A
  stale reply larger than that costs one call: closing the connection discards the rest.
- **Nesting depth:** :data:`MAX_DEPTH` (32), checked by a linear scan before
  ``json.loads``, whose recursion a deep ``[[[[...`` would exhaust.
- **Encoding:** a line that is not UTF-8 (or not a JSON object) is skipped like any stale
  line; the first line may begin in the middle of an earlier client's reply.  While
  waiting for the guest-sync echo, lines longer than :data:`MAX_SYNC_LINE` are skipped
  unparsed, so skipping costs the event loop little.
- **Types:** every field read is checked (``return`` of a sync must be our integer id,
  ``error`` an object with a string ``desc``); guest text in an error is cut short and
  made printable, so the error stays one line.
- **Time:** ONE deadline per :meth:`Agent.execute` covers connect, sync, send and reply,
  so a guest that drips one byte a second cannot stretch a call beyond its timeout.
- **At the edge,** any other exception raised while handling guest data becomes
  AgentError (asyncio.CancelledError is never caught).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cprd.errors import AgentError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0

#: Longest line accepted from the agent, newline excluded (see the module docstring).
MAX_LINE = 2**20
#: Deepest JSON nesting accepted from the agent.
MAX_DEPTH = 32
#: Bytes read from the socket at a time (and the StreamReader's own buffer limit).
CHUNK = 64 * 1024
#: Longest guest-provided text quoted in an error or log line.
MAX_QUOTE = 200
#: Longest line parsed while waiting for the guest-sync echo, ``{"return": ID}``: longer
#: lines are stale and skipped unparsed (json.loads of a wide 1 MiB line costs the event
#: loop a third of a second).
MAX_SYNC_LINE = 256

_HINT = "the guest agent sends malformed data: check qemu-ga in the guest"
_OPENERS = b"[{"
# Every byte but the four brackets, for bytes.translate(None, delete=...).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class _Skip(Exception):
    """A line that is not a usable JSON object: stale or garbled, skipped."""


def _printable(text: str, limit: int = MAX_QUOTE) -> str:
    """Guest text fit for a one-line message: control characters escaped, cut short."""
    cut = text[:limit]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return out + ("..." if len(text) > limit else "")


def json_depth_exceeds(line: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``line`` nests arrays/objects deeper than ``limit``.

    Linear in len(line) and mostly at C speed: escaped backslashes and quotes are dropped,
    the text between quotes (string contents) is dropped, and only the brackets of what
    is left are walked, stopping at the first level past the limit.  On text that is not
    JSON the answer is only an estimate, and json.loads rejects that text anyway."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    outside = b"".join(line.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[0::2])
    depth = 0
    for byte in outside.translate(None, _NOT_BRACKETS):
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_line(line: bytes, max_parse: int = MAX_LINE) -> dict[str, Any]:
    """One line from the agent as a JSON object.

    Raises :class:`AgentError` for JSON nested deeper than :data:`MAX_DEPTH` and
    ``_Skip`` for anything else that is no JSON object (stale, garbled, not UTF-8) and for
    lines longer than ``max_parse``, which are not parsed at all."""
    # Stale bytes (the 0xFF delimiter of guest-sync-delimited) may precede the JSON.
    line = line.lstrip(b"\xff\x00 \t\r").rstrip(b"\r")
    if json_depth_exceeds(line):
        raise AgentError(f"JSON nested deeper than {MAX_DEPTH} levels", _HINT)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Skip("not UTF-8") from err
    if not text.startswith("{"):
        raise _Skip("not a JSON object")
    if len(line) > max_parse:
        raise _Skip(f"longer than {max_parse} bytes")
    try:
        msg = json.loads(text)
    except RecursionError as err:  # the depth scan should have caught it: budget anyway
        raise AgentError(f"JSON nested deeper than {MAX_DEPTH} levels", _HINT) from err
    except ValueError as err:
        raise _Skip("not JSON") from err
    if not isinstance(msg, dict):
        raise _Skip(f"JSON {type(msg).__name__}, not an object")
    return msg


class _LineReader:
    """Lines from the agent socket, each at most MAX_LINE bytes; read in CHUNKs."""

    def __init__(self, reader: asyncio.StreamReader, name: str) -> None:
        self.reader = reader
        self.name = name
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline

    async def next(self) -> bytes:
        while True:
            nl = self.buf.find(b"\n", self.scanned)
            if nl >= 0:
                if nl > MAX_LINE:
                    break
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buf)
            if len(self.buf) > MAX_LINE:
                break
            try:
                chunk = await self.reader.read(CHUNK)
            except OSError as err:
                raise AgentError(f"{self.name}: guest agent: {err}") from err
            if not chunk:
                raise AgentError(f"{self.name}: guest agent closed the connection")
            self.buf += chunk
        self.buf.clear()
        raise AgentError(
            f"{self.name}: guest agent sent a line longer than {MAX_LINE} bytes", _HINT
        )


class Agent:
    """The guest agent of VM ``name`` at socket ``path``; each call ends within ``timeout``
    seconds (plus at most a second to close the connection) and raises only AgentError."""

    def __init__(self, path: Path, name: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self._skipped = 0
        self._last_skip = ""

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, *, reply: bool = True
    ) -> Any:
        """Run ``cmd`` in the guest; with ``reply=False`` return once it is sent.

        Returns the reply's ``return`` value, unchecked (its type is the caller's to check).
        """
        self._skipped, self._last_skip = 0, ""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=CHUNK)
                lines = _LineReader(reader, self.name)
                await self._sync(lines, writer)
                msg: dict[str, object] = {"execute": cmd}
                if args:
                    msg["arguments"] = dict(args)
                await self._send(writer, msg)
                if not reply:
                    return None
                return await self._reply(lines, cmd)
        except AgentError:
            raise
        except TimeoutError as err:
            raise AgentError(self._timeout_message(cmd, writer is not None)) from err
        except OSError as err:
            what = "socket " + str(self.path) if writer is None else "connection"
            raise AgentError(f"{self.name}: guest agent {what}: {err}") from err
        except Exception as err:  # the last resort at the edge: never CancelledError
            raise AgentError(
                f"{self.name}: guest agent: {cmd}: {type(err).__name__}: {_printable(str(err))}",
                _HINT,
            ) from err
        finally:
            if writer is not None:
                await _close(writer)

    async def ping(self) -> bool:
        """Whether the agent answers guest-ping now."""
        try:
            await self.execute("guest-ping")
        except AgentError:
            return False
        return True

    def _timeout_message(self, cmd: str, connected: bool) -> str:
        if not connected:
            return f"{self.name}: guest agent socket {self.path}: no connection within " + (
                f"{self.timeout:g}s"
            )
        skipped = ""
        if self._skipped:
            skipped = f" ({self._skipped} unusable lines skipped, last: {self._last_skip})"
        return f"{self.name}: guest agent: {cmd}: no answer within {self.timeout:g}s{skipped}"

    async def _next(self, lines: _LineReader, max_parse: int = MAX_LINE) -> dict[str, Any]:
        """The next line that is a JSON object; others are skipped (and counted)."""
        while True:
            line = await lines.next()
            try:
                msg = parse_line(line, max_parse)
            except AgentError as err:
                raise AgentError(f"{self.name}: guest agent: {err.message}", err.hint) from err
            except _Skip as why:
                self._skipped += 1
                self._last_skip = str(why)
                logger.debug(
                    "<-- agent %s: skipped %d bytes (%s)",
                    self.name,
                    len(line),
                    why,
                    extra={"CPRD_VM": self.name},
                )
                continue
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "<-- agent %s %s",
                    self.name,
                    _printable(repr(msg), 100),
                    extra={"CPRD_VM": self.name},
                )
            return msg

    async def _sync(self, lines: _LineReader, writer: asyncio.StreamWriter) -> None:
        token = secrets.randbelow(2**31)
        await self._send(writer, {"execute": "guest-sync", "arguments": {"id": token}})
        while True:
            msg = await self._next(lines, MAX_SYNC_LINE)
            answer = msg.get("return")
            # type() and not isinstance(): True == 1, and a stale {"return": true} is not ours
            if type(answer) is int and answer == token:
                return
            self._skipped += 1
            self._last_skip = "not the reply to our guest-sync"

    async def _reply(self, lines: _LineReader, cmd: str) -> Any:
        while True:
            msg = await self._next(lines)
            if "error" in msg:
                error = msg["error"]
                desc = error.get("desc") if isinstance(error, dict) else None
                if not isinstance(desc, str):
                    got = type(desc if isinstance(error, dict) else error).__name__
                    what = "error.desc" if isinstance(error, dict) else "error"
                    raise AgentError(
                        f"{self.name}: guest agent: {cmd}: malformed error reply ({what} is "
                        f"{got}, expected an object with a string desc)",
                        _HINT,
                    )
                raise AgentError(f"{self.name}: guest agent: {cmd}: {_printable(desc)}")
            if "return" in msg:
                return msg["return"]
            self._skipped += 1
            self._last_skip = "neither return nor error"

    async def _send(self, writer: asyncio.StreamWriter, msg: Mapping[str, object]) -> None:
        logger.debug("--> agent %s %s", self.name, msg.get("execute"))
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close without waiting on the guest: unsent bytes (a guest that does not read) are
    dropped, and the wait for the close is bounded."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1)
