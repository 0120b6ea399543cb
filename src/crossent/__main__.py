"""``python -m crossent``: the command line."""

from .cli import main

raise SystemExit(main())
