"""Data usage: the modem's and the kernel's counters, metering per SIM and billing period, plan
caps."""
