"""The sans-IO AT codec: framing, URC vs reply, echo, prompt, and property tests
(one byte at a time, noise, arbitrary bytes)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.at import (
    AtCodec,
    Discarded,
    Echo,
    Event,
    Final,
    Info,
    Noise,
    Prompt,
    Urc,
    response_prefixes,
    split_fields,
)


def run(command: str | None, data: bytes, *, chunk: int = 0, **kw: bool) -> list[Event]:
    codec = AtCodec()
    if command is not None:
        codec.send(command, **kw)  # type: ignore[arg-type]
    if chunk:
        for i in range(0, len(data), chunk):
            codec.receive_data(data[i:i + chunk])
    else:
        codec.receive_data(data)
    return codec.events()


def test_reply_without_blank_lines() -> None:
    assert run("AT+CPIN?", b"\r\n+CPIN: SIM PIN\r\nOK\r\n") == [
        Info("+CPIN: SIM PIN"), Final("OK", "ok")]


def test_bare_lf_and_cr_cr_lf() -> None:
    assert run("AT+CSQ", b"\n+CSQ: 9,99\n\nOK\n") == [Info("+CSQ: 9,99"), Final("OK", "ok")]
    assert run(None, b"\r\r\n+CRING: VOICE\r\r\n") == [Urc("+CRING: VOICE")]


def test_error_finals() -> None:
    cases = {
        b"\r\n+CME ERROR:58\r\n": Final("+CME ERROR:58", "cme", "58"),
        b"\r\n+CME ERROR: SIM not inserted\r\n": Final("+CME ERROR: SIM not inserted", "cme",
                                                      "SIM not inserted"),
        b"\r\n+CMS ERROR: 500\r\n": Final("+CMS ERROR: 500", "cms", "500"),
        b"\r\nNO CARRIER\r\n": Final("NO CARRIER", "call"),
        b"\r\nBUSY\r\n": Final("BUSY", "call"),
        b"\r\nNO ANSWER\r\n": Final("NO ANSWER", "call"),
        b"\r\nNO DIALTONE\r\n": Final("NO DIALTONE", "call"),
        b"\r\nABORTED\r\n": Final("ABORTED", "error"),
        b"\r\nCONNECT 150000000\r\n": Final("CONNECT 150000000", "connect", "150000000"),
    }
    for data, final in cases.items():
        assert run("ATD*99#", data) == [final], data


def test_registration_urc_vs_reply_by_command_and_shape() -> None:
    assert run("AT+CSQ", b"\r\n+CREG: 1, 5C9, 39E5\r\n+CSQ: 20,99\r\n\r\nOK\r\n") == [
        Urc("+CREG: 1, 5C9, 39E5"), Info("+CSQ: 20,99"), Final("OK", "ok")]
    assert run("AT+CREG?",
               b'\r\n+CREG: 1,"17E0","00359D48",7\r\n+CREG: 2,1,"CE00","01CEAD8F"\r\n\r\nOK\r\n'
               ) == [Urc('+CREG: 1,"17E0","00359D48",7'), Info('+CREG: 2,1,"CE00","01CEAD8F"'),
                     Final("OK", "ok")]
    # A set command has no +CREG answer: the line is unsolicited.
    assert run("AT+CREG=2", b"\r\n+CREG: 5\r\n\r\nOK\r\n") == [Urc("+CREG: 5"),
                                                              Final("OK", "ok")]
    # +CEREG read with reject cause fields (n=3): seven fields, solicited.
    body = b'\r\n+CEREG: 3,3,"1A2B","01A2B3C4",7,0,7\r\n\r\nOK\r\n'
    assert run("AT+CEREG?", body)[0] == Info('+CEREG: 3,3,"1A2B","01A2B3C4",7,0,7')


def test_echo_on_and_off() -> None:
    assert run("AT+CGSN", b"AT+CGSN\r\r\n866758040000008\r\n\r\nOK\r\n") == [
        Echo("AT+CGSN"), Info("866758040000008"), Final("OK", "ok")]
    assert run("AT+CGSN", b"\r\n866758040000008\r\n\r\nOK\r\n") == [
        Info("866758040000008"), Final("OK", "ok")]


def both_ways(command: str, data: bytes) -> list[Event]:
    """The events of ``data`` fed whole, checked equal to those of one byte at a time."""
    whole = run(command, data)
    assert run(command, data, chunk=1) == whole
    return whole


def test_echo_is_only_the_command_sent() -> None:
    # Echo off and the reply's leading CRLF missing: the first line is the answer, not echo.
    assert both_ways("AT+CSQ", b"+CSQ: 20,99\r\n\r\nOK\r\n") == [
        Info("+CSQ: 20,99"), Final("OK", "ok")]
    assert both_ways("AT+CSQ", b"+CSQ: 20,99\r\nOK\r\n") == [
        Info("+CSQ: 20,99"), Final("OK", "ok")]
    assert both_ways("AT+CPIN?", b"OK\r\n") == [Final("OK", "ok")]
    assert both_ways("AT+CSQ", b'+CREG: 1,"5C9","39E5"\r\n+CSQ: 9,99\r\n\r\nOK\r\n') == [
        Urc('+CREG: 1,"5C9","39E5"'), Info("+CSQ: 9,99"), Final("OK", "ok")]
    # The echo is the command as written, whatever the case and blanks around it.
    assert both_ways("AT+CGSN", b"at+cgsn \r\r\n866758040000008\r\n\r\nOK\r\n") == [
        Echo("at+cgsn "), Info("866758040000008"), Final("OK", "ok")]
    # Another command's text is not this command's echo.
    assert both_ways("AT+CSQ", b"AT+CGSN\r\n\r\nOK\r\n") == [
        Noise("AT+CGSN"), Final("OK", "ok")]


def test_line_noise_before_a_reply_is_neither_echo_nor_answer() -> None:
    assert both_ways("AT+CGMI", b"x\x93#q\r\n\r\nQuectel\r\n\r\nOK\r\n") == [
        Noise("x#q"), Info("Quectel"), Final("OK", "ok")]
    # Noise that came before the command was sent ends up in the same first line.
    codec = AtCodec()
    codec.receive_data(b"\xfe~z")
    codec.send("AT+CGMM")
    codec.receive_data(b"\r\nEC25\r\n\r\nOK\r\n")
    assert codec.events() == [Noise("~z"), Info("EC25"), Final("OK", "ok")]
    # Once a line break came, a bare line is an answer line (ATI, +CGSN print bare lines).
    assert both_ways("AT+CGMI", b"\r\nQuectel\r\n\r\nOK\r\n") == [
        Info("Quectel"), Final("OK", "ok")]


def test_banner_and_bare_urcs_inside_a_reply() -> None:
    assert run("AT+CGMR", b"\r\nRING\r\n\r\nRDY\r\n") == [Urc("RING"), Urc("RDY", banner=True)]


def test_prompt_only_when_the_command_waits_for_one() -> None:
    assert run('AT+CMGS="123"', b"\r\n> ", prompt=True) == [Prompt()]
    assert run("AT+CSQ", b"\r\n> \r\n") == [Info("> ")]


def test_lines_after_the_final_are_urcs() -> None:
    assert run("AT", b"\r\nOK\r\n\r\n+CMTI: \"ME\",1\r\n") == [
        Final("OK", "ok"), Urc('+CMTI: "ME",1')]


def test_overlong_line_is_discarded_not_buffered_forever() -> None:
    codec = AtCodec(max_line=64)
    codec.send("AT+CSQ")
    codec.receive_data(b"\r\n" + b"x" * 200 + b"\r\n+CSQ: 1,2\r\nOK\r\n")
    events = codec.events()
    assert any(isinstance(e, Discarded) for e in events)
    assert events[-2:] == [Info("+CSQ: 1,2"), Final("OK", "ok")]


def test_abort_turns_late_lines_into_urcs() -> None:
    codec = AtCodec()
    codec.send("AT+COPS=?")
    codec.receive_data(b"\r\n")
    codec.abort()
    codec.receive_data(b"+COPS: (2,\"X\",\"X\",\"44010\",7)\r\nOK\r\n")
    assert codec.events() == [Urc('+COPS: (2,"X","X","44010",7)'), Final("OK", "ok")]


def test_helpers() -> None:
    assert response_prefixes("AT+CICCID") == ("+ICCID",)
    assert response_prefixes('AT+QENG="servingcell"') == ("+QENG",)
    assert response_prefixes("AT^ICCID?") == ("^ICCID",)
    assert response_prefixes("ATI") == ("+GCAP",)
    assert response_prefixes("AT+CGSN") == ("+CGSN",)
    assert split_fields('1,"a,b",(0-2),,x') == ["1", '"a,b"', "(0-2)", "", "x"]


# -- properties ------------------------------------------------------------------------------
info_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                    min_size=1, max_size=40).filter(lambda s: s.strip() != "")
finals = st.sampled_from([b"OK", b"ERROR", b"+CME ERROR: 10", b"+CMS ERROR: 321",
                          b"NO CARRIER", b"+CME ERROR:58"])


@st.composite
def replies(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    lines = draw(st.lists(info_text, max_size=5))
    body = b"".join(b"\r\n+X: " + ln.encode() + b"\r\n" for ln in lines)
    return [b"+X: " + ln.encode() for ln in lines], body + b"\r\n" + draw(finals) + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(replies(), st.integers(min_value=1, max_value=7))
def test_reply_without_its_leading_line_break_loses_no_line(
        reply: tuple[list[bytes], bytes], chunk: int) -> None:
    lines, wire = reply
    unframed = wire.removeprefix(b"\r\n")
    events = run("AT+X", unframed, chunk=chunk)
    assert events == run("AT+X", unframed)
    assert [e.text.encode() for e in events if isinstance(e, Info)] == lines
    assert not any(isinstance(e, Echo | Noise) for e in events)


@settings(max_examples=300, deadline=None)
@given(replies(), st.integers(min_value=1, max_value=7))
def test_chunking_never_changes_the_events(reply: tuple[list[bytes], bytes],
                                           chunk: int) -> None:
    _, wire = reply
    assert run("AT+X", wire, chunk=chunk) == run("AT+X", wire)


@settings(max_examples=300, deadline=None)
@given(st.lists(replies(), min_size=1, max_size=4),
       st.lists(st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b),
                min_size=4, max_size=4))
def test_noise_between_frames_never_loses_a_final(
        frames: list[tuple[list[bytes], bytes]], noise: list[bytes]) -> None:
    codec = AtCodec()
    seen: list[Final] = []
    for (_, wire), junk in zip(frames, noise, strict=False):
        codec.send("AT+X")
        for b in junk + wire:
            codec.receive_data(bytes([b]))
        seen += [e for e in codec.events() if isinstance(e, Final)]
    expected = [wire.rsplit(b"\r\n", 2)[-2].decode() for _, wire in frames]
    it = iter(f.text for f in seen)
    assert all(any(text == want.strip() for text in it) for want in expected)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, in_flight: bool) -> None:
    events = run("AT+CSQ" if in_flight else None, data, chunk=3)
    assert all(isinstance(e, Echo | Info | Final | Urc | Prompt | Discarded | Noise)
               for e in events)
