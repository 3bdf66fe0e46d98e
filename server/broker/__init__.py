"""Message brokers behind one interface, chosen by URL (``memory://`` embedded, ``amqp://`` RabbitMQ)."""

from server.broker.base import Broker, BrokerError, Delivery, open_broker, redact_url

__all__ = ["Broker", "BrokerError", "Delivery", "open_broker", "redact_url"]
