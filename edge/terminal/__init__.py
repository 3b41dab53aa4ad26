"""The terminal runtime: offline-first payments as durable workflows beside the POS app."""
