"""One module per `prefix-router` subcommand: each has `add_parser(subparsers)` and `run(args)`."""
