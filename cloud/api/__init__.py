"""The control plane's HTTP API: the sync service's routes (``create_app``)."""

from cloud.api.app import create_app

__all__ = ["create_app"]
