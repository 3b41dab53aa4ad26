"""The terminal as a service: the ``Terminal`` assembled from its config, the daemon
(signals, sd_notify, scheduler, maintenance), the local API and its HTTP transport, and
the ``tillflow-edge`` commands."""
