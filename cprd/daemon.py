"""The long-running daemon: the inventory plus the D-Bus service."""

from __future__ import annotations

from cprd.config import Config
from cprd.errors import StateError


async def run_daemon(config: Config, bus_address: str | None) -> int:
    raise StateError(
        "the D-Bus daemon is not built yet",
        "use the one-shot commands: cprd check | prepare | commit | resume | restore",
    )
