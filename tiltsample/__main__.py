"""``python -m tiltsample`` runs the CLI."""

from tiltsample.cli import main

raise SystemExit(main())
