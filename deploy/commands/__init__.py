"""Pure command builders: settings in, ``Command`` out. Nothing here opens a connection or runs anything."""

from .base import Command, cmd, script, pipe, and_then

__all__ = ["Command", "cmd", "script", "pipe", "and_then"]
