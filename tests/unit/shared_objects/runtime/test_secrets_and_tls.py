"""Secrets never leak (masking, --print-config, config errors) and the TLS options parse.

Passwords here contain everything that breaks naive URL splitting: ``/ , @ : ? #``.
"""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import structlog

from conductor.db.session import create_engine, database_tls, normalize_url
from shared_objects.runtime.config import ConfigError, MessagingConfig, format_config, load_config
from shared_objects.runtime.messaging import MessagingError, get_transport
from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.runtime.tls import certificate_login, is_loopback
from shared_objects.runtime.url_secrets import mask_url, split_authority
from shared_objects.testing.tls_certs import TestCA, have_openssl

# Every piece of these passwords is a token "Q<n>Z" that must never appear in any output.
NASTY = [
    "Q1Z/Q2Z",
    "Q1Z,Q2Z",
    "Q1Z@Q2Z",
    "Q1Z:Q2Z",
    "Q1Z?Q2Z",
    "Q1Z/Q2Z,Q3Z@Q4Z:Q5Z",
    "@@Q1Z",
    "Q1Z#Q2Z",
]
# Ambiguous unencoded ("@host," inside): masked conservatively, parsed only when encoded.
AMBIGUOUS = "Q1Z@h2:5672,Q2Z"


def leaked(text: str) -> list[str]:
    return re.findall(r"Q\dZ", text)


@pytest.mark.parametrize("password", [*NASTY, AMBIGUOUS])
@pytest.mark.parametrize(
    "template",
    [
        "rabbit://fleet-host-a:{pw}@broker.example:5672/fleet",
        "amqps://u1:{pw}@h1:5671,u2:{pw}@h2:5671/vh?cafile=/etc/ca.pem",
        "postgresql+asyncpg://fleet:{pw}@db.example:5432/fleet?sslmode=verify-full",
        "rabbit://u:{pw}@[::1]:5672/",
    ],
)
def test_mask_url_hides_unencoded_and_encoded_passwords(template: str, password: str) -> None:
    for pw in (password, quote(password, safe="")):
        masked = mask_url(template.format(pw=pw))
        assert not leaked(masked), (template, pw, masked)
        assert "***" in masked


def test_mask_keeps_what_is_not_secret() -> None:
    url = "amqps://u1:x@y@h1:5671,u2:p,q@h2:5672/vh?cafile=/etc/fleet/ca.pem&password=zz"
    assert mask_url(url) == (
        "amqps://u1:***@h1:5671,u2:***@h2:5672/vh?cafile=/etc/fleet/ca.pem&password=***"
    )
    assert mask_url("rabbit://guest@127.0.0.1/") == "rabbit://guest@127.0.0.1/"
    assert mask_url("rabbit:///") == "rabbit:///"
    # An "@" in a certificate path of the query is not user-info.
    assert mask_url("rabbit://u:p@h/?certfile=/run/x@y/c.pem") == (
        "rabbit://u:***@h/?certfile=/run/x@y/c.pem"
    )
    # Not a URL at all but holding an "@": hide all of it.
    assert mask_url("fleet:secret@broker") == "***"


def test_split_authority_takes_user_info_up_to_the_last_at_of_each_host() -> None:
    parts, tail = split_authority("u1:a@b/c@h1:5672,u2:d,e@h2/vh?x=1")
    assert [(p.user, p.password, p.hostport) for p in parts] == [
        ("u1", "a@b/c", "h1:5672"),
        ("u2", "d,e", "h2"),
    ]
    assert tail == "/vh?x=1"


@pytest.mark.parametrize("password", [*NASTY, quote(AMBIGUOUS, safe="")])
def test_transport_url_with_nasty_password_reaches_aio_pika_encoded(password: str) -> None:
    import yarl

    parsed = parse_transport_url(f"rabbit://fleet-host-a:{password}@broker:5672/fleet")
    password = unquote(password)
    url = yarl.URL(parsed.hosts[0])
    assert (url.user, url.password, url.host, url.port) == (
        "fleet-host-a",
        password,
        "broker",
        5672,
    )
    assert parsed.users == ("fleet-host-a",)
    assert parsed.virtual_host == "fleet"


@pytest.mark.parametrize("password", NASTY)
def test_database_url_with_nasty_password(password: str) -> None:
    url = normalize_url(f"postgresql+asyncpg://fleet:{password}@db:5432/fleet")
    assert (url.username, url.password, url.host, url.port) == ("fleet", password, "db", 5432)
    assert url.database == "fleet"


