"""``python -m opensearch_tasks.emulator``: see ``cli.py``."""

from .cli import main

raise SystemExit(main())
