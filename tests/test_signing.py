"""Ed25519 signatures over ensemble digests: `dpcert sign`, and `--public-key` on verify,
predict and serve."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from dpcert.cli import main
from dpcert.learning.data import load_digits
from dpcert.workflows.defence import defence_config, run_defence

pytest.importorskip("cryptography")


def _keys(folder, name):
    """An Ed25519 key pair in PEM, as openssl writes it (cryptography's writer otherwise)."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    if shutil.which("openssl"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out",
                        str(public)], check=True, capture_output=True)
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = ed25519.Ed25519PrivateKey.generate()
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _cli(*args):
    return CliRunner().invoke(main, [*args])


def test_a_signed_ensemble_verifies_and_a_forged_one_does_not(tmp_path):
    kind, cfg, bc = defence_config({"defence": "dpa", "models": 10, "learner": "prototype"})
    run_dir = tmp_path / "run"
    run_defence(kind, bc, cfg, run_dir, progress=False)
    private, public = _keys(tmp_path, "owner")
    _, stranger = _keys(tmp_path, "stranger")
    res = _cli("sign", str(run_dir), "--key", str(private), "--quiet")
    assert res.exit_code == 0 and (run_dir / "signature.json").exists(), res.output
    res = _cli("verify", str(run_dir), "--public-key", str(public), "--quiet")
    assert res.exit_code == 0 and "signature: valid" in res.output
    res = _cli("verify", str(run_dir), "--public-key", str(stranger), "--quiet")
    assert res.exit_code == 2 and "was not made with the key" in res.output
    # the export shares the digest: the same signature, copied beside it, verifies it
    assert _cli("export", str(run_dir), str(tmp_path / "e.safetensors"),
                "--quiet").exit_code == 0
    shutil.copy(run_dir / "signature.json", tmp_path / "e.safetensors.sig")
    np.save(tmp_path / "x.npy", load_digits().x_test[:5])
    res = _cli("predict", str(tmp_path / "e.safetensors"), str(tmp_path / "x.npy"),
               "--public-key", str(public), "--output", str(tmp_path / "p.csv"), "--quiet")
    assert res.exit_code == 0, res.output
    # a record forged consistently in every file passes the local checks, not the signature
    for name in ("ensemble.json", "certification.json"):  # consistent in every record
        d = json.loads((run_dir / name).read_text())
        d["eta"] = 0.3
        (run_dir / name).write_text(json.dumps(d))
    res = _cli("predict", str(run_dir), str(tmp_path / "x.npy"), "--public-key", str(public),
               "--output", str(tmp_path / "q.csv"), "--quiet")
    assert res.exit_code == 2 and "altered after signing" in res.output
    assert not (tmp_path / "q.csv").exists()
    (run_dir / "signature.json").unlink()
    res = _cli("verify", str(run_dir), "--public-key", str(public), "--quiet")
    assert res.exit_code == 2 and "is not signed" in res.output


def test_keys_that_are_not_ed25519_pem_are_refused(tmp_path):
    kind, cfg, bc = defence_config({"defence": "dpa", "models": 4, "learner": "prototype"})
    run_defence(kind, bc, cfg, tmp_path / "run", progress=False)
    (tmp_path / "junk.pem").write_text("not a key")
    res = _cli("sign", str(tmp_path / "run"), "--key", str(tmp_path / "junk.pem"), "--quiet")
    assert res.exit_code == 2 and "is not an unencrypted PEM private key" in res.output
    res = _cli("sign", str(tmp_path / "run"), "--key", str(tmp_path / "none.pem"), "--quiet")
    assert res.exit_code == 2 and "cannot read the key" in res.output
