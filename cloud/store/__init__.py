"""The control plane's persistence: the engine's Store on PostgreSQL."""
