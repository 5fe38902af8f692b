"""``python -m pipelines.emulator``: see ``cli.py``."""

from .cli import main

raise SystemExit(main())
