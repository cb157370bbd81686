"""Guest-agent transport: qemu-ga over its host-side UNIX socket.

qemu.qmp cannot talk to qemu-ga (no greeting, and the 0xFF byte of
``guest-sync-delimited`` breaks its reader), so this is a small JSON-lines client.
Each operation opens its own connection, synchronises with ``guest-sync`` and a random
id (skipping stale replies left in the channel by earlier clients), then sends one
command.  ``guest-suspend-ram`` never replies on success: callers say so.
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


class Agent:
    def __init__(self, path: Path, name: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, *, reply: bool = True
    ) -> Any:
        """Run ``cmd`` in the guest; with ``reply=False`` return once it is sent."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), self.timeout
            )
        except (OSError, TimeoutError) as err:
            raise AgentError(
                f"{self.name}: guest agent socket {self.path}: {err or 'timeout'}"
            ) from err
        try:
            await self._sync(reader, writer)
            msg: dict[str, object] = {"execute": cmd}
            if args:
                msg["arguments"] = dict(args)
            await self._send(writer, msg)
            if not reply:
                return None
            answer = await self._read(reader, lambda m: "return" in m or "error" in m)
            if "error" in answer:
                desc = answer["error"].get("desc", answer["error"])
                raise AgentError(f"{self.name}: guest agent: {cmd}: {desc}")
            return answer["return"]
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def ping(self) -> bool:
        """Whether the agent answers guest-ping now."""
        try:
            await self.execute("guest-ping")
        except AgentError:
            return False
        return True

    async def _sync(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = secrets.randbelow(2**31)
        await self._send(writer, {"execute": "guest-sync", "arguments": {"id": token}})
        await self._read(reader, lambda m: m.get("return") == token)

    async def _send(self, writer: asyncio.StreamWriter, msg: Mapping[str, object]) -> None:
        logger.debug("--> agent %s %s", self.name, msg.get("execute"))
        writer.write(json.dumps(msg).encode() + b"\n")
        try:
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (OSError, TimeoutError) as err:
            raise AgentError(f"{self.name}: guest agent: cannot send: {err or 'timeout'}") from err

    async def _read(self, reader: asyncio.StreamReader, done: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AgentError(
                    f"{self.name}: guest agent did not answer within {self.timeout:g}s"
                )
            try:
                line = await asyncio.wait_for(reader.readline(), remaining)
            except TimeoutError:
                continue
            except OSError as err:
                raise AgentError(f"{self.name}: guest agent: {err}") from err
            if not line:
                raise AgentError(f"{self.name}: guest agent closed the connection")
            # Stale bytes (a 0xFF delimiter, half a reply) may precede the JSON.
            text = line.decode(errors="replace").lstrip("\ufffd\x00 ")
            try:
                msg = json.loads(text)
            except ValueError:
                continue
            if isinstance(msg, dict) and done(msg):
                logger.debug("<-- agent %s", self.name)
                return msg
