"""Signed engines: an Ed25519 signature over the manifest, checked before the library is opened.

An engine is executable code: ``model.so`` runs in the loading process with its rights. The
manifest holds the SHA-256 of every other file, so signing the manifest signs the engine; a
loader given trusted keys (``qwen2c.load(dir, trusted_keys=[...])``, ``--trusted-key``) refuses an
unsigned engine, one signed by another key, or one whose manifest or files changed since it was
signed, before any of its code is loaded.

What is signed: the manifest as canonical JSON (sorted keys, no spaces) without its ``parity``
field, which ``qwen2c verify`` records where the engine runs (a GPU engine built on a machine
without a GPU gets its parity there); the parity report is a local note, not part of what the
signer vouches for. The signature lives in ``signature.json`` beside the manifest (the manifest
cannot hold its own signature): the algorithm, the signer's public key and the signature.

Keys are PEM files (``qwen2c keygen`` writes a pair): the private key signs, the public key is
what a loader trusts. ``cryptography`` (the pyca library) does the Ed25519 arithmetic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, EngineError, Qwen2cError

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"
UNSIGNED_FIELDS = ("parity",)


class TrustError(EngineError):
    """An engine that is unsigned, or not signed by a trusted key, where trust was asked for."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise Qwen2cError("signing and checking engine signatures needs the 'cryptography' package "
                          "(pip install cryptography); it is not installed here.") from None
    return InvalidSignature, serialization, ed25519


def signed_payload(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in UNSIGNED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, as ``qwen2c keygen`` writes)."""
    _, serialization, ed25519 = _crypto()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--sign-key {path}: cannot read it ({e.strerror}).") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--sign-key {path}: not an unencrypted PEM private key ({e}).") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"--sign-key {path}: a {type(key).__name__}; qwen2c signs with Ed25519 keys "
                          "(`qwen2c keygen` makes a pair).")
    return key


def public_key_bytes(key) -> bytes:
    """The 32 raw bytes of an Ed25519 public key given as a key object, PEM text/bytes, a PEM file
    path, raw 32 bytes, or 64 hex digits."""
    _, serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(key, bytes) and len(key) == 32:
        return key
    if isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdefABCDEF" for c in key):
        return bytes.fromhex(key)
    data = key
    if isinstance(key, (str, os.PathLike)) and not str(key).lstrip().startswith("-----BEGIN"):
        try:
            data = Path(key).read_bytes()
        except OSError as e:
            raise ConfigError(f"trusted key {key}: cannot read it ({e.strerror}).") from None
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes):
        raise ConfigError(f"trusted key {key!r}: give a PEM file, PEM text, 32 raw bytes or 64 hex digits.")
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"trusted key {key}: not a PEM public key.") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise ConfigError(f"trusted key {key}: a {type(loaded).__name__}; engines are signed with Ed25519.")
    return public_key_bytes(loaded)


def sign_engine(directory: Path, manifest: dict[str, Any], private_key) -> None:
    """Write ``signature.json`` for ``manifest`` (the manifest the directory holds or will hold)."""
    signature = private_key.sign(signed_payload(manifest))
    record = {"algorithm": ALGORITHM, "public_key": public_key_bytes(private_key).hex(), "signature": signature.hex()}
    (Path(directory) / SIGNATURE).write_text(json.dumps(record, indent=2) + "\n")


def check_signature(directory: Path, manifest: dict[str, Any], trusted_keys: Iterable) -> str:
    """Refuse (TrustError) unless ``signature.json`` is a valid signature of ``manifest`` by one of
    ``trusted_keys``; return the signer's public key (hex)."""
    InvalidSignature, _, ed25519 = _crypto()
    trusted = {public_key_bytes(k) for k in trusted_keys}
    if not trusted:
        raise ConfigError("trusted_keys is empty: give at least one public key, or none to skip the check.")
    path = Path(directory) / SIGNATURE
    if not path.is_file():
        raise TrustError(f"{directory}: the engine is not signed ({SIGNATURE} is missing) and trusted keys were "
                         "given; refusing to open its library.")
    try:
        record = json.loads(path.read_text())
        key, signature = bytes.fromhex(record["public_key"]), bytes.fromhex(record["signature"])
        algorithm = record.get("algorithm")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise TrustError(f"{path}: unreadable signature record; refusing to open the engine's library.") from None
    if algorithm != ALGORITHM:
        raise TrustError(f"{path}: signature algorithm {algorithm!r}, qwen2c checks {ALGORITHM}; refusing the engine.")
    if key not in trusted:
        raise TrustError(f"{directory}: signed by key {key.hex()[:16]}..., which is not one of the trusted keys; "
                         "refusing to open its library.")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key).verify(signature, signed_payload(manifest))
    except (InvalidSignature, ValueError):
        raise TrustError(f"{directory}: the signature does not match the manifest (the engine was modified after "
                         "it was signed); refusing to open its library.") from None
    return key.hex()


def generate_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM files (the private one readable by its owner only)."""
    _, serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key.")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(public)
    return public_key_bytes(key).hex()
