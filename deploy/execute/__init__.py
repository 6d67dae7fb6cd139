"""execute layer."""
