"""Message brokers behind one interface, chosen by URL (``memory://`` embedded)."""

from server.broker.base import Broker, Delivery, open_broker

__all__ = ["Broker", "Delivery", "open_broker"]
