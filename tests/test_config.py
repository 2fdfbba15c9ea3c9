import pytest
from pydantic import ValidationError

from app.config import DEFAULT_PROXY_PORTS, Settings, parse_listen


def test_defaults_match_the_design():
    s = Settings(_env_file=None)
    assert s.database_url == "sqlite:///./var/secure-your-server.db"
    assert s.relay_ports == [25, 587, 465]
    assert s.proxy_ports == DEFAULT_PROXY_PORTS == [23, 80, 443, 1080, 3128, 6588, 8000, 8080, 8118, 8123, 8888, 9050]
    assert s.allow_networks == [] and s.trusted_proxies == []
    assert s.max_connections_per_host == 3


def test_lists_from_environment_comma_or_json(monkeypatch):
    monkeypatch.setenv("SECURE_RELAY_PORTS", "25, 2525")
    monkeypatch.setenv("SECURE_PROXY_PORTS", "[3128, 8080]")
    monkeypatch.setenv("SECURE_ALLOW_NETWORKS", "127.0.0.0/8,::1")
    monkeypatch.setenv("SECURE_TRUSTED_PROXIES", "")
    s = Settings()
    assert s.relay_ports == [25, 2525]
    assert s.proxy_ports == [3128, 8080]
    assert s.allow_networks == ["127.0.0.0/8", "::1/128"]
    assert s.trusted_proxies == []


@pytest.mark.parametrize("name,value", [
    ("SECURE_RELAY_PORTS", "0"), ("SECURE_RELAY_PORTS", "70000"), ("SECURE_RELAY_PORTS", "smtp"),
    ("SECURE_ALLOW_NETWORKS", "not-a-network"), ("SECURE_SINK_LISTEN", "127.0.0.1"),
    ("SECURE_SINK_LISTEN", "::1:25"), ("SECURE_MAX_CONNECTIONS_PER_HOST", "0"),
    ("SECURE_LIMITS_STORAGE", "memcached://127.0.0.1:11211"), ("SECURE_LIMITS_STORAGE", "localhost:6379"),
])
def test_bad_settings_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises((ValidationError, ValueError)):
        Settings()


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), ("0.0.0.0:25", ("0.0.0.0", 25)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


def test_database_urls_sqlite_or_postgresql():
    assert Settings(database_url="sqlite:////tmp/x.db").sqlite_path == "/tmp/x.db"
    assert Settings(database_url="sqlite:////tmp/x.db").database_location == "/tmp/x.db"
    with pytest.raises(ValueError):
        _ = Settings(database_url="postgresql://x/y").sqlite_path
    for url in ("postgresql://u:p@db:5432/site", "postgres://u@db/site?sslmode=require"):
        assert Settings(database_url=url).database_location == url
    for bad in ("mysql://u:p@db/site", "sqlite://relative.db", "sqlite:///", "postgresql://", "x.db"):
        with pytest.raises(ValidationError):
            Settings(database_url=bad)
    assert Settings().database_pool_size == 5
    with pytest.raises(ValidationError):
        Settings(database_pool_size=0)


def test_public_url_must_be_a_bare_origin():
    assert Settings(public_url="https://audit.example.org/").public_url == "https://audit.example.org"
    for bad in ("ftp://x", "https://x/path", "javascript:alert(1)", "https://"):
        with pytest.raises(ValidationError):
            Settings(public_url=bad)


def test_forwarded_header_choice():
    assert Settings(forwarded_header="Forwarded").forwarded_header == "forwarded"
    with pytest.raises(ValidationError):
        Settings(forwarded_header="x-real-ip")


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`SECURE_{name.upper()}`" in readme, name


@pytest.mark.parametrize("value", ["probe", "probe.example.org\r\nRCPT TO:<x@y>", "a b.example", "-x.example", ""])
def test_probe_names_must_be_plain_hostnames(value):
    with pytest.raises(ValidationError):
        Settings(probe_helo=value)
    with pytest.raises(ValidationError):
        Settings(probe_domain=value)


def test_public_addresses_comma_or_json_and_validated(monkeypatch):
    assert Settings(_env_file=None).public_addresses == []
    monkeypatch.setenv("SECURE_PUBLIC_ADDRESSES", "93.184.216.34, [2001:DB8::1]")
    assert Settings().public_addresses == ["93.184.216.34", "2001:db8::1"]
    monkeypatch.setenv("SECURE_PUBLIC_ADDRESSES", '["93.184.216.34"]')
    assert Settings().public_addresses == ["93.184.216.34"]
    for bad in ("site.example.org", "93.184.216.0/24", "300.1.2.3"):
        monkeypatch.setenv("SECURE_PUBLIC_ADDRESSES", bad)
        with pytest.raises(ValidationError):
            Settings()
