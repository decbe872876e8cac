"""The event exchange: publish, forward, subscribe with filters."""
