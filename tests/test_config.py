"""Settings: one declaration each, resolved default < file < environment < command line."""

import argparse
from pathlib import Path

import pytest

from gateway import config


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return vars(parser.parse_args(argv))


def write_ini(tmp_path, body):
    path = tmp_path / "gw.ini"
    path.write_text(f"[esl-gateway]\n{body}\n")
    return str(path)


def test_precedence_default_file_env_cli(tmp_path):
    """Each layer overrides the one below it, and the source of each value is kept."""
    ini = write_ini(tmp_path, "app = a:b\nworkers = 3\nbacklog = 100\nlinger = 4")
    cfg = config.resolve(parse(["-c", ini, "--backlog", "200"]),
                         {"ESL_GATEWAY_WORKERS": "5", "ESL_GATEWAY_BACKLOG": "150"})
    assert (cfg.app, cfg.workers, cfg.backlog, cfg.linger) == ("a:b", 5, 200, 4)
    assert cfg.sources["workers"] == "env" and cfg.sources["backlog"] == "command line"
    assert cfg.sources["linger"] == "file" and cfg.sources["timeout"] == "default"


def test_bind_repeats_and_lists():
    """-b accumulates like gunicorn's; the file/env form is a comma or space separated list."""
    cfg = config.resolve(parse(["-b", "127.0.0.1:1", "-b", "[::]:2", "x:y"]), {})
    assert cfg.bind == ["127.0.0.1:1", "[::]:2"]
    cfg = config.resolve(parse(["x:y"]), {"ESL_GATEWAY_BIND": "127.0.0.1:1, 127.0.0.2:2"})
    assert cfg.bind == ["127.0.0.1:1", "127.0.0.2:2"]


@pytest.mark.parametrize("argv, env, message", [
    (["x:y", "--workers", "0"], {}, "workers from command line"),
    (["x:y"], {"ESL_GATEWAY_TIMEOUT": "soon"}, "timeout from ESL_GATEWAY_TIMEOUT"),
    ([], {}, "no app given"),
])
def test_bad_values_name_setting_and_source(argv, env, message):
    """A bad value is refused with the setting's name and where the value came from."""
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(parse(argv), env)


def test_unknown_file_key_is_refused(tmp_path):
    """A typo in the config file is an error, not a silently ignored setting."""
    ini = write_ini(tmp_path, "app = a:b\nworkerz = 3")
    with pytest.raises(config.ConfigError, match="unknown setting.*workerz"):
        config.resolve(parse(["-c", ini]), {})


def test_the_example_config_file_is_valid():
    """deploy/esl-gateway.ini uses only declared settings, with usable values."""
    path = Path(__file__).parent.parent / "deploy" / "esl-gateway.ini"
    cfg = config.resolve(parse(["-c", str(path)]), {})
    assert cfg.app == "myivr.handlers:handle" and cfg.sources["workers"] == "file"


def test_readme_settings_table_is_generated_from_declarations():
    """The README documents exactly the declared settings (regenerate with python -m gateway.config)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert config.settings_table() in readme


def test_the_example_proxy_config_file_is_valid():
    """deploy/esl-gateway-proxy.ini: proxy mode, no app."""
    path = Path(__file__).parent.parent / "deploy" / "esl-gateway-proxy.ini"
    cfg = config.resolve(parse(["-c", str(path)]), {})
    assert cfg.app is None and cfg.proxy == ["127.0.0.1:9191"] and cfg.backend_wait == 20


@pytest.mark.parametrize("text, kind, argument", [
    ("hangup", "hangup", "NORMAL_CLEARING"), ("hangup:user_busy", "hangup", "USER_BUSY"),
    ("dialplan", "dialplan", None), ("transfer:1000", "transfer", "1000"),
    ("transfer:1000:XML:default", "transfer", "1000 XML default"),
])
def test_call_actions(text, kind, argument):
    """--on-handler-error and --orphan-action: what each spelling means."""
    action = config.call_action(text)
    assert (action.kind, action.argument) == (kind, argument)
    assert config.call_action(str(action)) == action


@pytest.mark.parametrize("text", ["hangup:no such", "transfer", "transfer:1:XML", "park"])
def test_bad_call_actions_are_refused(text):
    with pytest.raises(ValueError):
        config.call_action(text)


def test_an_app_or_a_proxy_not_both():
    with pytest.raises(config.ConfigError, match="not both"):
        config.resolve(parse(["x:y", "--proxy", "127.0.0.1:9191"]), {})
    assert config.resolve(parse(["--proxy", "unix:/run/ivr.sock"]), {}).proxy == [
        "unix:/run/ivr.sock"]
