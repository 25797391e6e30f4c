"""Settings: IMH_* variables, CLI flags over them, unsafe admin tokens refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.cli.main import parser, settings_from
from service.settings import Settings


def test_environment_variables_configure_and_flags_override(monkeypatch):
    monkeypatch.setenv("IMH_PORT", "9001")
    monkeypatch.setenv("IMH_MAX_BATCH_SIZE", "128")
    monkeypatch.setenv("IMH_ZOO", "0")
    assert Settings().port == 9001 and Settings().max_batch_size == 128 and not Settings().zoo
    settings = settings_from(parser().parse_args(["serve", "--port", "9100", "--zoo"]))
    assert settings.port == 9100 and settings.zoo and settings.max_batch_size == 128


def test_short_admin_tokens_are_refused_outside_development():
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(admin_token="short")
    assert (
        Settings(admin_token="short", env="development").admin_token.get_secret_value() == "short"
    )
    assert Settings(admin_token="").admin_token is None


def test_inconsistent_limits_are_refused():
    with pytest.raises(ValidationError, match="IMH_MAX_QUEUED_ROWS"):
        Settings(max_n=100, max_queued_rows=10)
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)


def test_the_readme_lists_every_setting_as_imh_settings_prints_it():
    from pathlib import Path

    from service.cli.main import markdown_settings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("<!-- begin:settings -->")[1].split("<!-- end:settings -->")[0]
    assert table.strip() == markdown_settings().strip(), "run .venv/bin/imh settings --markdown"
    assert len(table.strip().splitlines()) == len(Settings.model_fields) + 2


def test_every_setting_is_a_flag_with_its_default_in_the_help(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in shown
    assert "IMH_MAX_N; default: 65536" in " ".join(shown.split())
    assert settings_from(parser().parse_args(["serve", "--max-n", "12"])).max_n == 12


def test_a_second_worker_on_a_taken_port_says_what_to_do(capsys):
    import socket

    from service.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["worker", "--redis-url", "redis://127.0.0.1:1/0", "--port", str(port)])
    assert code == 2
    message = capsys.readouterr().err
    assert f"port {port}" in message and "--port" in message and "another imh worker" in message
