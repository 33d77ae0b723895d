"""`lmpipe` command: project chores that are not pipeline stages."""

from __future__ import annotations

import argparse
import sys

from lmpipe.runs.config import compose_params, find_project_root, stale_params_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser(
        "params", help="compose params.yaml from conf/ (as dvc exp run does)"
    )
    params.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama-125m")
    commands.add_parser("check-params", help="exit 1 if params.yaml is stale with respect to conf/")
    lineage_cmd = commands.add_parser(
        "lineage", help="print the chain of runs and data from the raw corpus to a run or model"
    )
    lineage_cmd.add_argument(
        "reference", help="an MLflow run id, models:/<name>/<version> or models:/<name>@<alias>"
    )
    commands.add_parser(
        "replay", help="send the MLflow writes saved while the tracking store was unreachable"
    )
    serve_cmd = commands.add_parser(
        "serve", help="serve a model behind the OpenAI API (/v1/chat/completions, /v1/models)"
    )
    serve_cmd.add_argument("model", help="models:/<name>@<alias>, models:/<name>/<version>, "
                           "runs:/<run id>/<path>, a run id, or a model directory")  # fmt: skip
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    if args.command == "serve":
        from lmpipe.deploy.openai_server import ServeError, serve

        try:
            serve(args.model, args.host, args.port)
        except ServeError as err:
            print(f"lmpipe serve: {err}", file=sys.stderr)
            return 1
        return 0

    if args.command == "replay":
        from lmpipe.runs import tracking

        tracking.configure()
        saved = tracking.project_outbox()
        runs = len(saved.pending())
        delivered = saved.replay()
        print(f"replayed {delivered} of {runs} saved runs to {tracking.tracking_uri()}")
        return 0 if delivered == runs else 1
    if args.command == "lineage":
        from lmpipe.runs import lineage, tracking

        tracking.configure()
        try:
            print(lineage.lineage_text(args.reference))
        except ValueError as err:
            print(f"lmpipe lineage: {err}", file=sys.stderr)
            return 1
        return 0

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
