import pytest

from app.verdicts import REASONS, CheckResult, Verdict, escape_bytes, summarize, summarize_audit

O, C, A, I, U, E = (Verdict.OPEN, Verdict.CLOSED, Verdict.AUTH_REQUIRED, Verdict.INCONCLUSIVE,
                    Verdict.UNREACHABLE, Verdict.ERROR)


@pytest.mark.parametrize("rows,expected", [
    ([(O, "delivered"), (C, "relay_denied")], O),
    ([(I, "timeout"), (O, "token_returned")], O),
    ([(I, "greylisted"), (C, "relay_denied")], I),
    ([(E, "internal_error"), (C, "relay_denied")], I),
    ([(I, "sender_rejected"), (C, "relay_denied")], C),
    ([(A, "auth_required"), (U, "refused")], C),
    ([(C, "destination_denied")], C),
    ([(U, "refused"), (U, "filtered")], U),
    ([], U),
    ([(I, "port_open"), (U, "refused")], I),
])
def test_summary_rule(rows, expected):
    assert summarize(rows) is expected


def test_reachability_rows_never_make_a_summary_open():
    rows = [("relay", I, "port_open"), ("relay", U, "refused"), ("proxy", U, "filtered")]
    assert summarize_audit(rows, ["relay", "proxy"]) == {"relay": "inconclusive", "proxy": "unreachable",
                                                         "blocklist": None}


def test_service_not_requested_is_null():
    assert summarize_audit([("relay", C, "relay_denied")], ["relay"]) == {"relay": "closed", "proxy": None, "blocklist": None}


def test_every_reason_has_texts_and_services():
    for code, reason in REASONS.items():
        assert reason.code == code
        assert reason.explanation.strip() and reason.next_step.strip()
        assert set(reason.services) <= {"relay", "proxy", "blocklist"}


def test_design_reason_codes_exist():
    for code in ("delivered accepted_unconfirmed accepts_then_rejects relay_denied greylisted auth_required_for_relay "
                 "starttls_required sender_rejected client_blocked timeout token_returned auth_required "
                 "destination_denied answers_without_tunnel not_a_proxy destination_unreachable refused filtered "
                 "forbidden_address internal_error port_open").split():
        assert code in REASONS


def test_unknown_reason_is_refused():
    with pytest.raises(ValueError):
        CheckResult("relay", "192.0.2.1", 25, "relay.x", Verdict.CLOSED, "made_up")


def test_escape_bytes_makes_remote_input_printable_and_bounded():
    assert escape_bytes(b"220 ok\r\n") == "220 ok\\r\\n"
    assert escape_bytes(b"\x00\x1b[31m\xff") == "\\x00\\x1b[31m\\xff"
    out = escape_bytes(b"A" * 5000, limit=100)
    assert out.startswith("A" * 100) and out.endswith("[4900 more bytes]")


def test_every_reason_a_probe_declares_is_in_the_table():
    from app.probes import proxy, reachability, smtp

    for module in (smtp, proxy, reachability):
        assert set(module.REASONS) <= set(REASONS), module.__name__


def test_the_blocklist_summary_rule():
    from app.verdicts import summarize_blocklist

    L, N = Verdict.LISTED, Verdict.NOT_LISTED
    assert summarize_blocklist([(N, "not_listed"), (L, "listed_spam"), (I, "list_timeout")]) is L
    assert summarize_blocklist([(N, "not_listed"), (I, "list_refused_query")]) is I
    assert summarize_blocklist([(N, "not_listed"), (Verdict.ERROR, "internal_error")]) is I
    assert summarize_blocklist([(N, "not_listed"), (I, "ipv6_not_queried")]) is N  # not asked: not counted
    assert summarize_blocklist([(I, "ipv6_not_queried")]) is U
    assert summarize_blocklist([(U, "forbidden_address")]) is U
    assert summarize_audit([("blocklist", L, "listed_proxy"), ("proxy", Verdict.OPEN, "token_returned")],
                           ["proxy", "blocklist"]) == {"relay": None, "proxy": "open", "blocklist": "listed"}


def test_rows_of_a_service_the_audit_does_not_know_are_left_out_of_the_summary():
    # e.g. an old audit's rows of a service since renamed: they change no summary and break none
    rows = [("relay", "closed", "relay_denied"), ("finger", "open", "whatever")]
    assert summarize_audit(rows, ["relay"]) == {"relay": "closed", "proxy": None, "blocklist": None}
