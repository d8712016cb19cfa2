"""The operator's side (``simkeeper fleet``): sign and send commands, watch devices, bridge
telemetry to SORACOM Flux. Runs on an operator's machine, not on a gateway."""
