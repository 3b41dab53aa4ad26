"""The terminal's hardware and acquirer: the ports its steps talk to (``contracts``) and
the HTTP drivers that implement them (``acquirer_http``, ``devices_http``)."""
