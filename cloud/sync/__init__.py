"""The sync service's PostgreSQL tables and their backend (``PostgresSyncBackend``)."""

from cloud.sync.postgres import PostgresSyncBackend

__all__ = ["PostgresSyncBackend"]
