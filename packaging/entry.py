"""The frozen binary's script: everything else is ``edge.terminal.main``."""

from edge.terminal.main import main

raise SystemExit(main())
