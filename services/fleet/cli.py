"""`mirador fleet build|list`: the fleet builder, pointed at the config's model repository."""

from __future__ import annotations

from services.common.config import load_config
from services.fleet.__main__ import main as fleet_main


def run_fleet_command(args) -> int:
    config = load_config(args.config)
    argv = ["--repository", str(config.model_repository)] if config.model_repository else []
    if args.fleet_command == "list":
        return fleet_main([*argv, "list"])
    argv.append("build")
    for name in args.only or ():
        argv += ["--only", name]
    flags = (("--with-gemma", args.with_gemma), ("--force", args.force), ("--quiet", args.quiet),
             ("--no-specialists", args.no_specialists))
    argv += [flag for flag, on in flags if on]
    if args.data:
        argv += ["--data", str(args.data)]
    return fleet_main(argv)
