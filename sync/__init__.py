"""Tillflow sync package (filled by later issues)."""
