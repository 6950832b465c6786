"""``python -m clients``: see clients/cli.py."""

from clients.cli import main

raise SystemExit(main())
