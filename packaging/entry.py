"""The frozen binary's script: everything else is ``sync.device.main``."""

from sync.device.main import main

raise SystemExit(main())
