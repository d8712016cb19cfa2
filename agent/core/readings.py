"""What a reading may be, wherever it comes from (config, the ingest socket, the outbox): its
topic and its priority range."""

from __future__ import annotations

import re

PRIORITY_MIN, PRIORITY_MAX = -100, 100
_TOPIC = re.compile(r"[A-Za-z0-9_/.\-]{1,128}")


def topic_problem(topic: object) -> str | None:
    """Why ``topic`` is not a valid reading topic, or None when it is."""
    if not isinstance(topic, str):
        return "expected a string"
    if not 1 <= len(topic) <= 128:
        return "expected 1-128 characters"
    if not _TOPIC.fullmatch(topic):
        return "only A-Z a-z 0-9 _ / . - allowed (no spaces, no MQTT wildcards + #)"
    if topic.startswith("/") or topic.endswith("/") or "//" in topic:
        return "no leading, trailing or double slash"
    return None
