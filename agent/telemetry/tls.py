"""The uplink's TLS and credentials, and what a failed handshake means in words.

One ``ssl.SSLContext`` for the MQTT session and the activation probe (agent.telemetry.probe):
the broker's certificate checked against ``uplink.ca`` with its host name, the device's own
certificate offered when ``uplink.cert`` is set.

A TLS failure reaches us as OpenSSL's reason (``TLSV1_ALERT_UNKNOWN_CA``,
``certificate verify failed: certificate has expired``, ...) on whichever side noticed it: our
check of the broker fails the handshake here, while the broker's refusal of our certificate
arrives as an alert, during the handshake in TLS 1.2 or on the first read after it in TLS 1.3
(paho then reports only "closed before CONNACK"). :func:`explain` turns the reason into what a
technician can act on; the uplink logs it and ``status`` shows it as the uplink's last error.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.telemetry.drain import UplinkSettings

# (words in OpenSSL's reason, what it means); the first that matches wins.
_REASONS = (
    ("alert_unknown_ca", "the broker does not trust this device's certificate "
                         "(unknown CA: issued by another CA than the broker's)"),
    ("alert_certificate_expired", "the broker refused this device's certificate: it has expired"),
    ("alert_certificate_revoked", "the broker refused this device's certificate: it is revoked"),
    ("alert_certificate_required", "the broker requires a client certificate "
                                   "(set uplink.cert and uplink.key)"),
    ("alert_bad_certificate", "the broker refused this device's certificate (bad certificate)"),
    ("alert_certificate_unknown", "the broker refused this device's certificate"),
    ("alert_handshake_failure", "the broker refused the TLS handshake "
                                "(no common protocol version or cipher)"),
    ("alert_protocol_version", "the broker refused the TLS version"),
    ("hostname mismatch", "the broker's certificate does not name the host in uplink.host "
                          "(hostname mismatch)"),
    ("ip address mismatch", "the broker's certificate does not name the address in uplink.host "
                            "(IP address mismatch)"),
    ("certificate has expired", "the broker's certificate has expired"),
    ("certificate is not yet valid", "the broker's certificate is not yet valid "
                                     "(is the clock right?)"),
    ("self-signed certificate", "the broker's certificate is not signed by the CA in uplink.ca "
                                "(unknown CA)"),
    ("unable to get local issuer", "the broker's certificate is not signed by the CA in "
                                   "uplink.ca (unknown CA)"),
    ("wrong version number", "the broker's port does not speak TLS (plain MQTT on uplink.port?)"),
)


def client_context(settings: UplinkSettings) -> ssl.SSLContext:
    """The context for ``settings`` (``tls`` set): a file it names that cannot be read raises
    OSError, and one that is not a certificate or key ``ssl.SSLError``."""
    context = ssl.create_default_context(cafile=_str(settings.ca))
    if settings.cert:
        context.load_cert_chain(str(settings.cert), _str(settings.key))
    return context


def credentials(settings: UplinkSettings) -> tuple[str | None, str | None]:
    """(username, password): the password is the first line of ``password_file``."""
    if not settings.username:
        return None, None
    password = (Path(settings.password_file).read_text().strip()
                if settings.password_file else None)
    return settings.username, password


def explain(error: BaseException | str) -> str | None:
    """What a TLS failure means, or None when ``error`` is not one we know."""
    text = str(error).lower()
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        text += " " + error.verify_message.lower()
    for words, meaning in _REASONS:
        if words in text:
            return meaning
    return None


def describe(error: BaseException | str) -> str:
    """``error`` for a log line and ``status``: its meaning first when it is a known TLS
    failure, OpenSSL's own words after."""
    raw = str(error) or type(error).__name__
    meaning = explain(error)
    return f"{meaning} [{raw}]" if meaning else raw


def _str(path: object) -> str | None:
    return None if path is None else str(path)
