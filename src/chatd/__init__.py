"""chatd: an instant-messaging server speaking the Go IM websocket protocol."""

__version__ = "0.1.0"
