"""``python -m service.cli``: the ``mpq`` command line."""

from service.cli.commands import main

raise SystemExit(main())
