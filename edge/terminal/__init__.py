"""The terminal runtime: offline-first payments as durable workflows beside the POS app."""

from edge.terminal import moved

# Old module paths (before the split into drivers, sale, service) stay importable, for
# the definition snapshots of runs in flight across an upgrade: edge/terminal/moved.py.
moved.install()
