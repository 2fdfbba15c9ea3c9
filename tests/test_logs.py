"""The site's logs (app/logs.py): JSON lines, its own events and the libraries' warnings alike."""

from __future__ import annotations

import json
import logging

from app import logs


def test_our_events_and_a_librarys_warning_are_json_lines(capsys):
    logs.configure("INFO")
    logs.configure("INFO")  # configured again (each app start): still one line per record
    logs.get_logger("audits").info("audit.done", extra={"audit": "a1", "checks": 3})
    logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1': connection refused")
    logging.getLogger("procrastinate.worker").info("not shown: the libraries log warnings and errors only")
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["logger"], e["level"], e["event"]) for e in entries] == [
        ("secure.audits", "info", "audit.done"),
        ("psycopg.pool", "warning", "error connecting in 'pool-1': connection refused")]
    assert entries[0]["audit"] == "a1" and entries[0]["checks"] == 3
