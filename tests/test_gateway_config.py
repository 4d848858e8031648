from pathlib import Path

import pytest

from citynode.gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[gateway]
id = "pole-0042"
registry_dir = "registry"
[upstream]
host = "broker.example"
topic_prefix = "city/citynode"
"""


def write(tmp_path, text):
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults_and_relative_paths(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.gateway_id == "pole-0042"
    assert config.registry_dir == tmp_path / "registry"
    assert config.state_dir == Path("/var/lib/citynode")
    assert config.upstream.port == 8883 and config.upstream.tls
    assert config.store.commit_rows == 100 and config.store.commit_ms == 200
    assert config.metrics_address == ("127.0.0.1", 9108)


def test_example_config_in_deploy_is_valid(tmp_path):
    text = (ROOT / "deploy" / "gateway.toml").read_text()
    config = load_config(write(tmp_path, text))
    assert config.upstream.topic_prefix


@pytest.mark.parametrize("text, message", [
    (MINIMAL.replace('id = "pole-0042"', ""), "gateway.id is missing"),
    (MINIMAL.replace('"pole-0042"', '"pole 42"'), "gateway.id = 'pole 42' is invalid"),
    (MINIMAL + "port = 0\n", "upstream.port = 0 is invalid"),
    (MINIMAL + "prot = 1883\n", r"unknown key\(s\) in \[upstream\]: prot"),
    (MINIMAL.replace("city/citynode", "city/#"), "upstream.topic_prefix"),
    (MINIMAL + "ca_file = 'missing.pem'\n", "upstream.ca_file = .* does not exist"),
    (MINIMAL + "[store]\nmax_bytes = -5\n", "store.max_bytes = -5 is invalid"),
    (MINIMAL + "[metrics]\naddress = 'nohost'\n", "metrics.address"),
    (MINIMAL + "[mqtt]\nx = 1\n", r"unknown key\(s\) in \[config\]: mqtt"),
    ("[gateway\n", "not valid TOML"),
])
def test_errors_name_the_key_and_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; start from deploy/gateway.toml"):
        load_config(tmp_path / "none.toml")