@pytest.mark.parametrize("password", NASTY)
def test_print_config_never_shows_a_password(password: str) -> None:
    cfg = load_config(
        {
            "FLEET_TRANSPORT_URL": f"rabbit://u:{password}@h1:5672,v:{password}@h2:5672/",
            "FLEET_DATABASE_URL": f"postgresql+asyncpg://fleet:{password}@db:5432/fleet",
        }
    )
    text = format_config(cfg)
    assert not leaked(text), text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FLEET_TRANSPORT_URL": "rabbit://u:s3cr/et@h:99999/"}, "bad host:port 'h:99999'"),
        ({"FLEET_TRANSPORT_URL": "rabbit://u:s3cr,et@h:x/"}, "bad host:port 'h:x'"),
        ({"FLEET_TRANSPORT_URL": "rabbit://u:s3cr@et@/"}, "empty host"),
        ({"FLEET_TRANSPORT_URL": "u:s3cret@h"}, "is not a URL"),
        ({"FLEET_TRANSPORT_URL": "rabbit://u:s3cret@h/?auth=kerberos"}, "auth must be"),
        ({"FLEET_TRANSPORT_URL": "rabbit://u:s3cret@h/?auth=external"}, "needs TLS"),
        ({"FLEET_DATABASE_URL": "postgresql+asyncpg://u:s3c/ret@db:54x/f"}, "bad host:port"),
        ({"FLEET_DATABASE_URL": "postgresql+asyncpg://u:s3c/ret@db/"}, "names no database"),
        ({"FLEET_DATABASE_URL": "postgresql+asyncpg://u:s3c@ret@db/f?sslmode=on"}, "sslmode"),
        ({"FLEET_DATABASE_URL": "postgresql+asyncpg://u:s3cret@a,u:s3cret@b/f"}, "several"),
        ({"FLEET_MESSAGING__TRANSPORT_URL": "amqps://u:s3cret@h/?no_verify_ssl=1"}, "tls_insecure"),
    ],
)
def test_config_errors_never_echo_user_info(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env)
    message = str(info.value)
    assert expected in message
    assert "s3c" not in message and "ret@" not in message, message
    assert "\n" not in message


def test_secret_option_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[messaging]\ntransport_url = ["rabbit://u:s3cret@h/"]\n')
    with pytest.raises(ConfigError) as info:
        load_config({}, path=path)
    assert "s3cret" not in str(info.value)
    assert "transport_url" in str(info.value)


def test_url_files_replace_the_urls_and_conflict_with_them(tmp_path: Path) -> None:
    (tmp_path / "transport_url").write_text("rabbit://fleet-host-a:p/w@broker:5672/fleet\n")
    (tmp_path / "database_url").write_text("postgresql+asyncpg://fleet:p@w@db:5432/fleet\n")
    env = {
        "FLEET_MESSAGING__TRANSPORT_URL_FILE": str(tmp_path / "transport_url"),
        "FLEET_DATABASE__URL_FILE": str(tmp_path / "database_url"),
    }
    cfg = load_config(env)
    assert cfg.messaging.transport_url == "rabbit://fleet-host-a:p/w@broker:5672/fleet"
    assert cfg.database.url == "postgresql+asyncpg://fleet:p@w@db:5432/fleet"
    assert "p/w" not in format_config(cfg) and "p@w" not in format_config(cfg)
    with pytest.raises(ConfigError, match="set only one of them"):
        load_config({**env, "FLEET_TRANSPORT_URL": "rabbit://u:x@h/"})
    with pytest.raises(ConfigError, match=r"cannot read .*missing: No such file"):
        load_config({"FLEET_MESSAGING__TRANSPORT_URL_FILE": str(tmp_path / "missing")})
    (tmp_path / "bad").write_text("rabbit://u:s3cret@h/\nrabbit://other\n")
    with pytest.raises(ConfigError, match="exactly one line") as info:
        load_config({"FLEET_MESSAGING__TRANSPORT_URL_FILE": str(tmp_path / "bad")})
    assert "s3cret" not in str(info.value)


def test_tls_insecure_allows_no_verify_ssl() -> None:
    cfg = load_config(
        {
            "FLEET_TRANSPORT_URL": "amqps://u:p@h/?no_verify_ssl=1",
            "FLEET_MESSAGING__TLS_INSECURE": "true",
        }
    )
    assert cfg.messaging.tls_insecure is True


def test_tls_options_are_parsed_and_not_passed_to_aio_pika() -> None:
    parsed = parse_transport_url(
        "rabbit://u:p@h1:5671/vh?ssl=1&cafile=/ca.pem&certfile=/c.pem&keyfile=/k.pem", heartbeat=5
    )
    assert parsed.scheme == "amqps"
    assert parsed.tls is not None and parsed.tls.verify
    assert (parsed.tls.cafile, parsed.tls.certfile, parsed.tls.keyfile) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
    )
    assert parsed.hosts == ("amqps://u:p@h1:5671/vh?heartbeat=5",)
    assert parse_transport_url("amqps://u:p@h/?no_verify_ssl=1").tls.verify is False  # type: ignore[union-attr]
    assert parse_transport_url("rabbit://u:p@h/").tls is None


