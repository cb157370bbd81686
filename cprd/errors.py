"""The errors cprd raises.

Every failure an operator can meet is a subclass of :class:`CprdError` with a one-line
message and, where there is something to do about it, a hint. Lower-level errors are
wrapped with their cause kept (``raise X(...) from err``); ``asyncio.CancelledError`` is
never wrapped.

Tree::

    CprdError
     +-- ConfigError          bad /etc/cprd/cprd.yaml
     +-- TransportError       QMP or guest-agent socket trouble
     |    +-- QMPError        QEMU refused a command or the connection broke
     |    |    +-- MonitorBusyError  another client holds that QMP socket
     |    +-- AgentError      guest agent absent, silent or refusing
     +-- PreflightError       a prepare was refused before anything was stopped
     +-- SaveError            a save failed; every VM was put back
     +-- StateError           the request does not fit the current phase (busy, ...)
     +-- ManifestError        manifest missing, corrupt, of an unknown version, unsafe
     +-- RestoreError         one VM could not be restored; its state file is kept
     +-- LaunchError          a QEMU process could not be started
     +-- TrustError           a socket, process or binary cprd must not act on
"""

from __future__ import annotations

from collections.abc import Sequence


class CprdError(Exception):
    """Root of cprd's errors: ``str(err)`` is the one-line message."""

    #: Suffix of the D-Bus error name, ``org.cprd.Cprd1.Error.<dbus_name>``.
    dbus_name = "Failed"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(CprdError):
    dbus_name = "InvalidConfig"


class TransportError(CprdError):
    dbus_name = "Transport"


class QMPError(TransportError):
    dbus_name = "QMP"


class MonitorBusyError(QMPError):
    """A QEMU answers on the socket but sends no greeting: another client holds it."""


class AgentError(TransportError):
    dbus_name = "GuestAgent"


class PreflightError(CprdError):
    """Refused before anything was stopped; ``problems`` maps VM name to reason."""

    dbus_name = "PreflightFailed"

    def __init__(self, problems: dict[str, str], hint: str | None = None) -> None:
        self.problems = dict(problems)
        detail = "; ".join(f"{vm}: {why}" for vm, why in sorted(self.problems.items()))
        super().__init__(f"preflight failed, nothing was stopped: {detail}", hint)


class SaveError(CprdError):
    """A save failed and was rolled back; ``outcomes`` maps VM name to what happened."""

    dbus_name = "SaveFailed"

    def __init__(
        self,
        reason: str,
        outcomes: dict[str, str],
        pending: Sequence[str] = (),
        lost: Sequence[str] = (),
    ) -> None:
        self.reason = reason
        self.outcomes = dict(outcomes)
        #: VMs that could not be put back and are kept in the manifest for a resume.
        self.pending = tuple(pending)
        #: VMs whose QEMU exited by itself before their state was complete.
        self.lost = tuple(lost)
        detail = "; ".join(f"{vm}: {what}" for vm, what in sorted(self.outcomes.items()))
        if self.pending or self.lost:
            parts = []
            if self.lost:
                parts.append(f"{', '.join(sorted(self.lost))} LOST: its QEMU exited by itself")
            if self.pending:
                parts.append(f"{', '.join(sorted(self.pending))} kept in the manifest")
            super().__init__(
                f"save failed ({reason}); not every VM could be put back "
                f"({'; '.join(parts)}): {detail}",
                "run `cprd resume` (or `cprdctl resume`) once they answer"
                if self.pending
                else "start the lost VMs again as you normally would",
            )
        else:
            super().__init__(f"save failed ({reason}); every VM was put back: {detail}")


class StateError(CprdError):
    dbus_name = "Busy"


class ManifestError(CprdError):
    dbus_name = "InvalidManifest"


class RestoreError(CprdError):
    dbus_name = "RestoreFailed"


class LaunchError(CprdError):
    dbus_name = "LaunchFailed"


class TrustError(CprdError):
    """A QMP socket, process or binary that someone other than root could steer."""

    dbus_name = "Untrusted"
