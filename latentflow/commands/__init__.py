"""Subcommands of the `latentflow` CLI, one module each (see `latentflow.cli`)."""
