"""`lmpipe` command: project chores that are not pipeline stages."""

from __future__ import annotations

import argparse
import sys

from lmpipe.config import compose_params, find_project_root, stale_params_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser(
        "params", help="compose params.yaml from conf/ (as dvc exp run does)"
    )
    params.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama-125m")
    commands.add_parser("check-params", help="exit 1 if params.yaml is stale with respect to conf/")
    args = parser.parse_args(argv)

    root = find_project_root()
    if args.command == "params":
        path = compose_params(root, args.overrides)
        print(f"wrote {path}")
        return 0
    message = stale_params_message(root)
    if message:
        print(message, file=sys.stderr)
        return 1
    print("params.yaml is up to date with conf/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
