"""Modem drivers: AT codec, channel, vendor profiles, hotplug and the modem simulator."""
