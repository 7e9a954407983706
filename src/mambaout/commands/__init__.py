"""One module per `mambaout` subcommand, each with `main(argv=None) -> int`."""
