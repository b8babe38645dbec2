"""Signed engines: `build --sign-key` signs, `load(trusted_keys=...)` / `--trusted-key` refuse
unsigned, foreign-signed and tampered engines before the library is opened."""

import json
import shutil

import pytest

import qwen2c
from qwen2c.cli import main
from qwen2c.engine_dir import file_table
from qwen2c.signing import TrustError, public_key_bytes


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "-o", str(root / "alice")]) == 0
    assert main(["keygen", "-o", str(root / "mallory")]) == 0
    assert (root / "alice.key").stat().st_mode & 0o077 == 0  # the private key is its owner's only
    return root


@pytest.fixture(scope="module")
def signed_engine(tmp_path_factory, tiny_checkpoint, keys):
    out = tmp_path_factory.mktemp("signed") / "engine"
    assert main(["build", "--model", str(tiny_checkpoint), "-o", str(out), "--max-context", "16",
                 "--sign-key", str(keys / "alice.key")]) == 0
    return out


def _copy(engine, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(engine, copy)
    return copy


def test_a_signed_engine_loads_with_its_key_in_every_form(signed_engine, keys):
    pem = keys / "alice.pub"
    for key in (pem, str(pem), pem.read_bytes(), pem.read_text(), public_key_bytes(pem), public_key_bytes(pem).hex()):
        assert qwen2c.load(signed_engine, trusted_keys=[key]).generate([1, 2], 2)
    qwen2c.load(signed_engine, trusted_keys=[keys / "mallory.pub", pem])  # any one trusted key will do
    qwen2c.load(signed_engine)  # no trust asked for: loads like any engine


def test_an_unsigned_engine_is_refused_when_trust_is_asked(tiny_engine, keys, capsys):
    with pytest.raises(TrustError, match="not signed"):
        qwen2c.load(tiny_engine, trusted_keys=[keys / "alice.pub"])
    assert main(["run", str(tiny_engine), "--prompt-ids", "1", "--trusted-key", str(keys / "alice.pub")]) == 2
    assert "not signed" in capsys.readouterr().err


def test_an_engine_signed_by_another_key_is_refused(signed_engine, keys):
    with pytest.raises(TrustError, match="not one of the trusted keys"):
        qwen2c.load(signed_engine, trusted_keys=[keys / "mallory.pub"])


def test_a_tampered_library_is_refused_before_it_is_opened(tmp_path, signed_engine, keys):
    """A replaced library with its checksum fixed: the signature no longer matches the manifest,
    and that is found before the library is opened (garbage would otherwise fail to open)."""
    copy = _copy(signed_engine, tmp_path)
    (copy / "model.so").write_bytes(b"\x7fELF not a library")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = file_table(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrustError, match="does not match"):
        qwen2c.load(copy, trusted_keys=[keys / "alice.pub"])


def test_a_re_signed_tamper_by_another_key_is_refused(tmp_path, signed_engine, keys):
    from qwen2c.signing import load_private_key, sign_engine

    copy = _copy(signed_engine, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    sign_engine(copy, manifest, load_private_key(keys / "mallory.key"))
    with pytest.raises(TrustError, match="not one of the trusted keys"):
        qwen2c.load(copy, trusted_keys=[keys / "alice.pub"])


def test_an_edited_manifest_breaks_the_signature(tmp_path, signed_engine, keys):
    copy = _copy(signed_engine, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["config"]["vocab_size"] += 1000
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrustError, match="does not match"):
        qwen2c.load(copy, trusted_keys=[keys / "alice.pub"])


def test_verify_records_parity_and_the_signature_still_holds(tmp_path, signed_engine, keys, capsys):
    copy = _copy(signed_engine, tmp_path)
    assert main(["verify", str(copy), "--decode-steps", "3", "--trusted-key", str(keys / "alice.pub")]) == 0
    assert json.loads((copy / "manifest.json").read_text())["parity"]["decode_steps"] == 3
    qwen2c.load(copy, trusted_keys=[keys / "alice.pub"])
    assert main(["verify", str(copy), "--trusted-key", str(keys / "mallory.pub")]) == 2
    assert "not one of the trusted keys" in capsys.readouterr().err
