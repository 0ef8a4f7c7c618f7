"""How the environment is read: the rules behind every setting."""

import pytest
from config.env import ConfigError, env_bool, env_int, env_list, redis_hosts


@pytest.mark.parametrize(
    "raw,expected", [("1", True), ("TRUE", True), ("on", True), ("0", False), ("no", False), ("", False)]
)
def test_env_bool_reads_the_usual_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("FLAG", raw)
    assert env_bool("FLAG") is expected


def test_env_bool_refuses_a_typo_instead_of_guessing(monkeypatch):
    monkeypatch.setenv("FLAG", "ture")
    with pytest.raises(ConfigError, match="FLAG='ture' is not a boolean"):
        env_bool("FLAG")


def test_env_int_enforces_its_minimum(monkeypatch):
    monkeypatch.setenv("N", "12")
    assert env_int("N", 5, minimum=10) == 12
    monkeypatch.setenv("N", "3")
    with pytest.raises(ConfigError, match="N=3 must be at least 10"):
        env_int("N", 5, minimum=10)
    monkeypatch.setenv("N", "lots")
    with pytest.raises(ConfigError, match="not an integer"):
        env_int("N", 5)


def test_env_list_splits_and_trims(monkeypatch):
    monkeypatch.setenv("HOSTS", " a.example , b.example,,")
    assert env_list("HOSTS") == ["a.example", "b.example"]
    monkeypatch.delenv("HOSTS")
    assert env_list("HOSTS", ["x"]) == ["x"]


def test_a_single_redis_url_is_one_host():
    assert redis_hosts("redis://:pw@redis:6379/0") == ["redis://:pw@redis:6379/0"]


def test_a_comma_separated_list_is_a_list_of_shards():
    assert redis_hosts("redis://a:6379/0, rediss://b:6380/0") == ["redis://a:6379/0", "rediss://b:6380/0"]


def test_the_sentinel_form_names_sentinels_master_and_passwords():
    host = redis_hosts("sentinel://:s3cret@s1:26379,s2:26380/mymaster/2?sentinel_password=sp")[0]
    assert host == {
        "sentinels": [("s1", 26379), ("s2", 26380)],
        "master_name": "mymaster",
        "db": 2,
        "password": "s3cret",
        "sentinel_kwargs": {"password": "sp"},
    }


def test_the_sentinel_form_needs_a_master_name():
    with pytest.raises(ConfigError, match="needs the master name"):
        redis_hosts("sentinel://s1:26379")


def test_an_unknown_scheme_is_refused_without_echoing_the_password():
    with pytest.raises(ConfigError) as error:
        redis_hosts("http://:hunter2@redis:6379")
    assert "hunter2" not in str(error.value)
    assert "must start with redis://" in str(error.value)
