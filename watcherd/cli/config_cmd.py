"""``watcherd config check``: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse

from watcherd import config, log


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect the configuration")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="print the effective config and each value's source")
    check.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    # Loading already validated everything: reaching here means the config is usable.
    print(f"# config file: {cfg.file or 'none (defaults and environment only)'}")
    section = None
    rows = config.describe(cfg)
    width = max(len(f"{key.rpartition('.')[2]} = {value}") for key, value, _ in rows)
    for key, value, source in rows:
        sec, _, name = key.rpartition(".")
        if sec != section:
            print(f"\n[{sec}]")
            section = sec
        line = f"{name} = {value}"
        # describe() masks the token and URL passwords; redact() also catches a known secret
        # pasted into some other key.
        print(log.redact(f"{line:<{width}}  # {source}"))
    return 0
