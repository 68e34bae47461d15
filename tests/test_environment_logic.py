"""Pure logic of issue 17 item 1: which libpq parameters pgshard's own connections set, and which exported
variable a refusal is blamed on (no connection made: the real runs are in tests/plugin/test_environment.py)."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgshard.faults import environment
from pgshard.server.base import own_connect_args, own_conninfo

LOCAL = "postgresql+psycopg://pgshard@127.0.0.1:5555/postgres?passfile=/x/passfile"
REMOTE = "postgresql+psycopg://app:pw@db.example.com:5432/postgres"


def test_every_parameter_a_pg_variable_fills_is_set_for_a_local_server() -> None:
    params = conninfo_to_dict(own_conninfo(LOCAL))
    assert params["password"] == "" and params["options"] == "" and params["sslmode"] == "prefer"
    assert params["target_session_attrs"] == "any" and params["hostaddr"] == ""
    assert params["host"] == "127.0.0.1" and params["port"] == "5555" and params["passfile"] == "/x/passfile"


def test_a_remote_server_keeps_an_exported_sslmode_and_the_urls_own_values_win() -> None:
    params = conninfo_to_dict(own_conninfo(REMOTE))
    assert "sslmode" not in params and params["password"] == "pw"
    assert conninfo_to_dict(own_conninfo(REMOTE + "?sslmode=verify-full"))["sslmode"] == "verify-full"
    assert "sslmode" not in own_connect_args(REMOTE) and own_connect_args(LOCAL)["sslmode"] == "prefer"
    assert "password" not in own_connect_args(REMOTE)  # the URL has one: libpq takes it


def test_a_service_url_gets_no_pins_that_would_hide_its_service_file() -> None:
    assert conninfo_to_dict(own_conninfo("postgresql://?service=pgs")) == {"service": "pgs"}
    assert own_connect_args("postgresql+psycopg://?service=pgs") == {}


def test_a_refusal_is_blamed_on_the_variable_only_where_it_can_be_the_cause() -> None:
    refused = psycopg.OperationalError('FATAL:  password authentication failed for user "pgshard"')
    environ = {"PGPASSWORD": "secret-value"}
    line = environment(refused, environ)
    assert line is not None and line.startswith("pgshard: PGPASSWORD is exported") and "env -u PGPASSWORD" in line
    assert "secret-value" not in line
    assert environment(refused, environ, own=True) is None  # pgshard's own connections set the password
    assert environment(refused, {}) is None
    no_ssl = psycopg.OperationalError("server does not support SSL, but SSL was required")
    own = environment(no_ssl, {"PGSSLMODE": "require"}, own=True)
    assert own is not None and "set sslmode in --pg-url" in own
    read_only = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
    assert "PGOPTIONS=-c default_transaction_read_only=on" in str(
        environment(read_only, {"PGOPTIONS": "-c default_transaction_read_only=on"}))
