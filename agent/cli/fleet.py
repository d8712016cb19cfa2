"""``simkeeper fleet``: the operator's side. Sign and send commands, watch devices, bridge
telemetry to SORACOM Flux.

    fleet keygen --out DIR                         DIR/operator.key (0600) and operator.pub
    fleet send DEVICE NAME [--arg k=v ...]         sign, publish on cmd, print the cmd/result
    fleet send --all FILE NAME [--arg k=v ...]     the same for every device listed in FILE
    fleet at DEVICE COMMAND [--modem SLOT|--iccid ICCID]  one AT command on a device's modem
    fleet watch [--once]                           the fleet as a table
    fleet dashboard [--listen HOST:PORT] [--device ID]  the fleet as a web page
    fleet flux-bridge --webhook URL                telemetry -> Flux incoming webhook
    fleet simulate N [--broker H:P] [--report]     N agents with simulated modems, this process

``send`` exits 1 when any device refused, failed or did not answer within ``--timeout``, and 3
when the only devices without an answer were offline, their commands held by the broker.
``at`` prints the modem's lines and final result: exit 0 for ``OK``, 1 for an error result, a
refusal or no answer (one line on stderr), 3 when the device is offline (as ``send``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from agent.cli.errors import CliError, UsageError
from agent.fleet.mqtt import FleetError, add_broker_arguments, options_from, parse_broker
from provisioning.files import ProvisionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("keygen", help="the operator's Ed25519 command key pair")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where operator.key (0600) and operator.pub go (created)")

    from agent.commands.args import describe

    p = sub.add_parser("send", help="sign a command, publish it, print the device's result",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="commands and their arguments (--arg KEY=VALUE):\n" + describe())
    p.add_argument("device", nargs="?", metavar="DEVICE", help="device id (or use --all)")
    p.add_argument("name", metavar="NAME", help="command: suspend, resume, get-state, ...")
    p.add_argument("--arg", action="append", default=[], metavar="K=V",
                   help="argument (V as JSON when it parses, @FILE for a file's text)")
    p.add_argument("--all", type=Path, metavar="FILE", help="device ids, one a line")
    _add_sending_arguments(p)
    add_broker_arguments(p)

    p = sub.add_parser("at", help="run one AT command on a device's modem, through its agent;"
                       " print the modem's lines and final result")
    p.add_argument("device", metavar="DEVICE", help="device id")
    p.add_argument("line", metavar="COMMAND", help="one AT command line, e.g. 'AT+CSQ'; the"
                   " device runs only what its [commands] at_allow lists")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--modem", metavar="SLOT", help="the modem in this slot (modem, modem2,"
                        " ...); needed, or --iccid, when the device has several modems")
    target.add_argument("--iccid", metavar="ICCID", help="the modem holding this SIM")
    _add_sending_arguments(p)
    add_broker_arguments(p)

    p = sub.add_parser("watch", help="the fleet from retained status and state: a live table")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    _add_watched_arguments(p)
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="how often the table is redrawn (default 2)")
    add_broker_arguments(p)

    from agent.fleet.dashboard import parse_listen

    p = sub.add_parser("dashboard", help="the fleet as a web page, most urgent first, live")
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8080),
                   metavar="HOST:PORT", help="where the page is served (default 127.0.0.1:8080;"
                   " port 0: any free port)")
    _add_watched_arguments(p)
    add_broker_arguments(p)

    p = sub.add_parser("flux-bridge", help="telemetry to a SORACOM Flux incoming webhook")
    p.add_argument("--webhook", required=True, metavar="URL",
                   help="the Flux incoming webhook each batch is POSTed to")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="an HTTP header for each POST (repeatable), e.g. an API key")
    p.add_argument("--client-id", default=f"simkeeper-flux-bridge-{os.uname().nodename}",
                   help="MQTT client id (default simkeeper-flux-bridge-HOSTNAME)")
    p.add_argument("--group", default="simkeeper-bridge",
                   help="MQTT 5 shared subscription group: bridges in one group share the"
                        " telemetry (default simkeeper-bridge); '' for one bridge on a broker"
                        " without shared subscriptions (MQTT 3.1.1 only, e.g. RabbitMQ 3.x)")
    add_broker_arguments(p)

    p = sub.add_parser("simulate", help="N complete agents with simulated modems in this"
                       " process, against one broker; --report measures it")
    p.add_argument("n", type=int, metavar="N", help="how many agents")
    p.add_argument("--broker", type=parse_broker, default=None, metavar="HOST:PORT",
                   help="default: a local mosquitto on a free port (needed for the storm)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="stop after S seconds (default: Ctrl-C, or the end of --report)")
    p.add_argument("--report", action="store_true",
                   help="measure: messages/s, command round trip, connect storm")
    p.add_argument("--dir", type=Path, help="keep the agents' files here (default: temporary)")
    p.add_argument("--prefix", default="simkeeper", help="topic prefix (default simkeeper)")
    p.add_argument("--poll", type=float, default=300.0, metavar="S",
                   help="modem, keeper and health period per agent (default 300)")
    p.add_argument("--telemetry", type=float, default=60.0, metavar="S",
                   help="one reading per agent every S seconds via ingest (0: none; default 60)")
    p.add_argument("--wave", type=int, default=50, help="agents started per wave (default 50)")
    p.add_argument("--sample", type=int, default=100,
                   help="commands timed one at a time (default 100)")
    p.add_argument("--steady", type=float, default=20.0, metavar="S",
                   help="length of the steady phase measured (default 20)")
    p.add_argument("--down", type=float, default=2.0, metavar="S",
                   help="how long the killed broker stays down (default 2)")


def _add_watched_arguments(p: argparse.ArgumentParser) -> None:
    """Which devices ``watch`` and ``dashboard`` follow."""
    p.add_argument("--device", action="append", default=[], metavar="ID",
                   help="follow this device (repeatable; default: every device). Named devices"
                        " are subscribed by exact topic, which RabbitMQ 3.x needs to serve"
                        " their retained state")
    p.add_argument("--all", type=Path, metavar="FILE",
                   help="follow the devices listed in FILE, one id a line")


def _watched(args: argparse.Namespace) -> list[str]:
    return list(dict.fromkeys([*args.device, *(_listed(args.all) if args.all else [])]))


def _add_sending_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a signed command's trip: ``send`` and ``at``."""
    p.add_argument("--key", type=Path, default=Path(os.environ.get(
        "SIMKEEPER_OPERATOR_KEY", "operator.key")), help="operator private key (PEM; default:"
        " $SIMKEEPER_OPERATOR_KEY, else operator.key)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="how long to wait for each device's result (default 30)")
    p.add_argument("--ttl", type=int, default=300, metavar="S",
                   help="how long the command stays valid, seconds (default 300); a device away"
                        " longer refuses it as expired")
    p.add_argument("--profile", choices=("default", "beam"), default="default",
                   help="the devices' [uplink] profile (default: default). default: the broker"
                        " keeps a command for a device that is offline, and it is not waited"
                        " for (exit 3); beam (no session kept): the command is published"
                        " again, with backoff, until answered, expired or --timeout")


def _devices(args: argparse.Namespace) -> list[str]:
    if (args.all is None) == (args.device is None):
        raise UsageError("give one DEVICE or --all FILE")
    if args.device is not None:
        return [args.device]
    return _listed(args.all)


def _listed(path: Path) -> list[str]:
    """The device ids in ``path``, one a line (blank lines and # comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from None
    devices = [d.strip() for d in lines if d.strip() and not d.lstrip().startswith("#")]
    if not devices:
        raise FleetError(f"{path} lists no device")
    return devices


def _send(args: argparse.Namespace) -> int:
    from agent.commands.args import SCHEMAS
    from agent.fleet.send import parse_arg, send
    from agent.fleet.sign import EnvelopeError
    from provisioning.keys import load_ed25519_private

    devices = _devices(args)
    if args.name not in SCHEMAS:
        raise UsageError(f"unknown command {args.name!r} (known: {', '.join(sorted(SCHEMAS))})")
    try:
        cmd_args = dict(parse_arg(args.name, a) for a in args.arg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    key = load_ed25519_private(args.key, "operator key")
    try:
        outcomes = send(options_from(args), key, devices, args.name, cmd_args,
                        timeout=args.timeout, ttl=args.ttl, profile=args.profile,
                        say=lambda line: print(line, file=sys.stderr, flush=True))
    except EnvelopeError as exc:  # signed before connecting: nothing was sent
        raise UsageError(str(exc)) from None
    for outcome in outcomes:
        print(outcome.line(), flush=True)
    failed = [o for o in outcomes if not o.ok]
    return 0 if not failed else 3 if all(o.queued for o in failed) else 1


def _at(args: argparse.Namespace) -> int:
    from agent.commands.args import ArgError, validate
    from agent.fleet.send import send
    from provisioning.keys import load_ed25519_private

    named = {"modem": args.modem, "iccid": args.iccid}
    try:
        cmd_args = validate("at", {"command": args.line,
                                   **{k: v for k, v in named.items() if v is not None}})
    except ArgError as exc:
        raise UsageError(str(exc)) from None
    key = load_ed25519_private(args.key, "operator key")
    (outcome,) = send(options_from(args), key, [args.device], "at", cmd_args,
                      timeout=args.timeout, ttl=args.ttl, profile=args.profile,
                      say=lambda line: print(line, file=sys.stderr, flush=True))
    res = outcome.result
    if res is None and outcome.queued:
        print(outcome.line(), flush=True)
        return 3
    if res is None:
        raise CliError(1, f"{args.device}: no result within {args.timeout:g} s (--timeout)")
    answer = res.get("detail")
    if res.get("status") != "ok" or not isinstance(answer, dict):
        raise CliError(1, f"{args.device}: {res.get('status')}: {answer}")
    for line in [*answer.get("lines", []), answer.get("final")]:  # from the broker: no escapes
        print("".join(c if c.isprintable() else "?" for c in str(line)), flush=True)
    return 0 if answer.get("final") == "OK" else 1


def _watch(args: argparse.Namespace) -> int:
    from agent.fleet.watch import Watcher

    watcher = Watcher(options_from(args), devices=_watched(args))
    watcher.start()
    try:
        if args.once:
            watcher.settle()
            print(watcher.snapshot())
            return 0
        while True:
            print("\x1b[H\x1b[2J" + watcher.snapshot(), flush=True)
            time.sleep(args.interval)
    finally:
        watcher.stop()


def _dashboard(args: argparse.Namespace) -> int:
    from agent.fleet.dashboard import serve

    serve(options_from(args), args.listen, devices=_watched(args),
          say=lambda line: print(line, flush=True))
    return 0


def _bridge(args: argparse.Namespace) -> int:
    from agent.fleet.flux_bridge import FluxBridge

    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header wants NAME:VALUE, got {item!r}")
        headers[name.strip()] = value.strip()
    if not args.webhook.startswith(("http://", "https://")):
        raise UsageError("--webhook must be an http:// or https:// URL")
    bridge = FluxBridge(options_from(args), args.webhook, client_id=args.client_id,
                        group=args.group, headers=headers)
    bridge.run(threading.Event())
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from provisioning.ca import ed25519_pair
    from provisioning.keys import key_id, load_ed25519_public

    private, public = ed25519_pair(args.out, "operator")
    print(f"{private} {public} key id {key_id(load_ed25519_public(public))}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from agent.fleet.simulate import simulate
    from agent.fleet.simulate_fleet import Options

    if args.n < 1 or args.wave < 1 or args.poll <= 0 or args.telemetry < 0 or args.sample < 0:
        raise UsageError("N and --wave must be >= 1, --poll > 0, --telemetry and --sample >= 0")
    return simulate(Options(
        n=args.n, broker=args.broker, duration=args.duration, report=args.report,
        directory=args.dir, prefix=args.prefix, poll=args.poll, telemetry=args.telemetry,
        wave=args.wave, sample=args.sample, steady=args.steady, down=args.down))


_ACTIONS = {"keygen": _keygen, "send": _send, "at": _at, "watch": _watch, "flux-bridge": _bridge,
            "simulate": _simulate, "dashboard": _dashboard}


def run(args: argparse.Namespace) -> int:
    try:
        return _ACTIONS[args.action](args)
    except (FleetError, ProvisionError) as exc:
        raise CliError(1, str(exc)) from None
