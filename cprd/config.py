"""Configuration: ``/etc/cprd/cprd.yaml`` in, frozen dataclasses out.

Every setting is declared once, as a dataclass field whose metadata carries its help
text and its parser; the loader, the defaults and ``cprd --help-config`` all derive from
those declarations.  Unknown keys are errors, and every error names the key path and
the bad value, e.g. ``vms.web1.suspend: expected auto, always or never, got 'yes'``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cprd.errors import ConfigError

DEFAULT_PATH = Path("/etc/cprd/cprd.yaml")

T = TypeVar("T")
Parser = Callable[[object, str], Any]


class Suspend(enum.Enum):
    """When cprd suspends a guest to RAM through its agent before saving it."""

    AUTO = "auto"  # when the VM has VFIO devices
    ALWAYS = "always"
    NEVER = "never"


class Launcher(enum.Enum):
    """How ``cprd restore`` starts QEMU again."""

    DIRECT = "direct"  # a detached process in its own session
    SYSTEMD = "systemd"  # a transient unit cprd-vm-<name>.service


class OnKexecFailure(enum.Enum):
    """What happens to a VM that cannot be saved when the kexec goes ahead anyway."""

    SHUTDOWN = "shutdown"  # ACPI power-off, then quit; cold-booted at restore
    LEAVE = "leave"  # left running: it dies with the old kernel


class Live(enum.Enum):
    """Whether a VM whose RAM is copied is saved while it runs (normal-mode migration)."""

    AUTO = "auto"  # live when its RAM is copied and it needs no suspend (cprd.plan.save_mode)
    NEVER = "never"  # stop every VM first (cpr-reboot)


class InPlace(enum.Enum):
    """Whether RAM on persistent shared memory may stay in place (x-ignore-shared)."""

    AUTO = "auto"
    NEVER = "never"


# --- value parsers: (value, key path) -> parsed value --------------------------------


def _describe(value: object) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _enum(cls: type[enum.Enum]) -> Parser:
    choices = [str(m.value) for m in cls]
    wanted = ", ".join(choices[:-1]) + " or " + choices[-1]

    def parse(value: object, path: str) -> enum.Enum:
        for member in cls:
            if value == member.value:
                return member
        raise ConfigError(f"{path}: expected {wanted}, got {_describe(value)}")

    return parse


def _int(lo: int, hi: int | None = None) -> Parser:
    def parse(value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        if value < lo or (hi is not None and value > hi):
            bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(f"{path}: expected an integer {bound}, got {value}")
        return value

    return parse


def _abspath(value: object, path: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: expected an absolute path, got {_describe(value)}")
    if not value.startswith("/"):
        raise ConfigError(f"{path}: expected an absolute path, got {value!r}")
    if "\0" in value or "\n" in value:
        raise ConfigError(f"{path}: path contains a NUL or newline character")
    return Path(os.path.normpath(value))


def _opt_abspath(value: object, path: str) -> Path | None:
    return None if value is None else _abspath(value, path)


def _globs(value: object, path: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ConfigError(
            f"{path}: expected a non-empty list of absolute glob patterns, got {_describe(value)}"
        )
    return tuple(str(_abspath(v, f"{path}[{i}]")) for i, v in enumerate(value))


def _uids(value: object, path: str) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of uids, got {_describe(value)}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**32 - 1:
            raise ConfigError(
                f"{path}[{i}]: expected a uid (an integer from 1), got {_describe(v)}"
            )
        out.append(v)
    return tuple(out)


def _agent_template(value: object, path: str) -> str | None:
    if value is None:
        return None
    parsed = str(_abspath(value, path))
    if "{name}" not in parsed:
        raise ConfigError(f"{path}: expected a path containing '{{name}}', got {value!r}")
    return parsed


def setting(default: Any, parse: Parser, help: str) -> Any:
    """Declare one setting: its default, its parser and its help text."""
    return field(default=default, metadata={"parse": parse, "help": help})


def section(cls: type[T], help: str) -> Any:
    return field(default_factory=cls, metadata={"section": cls, "help": help})


# --- the settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    qmp_sockets: tuple[str, ...] = setting(
        ("/run/cprd/qmp/*.sock",),
        _globs,
        "globs of QMP sockets reserved for cprd, watched for new and removed sockets",
    )
    agent_socket: str | None = setting(
        None,
        _agent_template,
        "guest-agent socket of a VM by name, e.g. /run/cprd/qga/{name}.sock; "
        "vms.<name>.agent overrides it",
    )
    trusted_uids: tuple[int, ...] = setting(
        (),
        _uids,
        "uids besides root that may own a QMP socket, the directories above it and the "
        "QEMU behind it (see TRUST in cprd.yaml(5)); root is always trusted",
    )


@dataclass(frozen=True)
class VMSettings:
    agent: Path | None = setting(None, _opt_abspath, "guest-agent socket of this VM")
    suspend: Suspend = setting(
        Suspend.AUTO,
        _enum(Suspend),
        "suspend to RAM through the agent before saving: auto (when the VM has VFIO "
        "devices), always or never",
    )
    on_kexec_failure: OnKexecFailure = setting(
        OnKexecFailure.SHUTDOWN,
        _enum(OnKexecFailure),
        "when the kexec goes ahead anyway (logind's kexec signal, the guard unit) and this "
        "VM cannot be saved: shutdown (ACPI power-off, then quit; cold-booted at restore) "
        "or leave (it dies with the old kernel)",
    )
    restore_priority: int = setting(
        0,
        _int(-1000, 1000),
        "restore order: VMs of a higher priority are back (or failed) before any VM of a "
        "lower one starts restoring; recorded in the manifest at prepare",
    )


@dataclass(frozen=True)
class SaveSettings:
    concurrency: int = setting(4, _int(1, 256), "VMs saved at the same time")
    timeout_s: int = setting(600, _int(1), "deadline for the whole save, in seconds")
    suspend_timeout_s: int = setting(
        30, _int(1), "how long a guest may take to reach S3 after guest-suspend-ram"
    )
    qmp_timeout_s: int = setting(10, _int(1, 600), "deadline of one QMP command, in seconds")
    agent_timeout_s: int = setting(
        5, _int(1, 600), "deadline of one guest-agent call (connect, sync, reply), in seconds"
    )
    quit_timeout_s: int = setting(
        30, _int(1, 3600), "how long a QEMU may take to exit after quit, in seconds"
    )
    shutdown_timeout_s: int = setting(
        120,
        _int(1, 3600),
        "how long a guest that could not be saved may take to power off before its QEMU "
        "is quit (see vms.<name>.on_kexec_failure), in seconds",
    )
    space_margin_mib: int = setting(
        256, _int(0), "free space kept in state_dir beyond the bytes to write, in MiB"
    )
    multifd_channels: int = setting(
        4, _int(1, 64), "multifd channels per VM when RAM is copied (mapped-ram)"
    )
    in_place: InPlace = setting(
        InPlace.AUTO,
        _enum(InPlace),
        "keep RAM on persistent shared memory in place (auto) or always copy it (never)",
    )
    live: Live = setting(
        Live.AUTO,
        _enum(Live),
        "save a running VM whose RAM is copied and that needs no suspend while it runs, "
        "stopping it only for the last pass (auto), or stop every VM first (never)",
    )
    live_max_s: int = setting(
        30,
        _int(1, 3600),
        "longest live phase, in seconds: then every VM still saved live is stopped and "
        "its save finished while stopped, whatever its guest still dirties",
    )
    live_bandwidth_mib: int = setting(
        0,
        _int(0),
        "write rate cap per VM during the live phase, in MiB/s (0: none); the last pass, "
        "with the VM stopped, is never capped",
    )


@dataclass(frozen=True)
class RestoreSettings:
    launcher: Launcher = setting(Launcher.DIRECT, _enum(Launcher), "direct or systemd")
    concurrency: int = setting(
        4,
        _int(1, 256),
        "VMs restored at the same time, in vms.<name>.restore_priority order (most of a "
        "restore is not reading: QEMU's start, device state, CPU)",
    )
    timeout_s: int = setting(600, _int(1), "deadline for one VM's restore, in seconds")
    keep_state_files: bool = setting(
        False, lambda v, p: _bool(v, p), "keep state files after a confirmed restore"
    )


@dataclass(frozen=True)
class MetricsSettings:
    textfile: Path | None = setting(
        None,
        _opt_abspath,
        "metrics file for node_exporter's textfile collector, replaced after each "
        "operation (e.g. /var/lib/prometheus/node-exporter/cprd.prom); off when unset",
    )


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
    return value


@dataclass(frozen=True)
class Config:
    state_dir: Path = setting(
        Path("/var/lib/cprd"), _abspath, "state files and manifest; created with mode 0700"
    )
    manifest: Path | None = setting(
        None, _opt_abspath, "the manifest; default <state_dir>/manifest.yaml"
    )
    discovery: Discovery = section(Discovery, "where cprd finds VMs")
    vms: Mapping[str, VMSettings] = field(
        default_factory=dict, metadata={"help": "per-VM settings, by VM name"}
    )
    save: SaveSettings = section(SaveSettings, "how VMs are saved")
    restore: RestoreSettings = section(RestoreSettings, "how VMs are restored")
    metrics: MetricsSettings = section(MetricsSettings, "figures for dashboards")

    @property
    def manifest_path(self) -> Path:
        return self.manifest if self.manifest is not None else self.state_dir / "manifest.yaml"

    def vm(self, name: str) -> VMSettings:
        return self.vms.get(name, VMSettings())

    def agent_path(self, name: str) -> Path | None:
        """The guest-agent socket of VM ``name``, if one is configured."""
        own = self.vm(name).agent
        if own is not None:
            return own
        if self.discovery.agent_socket is not None and _safe_name_part(name):
            return Path(self.discovery.agent_socket.replace("{name}", name))
        return None


def _safe_name_part(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


# --- the loader -----------------------------------------------------------------------


def _load_dataclass(cls: type[T], data: object, path: str) -> T:
    where = path or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{_join(path, str(key))}: unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key_path = _join(path, name)
        if "section" in f.metadata:
            values[name] = _load_dataclass(f.metadata["section"], data[name], key_path)
        elif "parse" in f.metadata:
            values[name] = f.metadata["parse"](data[name], key_path)
        else:
            values[name] = _load_vms(data[name], key_path)
    return cls(**values)


def _load_vms(data: object, path: str) -> Mapping[str, VMSettings]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of VM names, got {_describe(data)}")
    vms = {}
    for name, settings in data.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: VM names must be non-empty strings, got {name!r}")
        vms[name] = _load_dataclass(VMSettings, settings, f"{path}.{name}")
    return vms


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so ``yes`` stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def safe_load(text: str) -> Any:
    """yaml.safe_load with YAML 1.2 booleans (shared with the manifest)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def parse(text: str, source: str = "<config>") -> Config:
    """Parse and validate YAML text; raise ConfigError naming the bad key."""
    try:
        data = safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from err
    try:
        return _load_dataclass(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err.message}", err.hint) from None


def load(path: Path = DEFAULT_PATH) -> Config:
    """Load the config file; a missing default file means all defaults."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path == DEFAULT_PATH:
            return Config()
        raise ConfigError(f"{path}: no such file", "pass --config PATH") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    return parse(text, str(path))


def describe() -> str:
    """Every setting with its default and help, derived from the declarations."""
    lines: list[str] = []

    def walk(cls: type[Any], prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = _join(prefix, f.name)
            if "section" in f.metadata:
                walk(f.metadata["section"], key)
            elif "parse" in f.metadata:
                default = f.default
                shown = default.value if isinstance(default, enum.Enum) else default
                if isinstance(shown, tuple):
                    shown = list(shown)
                lines.append(f"{key} (default: {shown}): {f.metadata['help']}")
            else:
                lines.append(f"{key}: {f.metadata['help']}")
                walk(VMSettings, f"{key}.<name>")

    walk(Config, "")
    return "\n".join(lines)
