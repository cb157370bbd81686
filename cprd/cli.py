"""``cprd``: the daemon, the boot-time restore, and one-shot local commands.

    cprd [--config PATH] [--bus ADDRESS]         run the daemon (D-Bus service)
    cprd --check-config [--config PATH]          validate the config and exit
    cprd restore [--manifest PATH] [--ignore-disk-changes VM]...
                                                 bring back the VMs of a committed manifest
    cprd check | prepare [--commit] | commit | resume
                                                 the same steps without the daemon

--config, --bus and --debug work before or after the subcommand.
Failures end in one line (and a hint); tracebacks only with --debug.
Exit codes: 0 success, 1 the operation failed (VMs were put back or left saved),
2 bad usage, config or manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cprd import __version__, log
from cprd import config as cfg
from cprd.errors import ConfigError, CprdError, ManifestError, StateError

logger = logging.getLogger("cprd")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand (``cprd restore --config F``).

    After it their default is SUPPRESS, so a value given before the subcommand is not
    overwritten by the subcommand's default."""
    p = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--config",
        type=Path,
        default=default(cfg.DEFAULT_PATH),
        help=f"config file (default: {cfg.DEFAULT_PATH})",
    )
    p.add_argument("--bus", default=default(None), help="D-Bus address (default: the system bus)")
    p.add_argument(
        "--debug", action="store_true", default=default(False), help="debug logging and tracebacks"
    )
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cprd",
        description="Save and restore every QEMU VM across a kexec.",
        parents=[_common(False)],
    )
    p.add_argument("--version", action="version", version=f"cprd {__version__}")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    sub = p.add_subparsers(dest="command")
    common = [_common(True)]
    r = sub.add_parser("restore", help="restore the VMs of a committed manifest", parents=common)
    r.add_argument("--manifest", type=Path, help="manifest (default: from the config)")
    r.add_argument(
        "--ignore-disk-changes",
        action="append",
        default=[],
        metavar="VM",
        help="restore VM even if its disk images changed since the save (repeatable)",
    )
    sub.add_parser("check", help="preflight every VM; changes nothing", parents=common)
    pr = sub.add_parser(
        "prepare", help="suspend and save every VM (all or nothing)", parents=common
    )
    pr.add_argument("--commit", action="store_true", help="then quit the saved QEMUs")
    sub.add_parser("commit", help="quit the saved QEMUs of a prepared manifest", parents=common)
    sub.add_parser("resume", help="undo a prepare: every VM back as it was", parents=common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.setup(debug=args.debug)
    try:
        if args.help_config:
            print(cfg.describe())
            return EXIT_OK
        config = cfg.load(args.config)
        if args.check_config:
            print(f"{args.config}: valid")
            return EXIT_OK
        return _dispatch(args, config)
    except (ConfigError, ManifestError) as err:
        return _fail(err, args.debug, EXIT_USAGE)
    except CprdError as err:
        return _fail(err, args.debug, EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


def _fail(err: CprdError, debug: bool, code: int) -> int:
    if debug:
        logger.exception("cprd failed")
    print(f"cprd: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"cprd: hint: {err.hint}", file=sys.stderr)
    return code


def _dispatch(args: argparse.Namespace, config: cfg.Config) -> int:
    if args.command is None:
        from cprd.daemon import run_daemon

        return asyncio.run(run_daemon(config, args.bus))
    if args.command == "restore":
        return asyncio.run(_restore(config, args.manifest, args.ignore_disk_changes))
    return asyncio.run(_local(config, args.command, getattr(args, "commit", False)))


async def _restore(config: cfg.Config, manifest: Path | None, ignore_disks: list[str]) -> int:
    from cprd.manifest import Outcome
    from cprd.restore import Restorer

    began = time.monotonic()
    try:
        result = await Restorer(config, manifest, ignore_disk_changes=ignore_disks).run()
    except CprdError:
        _metrics(config, "restore", began, False, manifest)
        raise
    _metrics(config, "restore", began, True, manifest)
    failed = [v for v in result.vms if v.outcome is not Outcome.RESTORED]
    for v in result.vms:
        print(f"{v.name}: {v.outcome.value}: {v.reason}")
    return EXIT_FAILED if failed else EXIT_OK


def _metrics(
    config: cfg.Config, operation: str, began: float, ok: bool, manifest: Path | None = None
) -> None:
    from cprd import metrics

    path = manifest if manifest is not None else config.manifest_path
    metrics.record(config.metrics.textfile, path, operation, ok, time.monotonic() - began)


async def _with_saver(config: cfg.Config, work: Callable[[Any], Awaitable[int]]) -> int:
    from cprd.inventory import Inventory
    from cprd.save import Saver

    inventory = Inventory(config)
    try:
        return await work(Saver(config, inventory))
    finally:
        await inventory.close()


async def _local(config: cfg.Config, command: str, commit: bool) -> int:
    async def work(saver: Any) -> int:
        if command == "check":
            plans, problems = await saver.plan()
            for _, plan in plans:
                status = "ok" if not plan.problems else "; ".join(plan.problems)
                print(f"{plan.name}: {plan.action}: {status}")
            named = {plan.name for _, plan in plans}
            for what, why in sorted(problems.items()):
                if what not in named:
                    print(f"{what}: {why}")
            return EXIT_FAILED if problems else EXIT_OK
        began = time.monotonic()
        if command == "prepare":
            try:
                manifest = await saver.prepare()
                if commit:
                    manifest = await saver.commit()
            except CprdError:
                _metrics(config, "prepare", began, False)
                raise
            _metrics(config, "prepare", began, True)
            print(json.dumps({"manifest": str(saver.manifest_path), "phase": manifest.phase.value}))
            return EXIT_OK
        if command == "commit":
            try:
                await saver.commit()
            except CprdError:
                _metrics(config, "commit", began, False)
                raise
            _metrics(config, "commit", began, True)
            return EXIT_OK
        if command == "resume":
            from cprd import metrics

            outcomes = await saver.resume()
            metrics.record(
                config.metrics.textfile,
                config.manifest_path,
                "resume",
                True,
                time.monotonic() - began,
                metrics.outcome_figures(outcomes),
            )
            for name, outcome in sorted(outcomes.items()):
                print(f"{name}: {outcome}")
            return EXIT_OK
        raise StateError(f"unknown command {command}")

    return await _with_saver(config, work)


if __name__ == "__main__":
    sys.exit(main())
