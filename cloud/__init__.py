"""Tillflow cloud package (filled by later issues)."""
