"""`switchyard usage` and `switchyard billing statement`: the admin API's
usage and statement operations from the shell (deploy/admin_cli.py sends
them with the admin key and prints the answer: JSON, or CSV as served)."""

from __future__ import annotations

import argparse
from urllib.parse import quote, urlencode

from scheduler.admin_api import PREFIX

BILLING_COMMANDS = ("usage", "billing")


def add_parsers(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                common: argparse.ArgumentParser) -> None:
    usage = sub.add_parser("usage", parents=[common],
                           help="usage by time range, grouped (tenant keys: their own)")
    usage.add_argument("--tenant", help="only this tenant id (platform admins; default: all)")
    usage.add_argument("--from", dest="from_", metavar="FROM",
                       help="ISO 8601 or unix seconds (default: 24 h before --to)")
    usage.add_argument("--to", help="exclusive end (default: now)")
    usage.add_argument("--group-by", default="",
                       help="comma list of model, key and one of day, hour, minute")
    usage.add_argument("--format", choices=("json", "csv"), default="json")
    billing = sub.add_parser("billing", help="monthly statements")
    action = billing.add_subparsers(dest="action", required=True)
    statement = action.add_parser("statement", parents=[common],
                                  help="a tenant's statement for one month (UTC)")
    statement.add_argument("--tenant", required=True, help="tenant id")
    statement.add_argument("--month", required=True, help="YYYY-MM")
    statement.add_argument("--format", choices=("json", "csv"), default="json")


def request_path(args: argparse.Namespace) -> str:
    """The GET path (with its query) of a usage or billing command."""
    if args.command == "usage":
        given = {"tenant_id": args.tenant, "from": args.from_, "to": args.to,
                 "group_by": args.group_by, "format": args.format}
        return f"{PREFIX}/usage?" + urlencode({k: v for k, v in given.items() if v})
    return (f"{PREFIX}/tenants/{quote(args.tenant, safe='')}/statements/"
            f"{quote(args.month, safe='')}?format={args.format}")
