"""Signed attestations: sign a report's finding, verify it; every tampering is refused with its reason."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))

from report_helpers import build_audit_report, cli  # noqa: E402


def _pem_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _pem_pub(key, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _cert(subject_key, name: str, issuer_key=None, issuer_name: str | None = None, ca: bool = False):
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False))
    signer = issuer_key or subject_key
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name("publisher@example.org")]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write_cert(cert, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def case(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attest")
    paths = {}
    for name, src in (("rio", "m_linear_rio"), ("nex", "ft_a1"), ("qwen", "ft_a2")):
        dst = root / name
        dst.mkdir()
        for f in corpus.path(src).iterdir():
            if f.is_file() and f.name != "corpus_meta.json":
                shutil.copy(f, dst / f.name)
        paths[name] = dst
    report = build_audit_report(paths["rio"], [paths["nex"], paths["qwen"]])
    paths["report"] = root / "rio.json"
    paths["report"].write_text(report.to_json())
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths["key"], paths["pub"] = _pem_key(key, root / "key.pem"), _pem_pub(key, root / "pub.pem")
    paths["other_pub"] = _pem_pub(other, root / "other.pub.pem")
    ca_key, leaf_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    paths["root"] = _write_cert(_cert(ca_key, "modeltrace test root", ca=True), root / "root.pem")
    paths["rogue_root"] = _write_cert(_cert(rogue_key, "rogue root", ca=True), root / "rogue.pem")
    paths["leaf_key"] = _pem_key(leaf_key, root / "leaf.key.pem")
    paths["leaf"] = _write_cert(_cert(leaf_key, "publisher", ca_key, "modeltrace test root"), root / "leaf.pem")
    paths["bundle"] = root / "rio.sigstore.json"
    r = cli("attest", paths["report"], "--key", paths["key"], "-o", paths["bundle"])
    assert r.exit_code == 0, r.output
    return paths


def _verify(case, bundle: Path, *extra) -> tuple[int, str]:
    r = cli("verify", case["report"], "--bundle", bundle, *(extra or ("--key", case["pub"])))
    return r.exit_code, " ".join(r.output.split())  # terminal line wrapping undone


def _edit(bundle: Path, dest: Path, fn) -> Path:
    doc = json.loads(bundle.read_text())
    fn(doc)
    dest.write_text(json.dumps(doc))
    return dest


def _statement(doc: dict) -> dict:
    return json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))


def _set_statement(doc: dict, stmt: dict) -> None:
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()


def test_sign_then_verify(case):
    from sigstore_models.bundle.v1 import Bundle

    doc = json.loads(case["bundle"].read_text())
    Bundle.model_validate(doc)  # the Sigstore bundle layout
    stmt = _statement(doc)
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://modeltrace.dev/provenance/v1"
    assert stmt["subject"][0]["name"] == "rio" and len(stmt["subject"][0]["digest"]["mtc1"]) == 64
    assert any(s["name"].startswith("rio/") and "sha256" in s["digest"] for s in stmt["subject"])
    finding = stmt["predicate"]["models"][0]["finding"]
    assert finding["relation"] == "merge"
    assert {p["model"] for p in finding["parents"]} == {"nex", "qwen"}
    assert all(p["p_independent"] and p["weight"] is not None for p in finding["parents"])
    assert stmt["predicate"]["tool"]["name"] == "modeltrace"
    code, out = _verify(case, case["bundle"])
    assert code == 0, out
    assert "valid signature" in out and "the report is the attested one" in out and "attested content digest" in out


def test_tampered_statement_is_refused(case, tmp_path):
    def change_weight(doc):
        stmt = _statement(doc)
        stmt["predicate"]["models"][0]["finding"]["parents"][0]["weight"] = 0.99
        _set_statement(doc, stmt)

    code, out = _verify(case, _edit(case["bundle"], tmp_path / "b.json", change_weight))
    assert code == 1 and "signature does not verify" in out and "altered" in out


def test_tampered_signature_is_refused(case, tmp_path):
    def flip(doc):
        sig = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
        sig[-1] ^= 1
        doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    code, out = _verify(case, _edit(case["bundle"], tmp_path / "b.json", flip))
    assert code == 1 and "signature does not verify" in out


def test_model_changed_by_one_byte_is_refused(case, tmp_path):
    copy = tmp_path / "rio"
    shutil.copytree(case["rio"], copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    code, out = _verify(case, case["bundle"], "--key", case["pub"], "--model", copy)
    assert code == 1
    assert "is not the attested one" in out and "1 of" in out and "differ in value" in out


def test_swapped_subject_is_refused(case, tmp_path):
    # another model in hand than the attested one
    code, out = _verify(case, case["bundle"], "--key", case["pub"], "--model", case["nex"])
    assert code == 1 and "is not the attested one" in out
    # the subject's digest replaced: the signature no longer covers it
    other = json.loads(cli("inspect", case["nex"], "--hashes", "--json").stdout)
    nex_digest = other["subjects"][0]["description"]["content"]["model_digest"].split(":")[1]

    def swap(doc):
        stmt = _statement(doc)
        stmt["subject"][0]["digest"]["mtc1"] = nex_digest
        _set_statement(doc, stmt)

    swapped = _edit(case["bundle"], tmp_path / "swapped.json", swap)
    code, out = _verify(case, swapped)
    assert code == 1 and "signature does not verify" in out
    # ... and re-signed by the trusted key (a signer misled into it): the subject disagrees with the manifest
    from modeltrace.provenance.attest import KeySigner, sign

    resigned = tmp_path / "resigned.json"
    resigned.write_text(json.dumps(sign(_statement(json.loads(swapped.read_text())), KeySigner(case["key"]))))
    code, out = _verify(case, resigned)
    assert code == 1 and "subject was swapped" in out


def test_other_report_is_refused(case, tmp_path):
    doc = json.loads(case["report"].read_text())
    doc["subjects"][0]["audit"]["relation"] = "independent"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(doc))
    r = cli("verify", changed, "--bundle", case["bundle"], "--key", case["pub"])
    out = " ".join(r.output.split())
    assert r.exit_code == 1 and "not the attested one" in out and "relation merge/linear attested" in out


def test_untrusted_key_is_refused(case):
    code, out = _verify(case, case["bundle"], "--key", case["other_pub"])
    assert code == 1 and "signed by another key" in out


def test_certificate_chain(case, tmp_path):
    bundle = tmp_path / "cert.json"
    r = cli("attest", case["report"], "--key", case["leaf_key"], "--certificate", case["leaf"], "-o", bundle)
    assert r.exit_code == 0, r.output
    assert "x509CertificateChain" in json.loads(bundle.read_text())["verificationMaterial"]
    code, out = _verify(case, bundle, "--trust-root", case["root"])
    assert code == 0 and "certificate CN=publisher" in out, out
    code, out = _verify(case, bundle, "--trust-root", case["rogue_root"])
    assert code == 1 and "is not trusted" in out
    r = cli("attest", case["report"], "--key", case["key"], "--certificate", case["leaf"], "-o", tmp_path / "x.json")
    assert r.exit_code == 2 and "another key" in r.output


def test_ed25519_key_and_recompute(case, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    bundle = tmp_path / "ed.json"
    r = cli("attest", case["report"], "--key", _pem_key(key, tmp_path / "ed.pem"), "-o", bundle)
    assert r.exit_code == 0, r.output
    code, out = _verify(case, bundle, "--key", _pem_pub(key, tmp_path / "ed.pub.pem"), "--recompute")
    assert code == 0, out
    assert "recompute relation" in out


def test_bad_input_is_one_line(case, tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    r = cli("verify", case["report"], "--bundle", junk, "--key", case["pub"])
    assert r.exit_code == 2 and "not a Sigstore bundle" in r.output and "Traceback" not in r.output
    r = cli("verify", case["report"], "--bundle", case["bundle"])
    assert r.exit_code == 2 and "--key" in r.output
    r = cli("attest", case["report"], "-o", tmp_path / "b.json")
    assert r.exit_code == 2 and "--key" in r.output
    r = cli("attest", case["report"], "--key", case["pub"], "-o", tmp_path / "b.json")
    assert r.exit_code == 2 and "not a PEM private key" in r.output
