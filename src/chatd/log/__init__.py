"""The node's ordered log: its one writer (see ``chatd.log.core``)."""

from chatd.log.core import Log, Port

__all__ = ["Log", "Port"]
