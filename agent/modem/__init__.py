"""The agent's side of a modem: one session per AT port (open, initialise, re-initialise after a
reset, re-open after the port vanishes, poll)."""
