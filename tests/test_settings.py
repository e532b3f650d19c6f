"""Settings resolve from arguments, then SHOAL_* variables, then defaults — loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import ConfigurationError, Settings


def test_arguments_win_over_environment_which_wins_over_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOAL_REDIS_URL", "redis://env:6379/0")
    monkeypatch.setenv("SHOAL_NAMESPACE", "from-env")
    monkeypatch.setenv("SHOAL_RETENTION", "60")
    monkeypatch.setenv("SHOAL_QUEUE_MAX_LENGTH", "10")
    monkeypatch.setenv("SHOAL_DATA_DIR", "/tmp/shoal-env")
    from_env = Settings.from_env()
    assert from_env.url == "redis://env:6379/0" and from_env.namespace == "from-env"
    assert from_env.retention == 60 and from_env.queue_max_length == 10
    assert from_env.data_dir == Path("/tmp/shoal-env")
    explicit = Settings.from_env("redis://arg:1/0", "from-arg")
    assert explicit.url == "redis://arg:1/0" and explicit.namespace == "from-arg"


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SHOAL_REDIS_URL", "SHOAL_NAMESPACE", "SHOAL_RETENTION", "SHOAL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.url is None and settings.namespace == "default"
    assert settings.retention == 24 * 3600 and settings.data_dir == Path(".shoal")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SHOAL_RETENTION", "a day", "SHOAL_RETENTION='a day' is not a number"),
        ("SHOAL_RETENTION", "-5", "must be > 0"),
        ("SHOAL_QUEUE_MAX_LENGTH", "1.5", "is not a whole number"),
        ("SHOAL_NAMESPACE", "has space", "namespace 'has space' is invalid"),
    ],
)
def test_bad_environment_values_fail_loudly(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env()
