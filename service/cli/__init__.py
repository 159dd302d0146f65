"""The ``mpq`` command line: ``main`` is the console script's entry point (``service.cli.commands``)."""

from service.cli.commands import main

__all__ = ["main"]
