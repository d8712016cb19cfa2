"""Everything the simulated modem remembers: SIM slots, network, radio, PDP, counters, SMS,
temperature.

Plain dataclasses; the rules that change them live in the engine and the handlers.
``power_on()`` gives the state a modem has right after (re)boot, keeping what survives a
reboot (the SIM cards, the network around them, the selected slot, stored SMS).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SIM_STATES = ("ready", "pin-required", "puk-required", "absent")
NETWORK_STATES = ("home", "roaming", "searching", "denied", "not-registered")
# 27.007 +CREG/+CGREG/+CEREG <stat>
STAT_CODE = {"not-registered": 0, "home": 1, "searching": 2, "denied": 3, "roaming": 5}


@dataclass
class Sim:
    state: str = "ready"  # as configured: "pin-required" means the PIN lock is enabled
    iccid: str = "8981100005819480014"
    imsi: str = "295050912345678"
    pin: str = "1234"
    puk: str = "12345678"
    msisdn: str = "+818012345678"
    # runtime
    lock: str = "none"  # "none" | "pin" | "puk"
    pin_attempts: int = 3
    busy_until: float = 0.0

    @property
    def present(self) -> bool:
        return self.state != "absent"

    def power_on(self) -> None:
        if self.state == "puk-required" or self.lock == "puk":
            self.lock = "puk"
        elif self.state == "pin-required":
            self.lock = "pin"
        else:
            self.lock = "none"

    @property
    def unlocked(self) -> bool:
        return self.present and self.lock == "none"


@dataclass
class Network:
    state: str = "roaming"
    reject_cause: int | None = None
    mcc: str = "440"
    mnc: str = "10"
    operator: str = "NTT DOCOMO"
    short_name: str = "DOCOMO"
    act: int = 7  # 27.007 <AcT>: 7 E-UTRAN (LTE and LTE-M), 9 NB-IoT
    tac: int = 0x1A2B
    cell_id: int = 0x01A2D0F3  # 28-bit E-UTRAN cell identity
    pci: int = 123
    earfcn: int = 100
    band: int = 1
    bandwidth: int = 5  # 0..5 = 1.4/3/5/10/15/20 MHz (Quectel and SIMCom code)
    tz_quarters: int = 36  # JST, +9 h


@dataclass
class SimSlot:
    """One SIM holder: the card in it and the network as that card meets it (its operator, its
    registration, its reject cause: a suspended card is refused where another is welcome)."""

    sim: Sim = field(default_factory=Sim)
    network: Network = field(default_factory=Network)


def second_slot(network: Network) -> SimSlot:
    """A dual-SIM modem's second holder as shipped: empty (a scenario's ``sim2`` inserts a
    card, this identity unless it says otherwise), under the same ``network`` as the first."""
    card = Sim(state="absent", iccid="8981100005819480022", imsi="295050912345679",
               msisdn="+818012345679")
    return SimSlot(card, replace(network))


@dataclass
class Signal:
    rssi_dbm: int = -67
    rsrp_dbm: int = -95
    rsrq_db: int = -10
    sinr_db: int = 12


@dataclass
class Pdp:
    cid: int
    pdp_type: str = "IP"
    apn: str = ""
    active: bool = False
    address: str = "10.160.23.45"


@dataclass
class Traffic:
    """Bytes through the data path. Totals since power-on; session since the last activation;
    ``reset_*`` mark what a vendor counter reset (``AT+QGDCNT=0``) took away."""

    sent_total: float = 0.0
    recv_total: float = 0.0
    sent_session: float = 0.0
    recv_session: float = 0.0
    sent_mark: float = 0.0
    recv_mark: float = 0.0
    up_bps: float = 0.0
    down_bps: float = 0.0
    accrued_at: float = 0.0

    def add(self, up: float, down: float) -> None:
        self.sent_total += up
        self.recv_total += down
        self.sent_session += up
        self.recv_session += down

    def power_on(self, now: float) -> None:
        self.sent_total = self.recv_total = 0.0
        self.sent_session = self.recv_session = 0.0
        self.sent_mark = self.recv_mark = 0.0
        self.accrued_at = now


@dataclass
class Sms:
    index: int
    sender: str
    text: str
    timestamp: str  # "yy/MM/dd,hh:mm:ss+zz"
    read: bool = False

    @property
    def stat(self) -> str:
        return "REC READ" if self.read else "REC UNREAD"


@dataclass
class ModemState:
    slots: list[SimSlot] = field(default_factory=lambda: [SimSlot()])
    active_slot: int = 1  # 1-based; a vendor setting kept in NV, so it survives reboots
    signal: Signal = field(default_factory=Signal)
    traffic: Traffic = field(default_factory=Traffic)
    sms: dict[int, Sms] = field(default_factory=dict)
    sms_capacity: int = 255
    apn: str = "soracom.io"
    temperature_c: int = 38  # the module's hottest sensor, °C; kept across reboots
    # reset at every power-on
    radio: int = 1
    echo: bool = True
    verbose: bool = True
    cmee: int = 1
    reg_modes: dict[str, int] = field(default_factory=dict)  # "+CREG" -> n
    cops_format: int = 0
    cops_deregistered: bool = False
    ctzu: int = 0
    clock_offset: float = 0.0  # seconds added to wall time by AT+CCLK=
    pdp: dict[int, Pdp] = field(default_factory=dict)
    cmgf: int = 0
    cnmi: tuple[int, int] = (2, 1)
    sms_storage: str = "ME"
    switching_slot: bool = False  # between dropping the old card and reading the new one

    @property
    def sim(self) -> Sim:
        """The card in the active slot."""
        return self.slots[self.active_slot - 1].sim

    @property
    def network(self) -> Network:
        """The network as the active slot's card meets it."""
        return self.slots[self.active_slot - 1].network

    def power_on(self, now: float, cmee_default: int, radio: int = 1) -> None:
        self.sim.power_on()
        self.traffic.power_on(now)
        self.radio = radio
        self.echo = True
        self.verbose = True
        self.cmee = cmee_default
        self.reg_modes = {"+CREG": 0, "+CGREG": 0, "+CEREG": 0}
        self.cops_format = 0
        self.cops_deregistered = False
        self.ctzu = 0
        self.clock_offset = 0.0
        self.pdp = {1: Pdp(cid=1, apn=self.apn)}
        self.cmgf = 0
        self.cnmi = (2, 1)

    def reg_stat(self) -> int:
        """The 27.007 registration <stat> the modem reports now."""
        if (self.radio != 1 or not self.sim.unlocked or self.cops_deregistered
                or self.switching_slot):
            return 0
        return STAT_CODE[self.network.state]

    @property
    def attached(self) -> bool:
        return self.reg_stat() in (1, 5)
