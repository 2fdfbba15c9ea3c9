"""What differs between the store's databases (app/store_sql.py): the SQL translation, rows, logged locations."""

from __future__ import annotations

import pytest

from app.store_sql import Row, postgres_schema, postgres_sql, redacted


def test_the_sql_for_psycopg():
    assert postgres_sql("SELECT * FROM t WHERE a=? AND b LIKE 'x%'") == "SELECT * FROM t WHERE a=%s AND b LIKE 'x%%'"
    assert (postgres_sql("DELETE FROM v WHERE rowid IN (SELECT rowid FROM v ORDER BY rowid LIMIT ?)")
            == "DELETE FROM v WHERE ctid IN (SELECT ctid FROM v ORDER BY ctid LIMIT %s)")
    assert postgres_sql("SELECT rowids, growid FROM t") == "SELECT rowids, growid FROM t"  # whole words only


def test_timestamps_are_double_precision_on_postgresql():
    schema = postgres_schema("CREATE TABLE t (at REAL NOT NULL, seen REAL, realm TEXT, surreal INTEGER)")
    assert schema == ("CREATE TABLE t (at DOUBLE PRECISION NOT NULL, seen DOUBLE PRECISION, realm TEXT,"
                      " surreal INTEGER)")


def test_a_row_reads_as_a_sqlite_row():
    row = Row(("a1", 3), {"id": 0, "n": 1})
    assert (row["id"], row[1], dict(row), list(row), len(row)) == ("a1", 3, {"id": "a1", "n": 3}, ["a1", 3], 2)
    with pytest.raises(KeyError):
        _ = row["missing"]


@pytest.mark.parametrize(("location", "shown"), [
    ("postgresql://app:s3cret@db.internal:5432/site", "postgresql://app:***@db.internal:5432/site"),
    ("postgres://app:p%40ss@db/site?sslmode=require", "postgres://app:***@db/site?sslmode=require"),
    ("postgresql://app@db/site", "postgresql://app@db/site"),
    ("/var/lib/site.db", "/var/lib/site.db"),
])
def test_a_logged_location_never_shows_the_password(location, shown):
    assert redacted(location) == shown
