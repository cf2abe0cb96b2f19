"""Integrations with inference servers (each imports its server only when used)."""
