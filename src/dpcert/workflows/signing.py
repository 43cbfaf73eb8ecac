"""Signatures over an ensemble's digest: who vouches for a kept ensemble.

:meth:`dpcert.workflows.ensemble.Ensemble.digest` binds everything a certificate rests on
(description, mechanism, training settings, training-data sha256, every model's checksum),
and is the same for a run directory and its export. Signing it with an Ed25519 key (PEM, as
``openssl genpkey -algorithm ed25519`` writes it) lets whoever holds the public key refuse
any ensemble its owner did not sign — a forged record consistent across every file
included. The signature lives beside the ensemble (``signature.json`` in a directory,
``FILE.sig`` beside an export; copy it with the export) as JSON: the algorithm, the digest
and the base64 signature over the digest's hex string.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from dpcert.errors import UserError, missing_extra
from dpcert.store import atomic_write_text
from dpcert.workflows import rundir

ALGORITHM = "ed25519"


def signature_path(ensemble: Path) -> Path:
    """Where an ensemble's signature is kept: inside a directory, beside a file."""
    ensemble = Path(ensemble)
    return ensemble / rundir.SIGNATURE if ensemble.is_dir() else \
        ensemble.with_name(ensemble.name + ".sig")


def _key(path: Path, private: bool):
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise missing_extra("signing", "cryptography", "sign") from None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read the key {path}: {err.strerror or err}") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise UserError(f"{path} is not an unencrypted PEM "
                        f"{'private' if private else 'public'} key ({err})") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise UserError(f"{path} is not an Ed25519 key (openssl genpkey -algorithm ed25519)")
    return key


def sign(ensemble: Path, digest: str, private_key: Path) -> Path:
    """Sign ``digest`` (the ensemble's) with the Ed25519 key; writes and returns the
    signature file (atomically)."""
    signature = _key(private_key, private=True).sign(digest.encode())
    out = signature_path(ensemble)
    atomic_write_text(out, json.dumps({"algorithm": ALGORITHM, "digest": digest,
                                       "signature": base64.b64encode(signature).decode()},
                                      indent=2) + "\n")
    return out


def check_signature(ensemble: Path, digest: str, public_key: Path) -> None:
    """Refuse, in one line, an ensemble whose signature file is missing or damaged, was made
    for another digest, or was not made with the private key of ``public_key``."""
    key = _key(public_key, private=False)  # says which extra to install, if it is missing
    from cryptography.exceptions import InvalidSignature

    path = signature_path(ensemble)
    try:
        doc = json.loads(path.read_text())
        signature = base64.b64decode(doc["signature"], validate=True)
        signed, algorithm = doc["digest"], doc["algorithm"]
    except FileNotFoundError:
        raise UserError(f"{ensemble} is not signed (no {path})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            binascii.Error, ValueError) as err:
        raise UserError(f"{path} is damaged ({err})") from None
    if algorithm != ALGORITHM:
        raise UserError(f"{path}: signature algorithm {algorithm!r}, not {ALGORITHM}")
    if signed != digest:
        raise UserError(f"{path} signs digest {str(signed)[:16]}..., but the ensemble's is "
                        f"{digest[:16]}...: it was altered after signing")
    try:
        key.verify(signature, digest.encode())
    except InvalidSignature:
        raise UserError(f"{path} was not made with the key of {public_key}; refusing the "
                        "ensemble") from None
