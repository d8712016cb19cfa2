"""Fleet figures: ``simkeeper fleet simulate N --report`` for N = 100, then N = 1000.

Each agent is a complete daemon (store, outbox, uplink, SIM keeper, command processor, modem
session) with its own simulated modem on its own pty, all on one asyncio loop in this process,
against a local mosquitto (agent.fleet.simulate). Printed per N:

- start-up: time, agents online, open files per agent, threads, RSS;
- (c) a steady phase: broker messages per second ($SYS received/sent, and by topic), CPU;
- (b) signed get-state round trips, one at a time and to every device at once;
- (a) the connect storm after a broker SIGKILL and restart: reconnect spread and histogram.

N = 1000 runs only when N = 100 suggests it finishes within about three minutes here, and
when the open-files limit fits it. Printed, never asserted.
"""

from __future__ import annotations

import time

from agent.fleet.localbroker import BrokerError, mosquitto_binary
from agent.fleet.mqtt import FleetError
from agent.fleet.simulate import simulate
from agent.fleet.simulate_fleet import Options

SIZES = (100, 1000)
BUDGET = 180.0  # seconds for the largest size, roughly


def main() -> None:
    try:
        mosquitto_binary()
    except BrokerError as exc:
        print(f"skipped: {exc}")
        return
    took: dict[int, float] = {}
    for n in SIZES:
        if took:
            small, seconds = max(took.items())
            # start-up grows with N, the measured phases do not: scale the first only
            guess = seconds + (n / small - 1) * seconds * 0.35
            if guess > BUDGET * 1.5:
                print(f"N={n}: skipped (N={small} took {seconds:.0f} s; about {guess:.0f} s"
                      f" expected, over the {BUDGET:.0f} s budget)")
                continue
        print(f"== N={n}", flush=True)
        t0 = time.perf_counter()
        try:
            status = simulate(Options(n=n, report=True, steady=20.0, sample=100))
        except FleetError as exc:
            print(f"N={n}: not run: {exc}", flush=True)
            continue
        took[n] = time.perf_counter() - t0
        print(f"   (N={n} took {took[n]:.0f} s in all; exit {status})", flush=True)


if __name__ == "__main__":
    main()