def test_no_verify_ssl_is_refused_by_get_transport_without_tls_insecure() -> None:
    config = MessagingConfig(transport_url="amqps://u:p@127.0.0.1:1/?no_verify_ssl=1")
    with pytest.raises(MessagingError, match="tls_insecure"):
        get_transport(config)
    config.tls_insecure = True
    with structlog.testing.capture_logs() as logs:
        get_transport(config)
    assert [e["log_level"] for e in logs if e["event"] == "broker_tls_unverified"] == ["warning"]


def test_missing_ca_file_is_a_one_line_messaging_error() -> None:
    config = MessagingConfig(transport_url="amqps://u:p@127.0.0.1:1/?cafile=/nonexistent/ca.pem")
    with pytest.raises(MessagingError, match=r"broker TLS: cannot load CA /nonexistent/ca\.pem"):
        get_transport(config)


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("rabbit://u:p@broker.example:5672/", True),
        ("rabbit://u:p@127.0.0.1:5672,u:p@10.0.0.2:5672/", True),
        ("rabbit://u:p@127.0.0.1:5672/", False),
        ("rabbit://u:p@localhost:5672/", False),
        ("amqps://u:p@broker.example:5671/", False),
    ],
)
def test_non_loopback_broker_without_tls_is_a_warning(url: str, warned: bool) -> None:
    with structlog.testing.capture_logs() as logs:
        get_transport(MessagingConfig(transport_url=url))
    events = [e for e in logs if e["event"] == "broker_without_tls"]
    assert bool(events) is warned
    assert all(e["log_level"] == "warning" for e in events)


@pytest.mark.parametrize(
    ("query", "warned", "verified"),
    [
        ("", True, False),
        ("?sslmode=require", True, False),
        ("?ssl=require", True, False),
        ("?sslmode=verify-full", False, True),
        ("?sslmode=verify-ca", False, True),
    ],
)
def test_non_loopback_database_without_verified_tls_is_a_warning(
    query: str, warned: bool, verified: bool
) -> None:
    url = f"postgresql+asyncpg://fleet:p@ss@db.example:5432/fleet{query}"
    assert database_tls(normalize_url(url)).verified is verified
    with structlog.testing.capture_logs() as logs:
        engine = create_engine(url)
    assert engine.url.password == "p@ss"
    assert "sslmode" not in engine.url.query and "ssl" not in engine.url.query
    events = [e for e in logs if e["event"] == "database_tls_unverified"]
    assert bool(events) is warned
    assert all(e["log_level"] == "warning" for e in events)
    assert logging.getLogger("sqlalchemy.engine").level == logging.WARNING


def test_verify_full_builds_a_checking_context() -> None:
    tls = database_tls(normalize_url("postgresql+asyncpg://u@db:5432/f?sslmode=verify-full"))
    assert isinstance(tls.connect_ssl, ssl.SSLContext)
    assert tls.connect_ssl.check_hostname and tls.connect_ssl.verify_mode == ssl.CERT_REQUIRED
    tls = database_tls(normalize_url("postgresql+asyncpg://u@db:5432/f?sslmode=verify-ca"))
    assert isinstance(tls.connect_ssl, ssl.SSLContext)
    assert not tls.connect_ssl.check_hostname
    assert tls.connect_ssl.verify_mode == ssl.CERT_REQUIRED
    assert database_tls(normalize_url("postgresql+asyncpg://u@127.0.0.1/f")).connect_ssl is False


def test_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "localhost", "::1", "[::1]", None]))
    assert not any(map(is_loopback, ["10.0.0.1", "db.example", "::2"]))


@pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")
def test_external_login_is_the_certificate_common_name(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    cert = ca.issue("fleet-host-compute-7", client=True)
    assert certificate_login(str(cert.cert)) == "fleet-host-compute-7"
    url = f"amqps://broker:5671/fleet?certfile={cert.cert}&keyfile={cert.key}&auth=external"
    parsed = parse_transport_url(url)
    assert parsed.auth == "external"
    assert parsed.users == ("fleet-host-compute-7",)
    # No user-info and no password go to the broker: the certificate is the login.
    assert parsed.hosts == ("amqps://broker:5671/fleet?auth=external",)
    # A login in the URL wins (ssl_cert_login_from = distinguished_name setups).
    named = parse_transport_url(url.replace("broker:", "CN%3Dx@broker:"))
    assert named.users == ("CN=x",)
    # The transport publishes with that user_id.
    transport = get_transport(MessagingConfig(transport_url=url))
    assert transport.user_id == "fleet-host-compute-7"
