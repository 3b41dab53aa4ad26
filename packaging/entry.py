"""The frozen binary's script: everything else is ``edge.terminal.service.main``."""

from edge.terminal.service.main import main

raise SystemExit(main())
