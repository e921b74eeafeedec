"""smtprelay: a durable, queueing SMTP relay (the relay process)."""

__version__ = "0.1.0"
