import json
import stat
from dataclasses import replace

import pytest

from citynode.registry import RegistryError, load_registry, record_from_dict, revoke, write_record
from citynode.testing.keys import TestDevice


def test_write_load_roundtrip_is_atomic_and_readable_by_the_gateway(tmp_path):
    dev, hdev = TestDevice.random(), TestDevice.random("HMAC256")
    path = write_record(tmp_path, dev.record())
    hdev.register(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644   # public keys only: any service user
    assert not list(tmp_path.glob(".*.tmp"))
    reg = load_registry(tmp_path, strict=True)
    assert set(reg.records) == {dev.device_id, hdev.device_id}
    assert reg.get(dev.device_id) == dev.record()
    assert reg.credential(reg.get(dev.device_id)).public_key.public_numbers() == \
        dev.key.public_key().public_numbers()
    cred = reg.credential(reg.get(hdev.device_id))
    assert cred.secret == hdev.secret
    assert hdev.secret.hex() not in repr(cred)


def test_a_mounting_height_is_kept_and_optional(tmp_path):
    dev = TestDevice.random()
    write_record(tmp_path, replace(dev.record(), height_m=6.5))
    assert load_registry(tmp_path, strict=True).get(dev.device_id).height_m == 6.5
    assert "height_m" not in dev.record().to_dict()       # records from before still load


def test_revoke_marks_the_record(tmp_path):
    dev = TestDevice.random()
    dev.register(tmp_path)
    revoke(tmp_path, dev.device_id)
    assert load_registry(tmp_path).get(dev.device_id).status == "revoked"
    with pytest.raises(RegistryError, match="not in the registry"):
        revoke(tmp_path, "cn-000000000000")


@pytest.mark.parametrize("change, message", [
    ({"device_id": "node7"}, "device_id"),
    ({"alg": "RS256"}, "'alg' must be one of"),
    ({"status": "lost"}, "'status' must be one of"),
    ({"lat": 123}, "'lat'"),
    ({"public_key_pem": "not a key"}, "not a PEM public key"),
    ({"colour": "red"}, "unknown field"),
    ({"board": ""}, "'board'"),
    ({"height_m": 600}, "'height_m'"), ({"height_m": "6 m"}, "'height_m'"),
])
def test_invalid_records_name_the_field(change, message):
    data = {**TestDevice.random().record().to_dict(), **change}
    with pytest.raises(RegistryError, match=message):
        record_from_dict(data)


def test_one_bad_file_does_not_take_the_fleet_down(tmp_path):
    dev = TestDevice.random()
    dev.register(tmp_path)
    (tmp_path / "cn-ffffffffffff.json").write_text("{broken")
    other = TestDevice.random().record().to_dict()
    (tmp_path / "cn-eeeeeeeeeeee.json").write_text(json.dumps(other))  # name != device_id
    reg = load_registry(tmp_path)
    assert list(reg.records) == [dev.device_id]
    assert len(reg.errors) == 2 and any("not valid JSON" in e for e in reg.errors)
    with pytest.raises(RegistryError):
        load_registry(tmp_path, strict=True)
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "nope")
