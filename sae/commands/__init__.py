"""One module per `sae` subcommand: each wires the packages together for that job (imported lazily by the CLI)."""
