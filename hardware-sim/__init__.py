"""Simulated terminal hardware (filled by later issues)."""
