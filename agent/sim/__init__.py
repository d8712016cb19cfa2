"""The SIM keeper and the service terms it keeps: the lifecycle table, activation, network
rejects, suspension, terminal conformance, deadline alarms, the factory manifest, decommission."""
