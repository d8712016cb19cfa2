"""The ground floor: configuration, the store, supervised tasks, systemd notify, trusted time,
signing and small helpers. Nothing here imports another wing of the agent."""
