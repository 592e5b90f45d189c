"""``watcherd config check``: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse

from watcherd import config, log, watch
from watcherd.cli.common import command_parser, say
from watcherd.errors import WatcherdError
from watcherd.store import check_backend

_EXIT_STATUSES = {0: "the config is usable", 2: "it is not: the line on stderr names the key and "
                                                "where its value came from"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "config", summary="inspect the configuration",
        description="Inspect the configuration watcherd would run with.",
        exit_statuses=_EXIT_STATUSES)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = command_parser(
        actions, "check", summary="print the effective config and each value's source",
        description="""\
Prints every key with its effective value and where that came from (default, the file, or
a WATCHERD_* variable), secrets masked. Checks that this installation can open the store,
and asks an S3 store whether it enforces conditional writes.""",
        exit_statuses=_EXIT_STATUSES)
    check.add_argument("--no-store", action="store_true",
                       help="do not contact an S3 store to check its conditional writes")
    check.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    # Loading already validated every value; what is left is whether this installation can
    # use them (the S3 extra).
    check_backend(cfg.store)
    say(f"# config file: {cfg.file or 'none (defaults and environment only)'}")
    section = None
    rows = config.describe(cfg)
    width = max(len(f"{key.rpartition('.')[2]} = {value}") for key, value, _ in rows)
    for key, value, source in rows:
        sec, _, name = key.rpartition(".")
        if sec != section:
            say(f"\n[{sec}]")
            section = sec
        line = f"{name} = {value}"
        # describe() masks the token and URL passwords; redact() also catches a known secret
        # pasted into some other key.
        say(log.redact(f"{line:<{width}}  # {source}"))
    say(f"\n# watching: {_watching(cfg)}")
    for warning in warnings(cfg):
        say(f"\n# warning: {warning}")
    if cfg.store.url.scheme == "s3" and not args.no_store:
        say(log.redact(f"\n# store: {_probe(cfg)}"))
    return 0


def _watching(cfg: config.Config) -> str:
    """Which watch backend ``run`` would use and why; a ConfigError when it is not installed."""
    choice = watch.choose(cfg.watch.backend)
    if choice.backend == "watchdog":
        return f"watchdog ({choice.why}; {watch.watchdog_backend().describe()})"
    return f"{choice.backend} ({choice.why})"


def warnings(cfg: config.Config) -> list[str]:
    """What is valid but unsafe in this config: a person reading ``config check`` must see it."""
    found = []
    if cfg.workspace.mode == "branch":
        # DESIGN.md, trust boundary point 4: branch mode commits on the user's branch, so git
        # reads the workspace's own config, hooks and attributes, and the daemon needs write
        # access there; shadow mode reads the workspace as data and needs only read access.
        found.append("workspace.mode = branch runs git in the workspace: trusted workspaces "
                     "only (it needs write access to the workspace and reads its git config; "
                     "\"shadow\" reads the workspace as data, read-only)")
    return found


def _probe(cfg: config.Config) -> str:
    """Whether the S3 store enforces conditional writes, which split-brain protection rests on."""
    from watcherd.store import open_store

    try:
        store = open_store(cfg.store)
        try:
            honoured = store.probe_conditional_writes(near=f"{cfg.store.key}/manifest.json")
        finally:
            store.close()
    except WatcherdError as exc:
        return f"not checked, the store did not answer: {exc}"
    if honoured:
        return "conditional writes are enforced (split-brain protection holds)"
    return ("conditional writes are IGNORED by this server: split-brain protection is "
            "best-effort (two writers of one key could both win)")
