"""``python -m tiltsample`` runs the CLI."""

from tiltsample.app.cli import main

raise SystemExit(main())
