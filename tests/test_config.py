"""Config validation: every error names the key path and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from cprd import cli, config
from cprd.config import InPlace, Launcher, Suspend
from cprd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_equals_the_defaults() -> None:
    parsed = config.load(ROOT / "config" / "cprd.yaml")
    assert parsed == config.Config()


def test_full_config() -> None:
    c = config.parse(
        """
state_dir: /srv/cprd
manifest: /srv/cprd/m.yaml
discovery: {qmp_sockets: ["/run/q/*.sock", "/run/r/*.qmp"], agent_socket: "/run/qga/{name}.sock",
            trusted_uids: [107]}
vms:
  web1: {agent: /run/qga/w.sock, suspend: always}
  db: {suspend: never, restore_priority: -3}
save: {concurrency: 8, timeout_s: 60, in_place: never}
restore: {launcher: systemd, keep_state_files: true}
"""
    )
    assert c.state_dir == Path("/srv/cprd")
    assert c.manifest_path == Path("/srv/cprd/m.yaml")
    assert c.discovery.qmp_sockets == ("/run/q/*.sock", "/run/r/*.qmp")
    assert c.discovery.trusted_uids == (107,)
    assert config.Config().discovery.trusted_uids == ()
    assert c.vm("web1").suspend is Suspend.ALWAYS
    assert c.vm("db").suspend is Suspend.NEVER
    assert c.vm("other").suspend is Suspend.AUTO
    assert (c.vm("db").restore_priority, c.vm("other").restore_priority) == (-3, 0)
    assert c.restore.concurrency == 4
    assert c.agent_path("web1") == Path("/run/qga/w.sock")
    assert c.agent_path("db") == Path("/run/qga/db.sock")
    assert c.agent_path("../x") is None
    assert c.save.concurrency == 8 and c.save.in_place is InPlace.NEVER
    assert c.restore.launcher is Launcher.SYSTEMD and c.restore.keep_state_files is True


def test_manifest_defaults_into_state_dir() -> None:
    assert config.parse("state_dir: /a/b").manifest_path == Path("/a/b/manifest.yaml")
    assert config.parse("").manifest_path == Path("/var/lib/cprd/manifest.yaml")


ERRORS = [
    ("vms: {web1: {suspend: yes}}", "vms.web1.suspend: expected auto, always or never, got 'yes'"),
    ("vms: {web1: {suspend: 3}}", "vms.web1.suspend: expected auto, always or never, got 3 (int)"),
    ("vms: {web1: {agent: rel.sock}}", "vms.web1.agent: expected an absolute path, got 'rel.sock'"),
    (
        "vms: {web1: {colour: red}}",
        "vms.web1.colour: unknown key "
        "(known keys: agent, suspend, on_kexec_failure, restore_priority)",
    ),
    ("vms: {web1: 5}", "vms.web1: expected a mapping, got 5 (int)"),
    ("vms: [a, b]", "vms: expected a mapping of VM names, got ['a', 'b'] (list)"),
    ("vms: {1: {}}", "vms: VM names must be non-empty strings, got 1"),
    ("state_dir: var/lib", "state_dir: expected an absolute path, got 'var/lib'"),
    ("state_dir: 5", "state_dir: expected an absolute path, got 5 (int)"),
    ("manifest: ''", "manifest: expected an absolute path, got ''"),
    (
        "frobnicate: 1",
        "frobnicate: unknown key (known keys: state_dir, manifest, discovery, vms, save, restore, "
        "metrics)",
    ),
    (
        "discovery: {qmp_sockets: /run/*.sock}",
        "discovery.qmp_sockets: expected a non-empty list of "
        "absolute glob patterns, got '/run/*.sock'",
    ),
    (
        "discovery: {qmp_sockets: []}",
        "discovery.qmp_sockets: expected a non-empty list of absolute glob patterns, got [] (list)",
    ),
    (
        "discovery: {qmp_sockets: [x.sock]}",
        "discovery.qmp_sockets[0]: expected an absolute path, got 'x.sock'",
    ),
    (
        "discovery: {agent_socket: /run/qga.sock}",
        "discovery.agent_socket: expected a path containing '{name}', got '/run/qga.sock'",
    ),
    (
        "discovery: {sockets: []}",
        "discovery.sockets: unknown key (known keys: qmp_sockets, agent_socket, trusted_uids)",
    ),
    (
        "discovery: {trusted_uids: 1000}",
        "discovery.trusted_uids: expected a list of uids, got 1000 (int)",
    ),
    (
        "discovery: {trusted_uids: [1000, '1001']}",
        "discovery.trusted_uids[1]: expected a uid (an integer from 1), got '1001'",
    ),
    (
        "discovery: {trusted_uids: [0]}",
        "discovery.trusted_uids[0]: expected a uid (an integer from 1), got 0 (int)",
    ),
    ("save: {concurrency: 0}", "save.concurrency: expected an integer between 1 and 256, got 0"),
    ("save: {concurrency: '4'}", "save.concurrency: expected an integer, got '4'"),
    ("save: {concurrency: true}", "save.concurrency: expected an integer, got True (bool)"),
    ("save: {timeout_s: -1}", "save.timeout_s: expected an integer at least 1, got -1"),
    (
        "save: {suspend_timeout_s: 0}",
        "save.suspend_timeout_s: expected an integer at least 1, got 0",
    ),
    (
        "save: {space_margin_mib: 1.5}",
        "save.space_margin_mib: expected an integer, got 1.5 (float)",
    ),
    (
        "save: {multifd_channels: 65}",
        "save.multifd_channels: expected an integer between 1 and 64, got 65",
    ),
    ("save: {in_place: always}", "save.in_place: expected auto or never, got 'always'"),
    ("save: 3", "save: expected a mapping, got 3 (int)"),
    ("restore: {launcher: docker}", "restore.launcher: expected direct or systemd, got 'docker'"),
    (
        "restore: {concurrency: 300}",
        "restore.concurrency: expected an integer between 1 and 256, got 300",
    ),
    (
        "vms: {db: {restore_priority: 1001}}",
        "vms.db.restore_priority: expected an integer between -1000 and 1000, got 1001",
    ),
    (
        "vms: {db: {restore_priority: high}}",
        "vms.db.restore_priority: expected an integer, got 'high'",
    ),
    ("restore: {timeout_s: 0}", "restore.timeout_s: expected an integer at least 1, got 0"),
    (
        "restore: {keep_state_files: yes}",
        "restore.keep_state_files: expected true or false, got 'yes'",
    ),
    ("[1, 2]", "top level: expected a mapping, got [1, 2] (list)"),
    ("a: [", "not valid YAML at line 1: expected the node content, but found '<stream end>'"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m.split(":")[0] for _, m in ERRORS])
def test_every_validation_error_has_its_exact_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(text, "cprd.yaml")
    assert str(err.value) == f"cprd.yaml: {message}"


def test_describe_lists_every_key() -> None:
    text = config.describe()
    for key in (
        "state_dir",
        "discovery.qmp_sockets",
        "vms.<name>.suspend",
        "save.timeout_s",
        "restore.launcher",
        "restore.keep_state_files",
    ):
        assert f"\n{key} (" in f"\n{text}"


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("save: {concurrency: 2}\n")
    assert cli.main(["--check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("vms: {web1: {suspend: yes}}\n")
    assert cli.main(["--check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cprd: {bad}: vms.web1.suspend: expected auto, always or never, got 'yes'"]
    assert cli.main(["--check-config", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "cprd 0.1.0"
