"""A reading's way: the ingest socket, the durable outbox, batches and pacing, the drain, the MQTT
and HTTP uplinks, events and the agent's own health readings."""
