"""Signed provenance attestations: an in-toto Statement v1 about a model, in a DSSE envelope, in a Sigstore bundle.

Data flow: `statement(report, report_bytes, digests)` turns a saved report and each subject model's content digest
(content.py) into an in-toto statement: subjects are the models' content digests (`mtc1`, `mtv1`) and their fully
hashed weight files (`sha256`); the predicate (PREDICATE_TYPE) is the finding: relation, method, summary, parents
with recipe weights, intervals and p-values, the merge recipe, the evidence hashes, the report's own SHA-256, the
tool version and each model's tensor manifest. `sign(payload, signer)` signs the DSSE pre-authentication encoding
(securesystemslib's `Envelope.pae`) with an offline key (ECDSA P-256/384/521 or Ed25519, PEM), optionally with its
X.509 certificate chain, and writes a Sigstore bundle v0.3 (the layout OpenSSF model-signing writes for its own
key and certificate signatures; `sigstore_models` validates it on reading). `open_bundle` + `check_signature`
verify it against a trusted public key or a trusted root certificate and return the statement; every refusal is
one `AttestationError` sentence. Keyless (Fulcio/Rekor) signing goes through sigstore-python and needs a network
and an OIDC identity: it cannot run here and is not tested.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.dsse import Envelope

from modeltrace import __version__
from modeltrace.errors import InputError, ModelTraceError
from modeltrace.provenance.content import ContentDigest

__all__ = ["PREDICATE_TYPE", "PAYLOAD_TYPE", "BUNDLE_MEDIA_TYPE", "AttestationError", "Signed", "KeySigner",
           "statement", "sign", "open_bundle", "check_signature", "load_public_key"]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://modeltrace.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: subject digest names: the model digest and the values digest of content.py
MODEL_DIGEST = "mtc1"
VALUES_DIGEST = "mtv1"


class AttestationError(ModelTraceError):
    """A bundle or statement that does not verify; exit 1 from `verify` (the check ran and found a mismatch)."""

    exit_code = 1


@dataclass(frozen=True)
class Signed:
    """A verified bundle: the statement it signs and who signed it (key hint or certificate subject)."""

    statement: dict[str, Any]
    payload: bytes
    signer: str


# ---- statement -----------------------------------------------------------------------------------------------------
def _finding(subject: Any) -> dict[str, Any]:
    v = subject.audit
    if v is None:
        return {"relation": None, "summary": "described only (inspect); no provenance finding"}
    anc = {a.model: a for a in subject.ancestors}
    parents = []
    for p in v.parents:
        pv = v.p_values.get(p.model)
        a = anc.get(p.model)
        parents.append({"model": p.model, "location": (a.location if a else None) or v.sources.get(p.model),
                        "weight": p.weight, "interval": p.interval, "layers": p.layers,
                        "p_independent": pv.text if pv else None, "log10_p": pv.log10_p if pv else None})
    return {"relation": v.relation, "method": v.method, "summary": v.summary, "base": v.base, "parents": parents,
            "parameters": v.parameters, "recipe_mergekit": v.mergekit_yaml,
            "candidates": {k: {"p_independent": p.text, "log10_p": p.log10_p} for k, p in v.p_values.items()},
            "sample": v.sample}


def _evidence(subject: Any) -> list[dict[str, Any]]:
    ev = subject.evidence
    if ev is None:
        return []
    return [{"label": s.label, "role": s.role, "spec": s.spec, "commit": s.commit,
             "files": [{k: val for k, val in f.model_dump().items() if val is not None} for f in s.files]}
            for s in ev.sources]


def statement(report: Any, report_bytes: bytes, digests: dict[str, ContentDigest]) -> dict[str, Any]:
    """The in-toto statement for `report` (its subjects' content digests by subject name)."""
    subjects, models = [], []
    for s in report.subjects:
        d = digests.get(s.name)
        if d is None:
            raise InputError(f"no content digest for subject {s.name!r}")
        subjects.append({"name": s.name, "digest": {MODEL_DIGEST: d.model, VALUES_DIGEST: d.values}})
        own = next((x for x in (s.evidence.sources if s.evidence else []) if x.role in ("suspect", "model")), None)
        for f in own.files if own else []:
            sha = f.sha256 or f.lfs_sha256
            if sha and f.name.endswith((".safetensors", ".gguf", ".bin")):
                subjects.append({"name": f"{s.name}/{f.name}", "digest": {"sha256": sha}})
        models.append({"name": s.name, "location": s.location, "finding": _finding(s), "evidence": _evidence(s),
                       "content": d.to_dict()})
    predicate = {
        "report": {"sha256": hashlib.sha256(report_bytes).hexdigest(), "command": report.command,
                   "created": report.created, "schema_version": report.schema_version,
                   "tool_version": report.tool.version},
        "models": models,
        "tool": {"name": "modeltrace", "version": __version__},
        "attested": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    doc = {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": predicate}
    validate_statement(doc)
    return doc


def validate_statement(doc: Any) -> None:
    """The in-toto attestation library's own checks of a Statement v1 (type, subjects with digests, predicate)."""
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    if not isinstance(doc, dict):
        raise AttestationError("the signed payload is not an in-toto statement (not a JSON object)")
    try:
        pb = json_format.ParseDict(doc, statement_pb2.Statement(), ignore_unknown_fields=False)
        Statement.copy_from_pb(pb).validate()
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise AttestationError(f"the signed payload is not a valid in-toto Statement v1: {exc}") from None


def payload_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# ---- signing -------------------------------------------------------------------------------------------------------
def _hash_for(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]


def _check_key_type(key: Any, where: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise InputError(f"{where}: elliptic curve {key.curve.name} is not supported (P-256, P-384, P-521)")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"{where}: unsupported key type {type(key).__name__} (use ECDSA P-256/384/521 or Ed25519)")


def key_hint(public_key: Any) -> str:
    """SHA-256 of the PEM public key: the bundle's `publicKey.hint` (as model-signing computes it)."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror})") from None


class KeySigner:
    """An offline private key (PEM), optionally with its certificate and the chain up to a root."""

    def __init__(self, key_path: Path, password: bytes | None = None, certificate: Path | None = None,
                 chain: list[Path] | None = None) -> None:
        data = _read(key_path, "private key")
        try:
            self.key = serialization.load_pem_private_key(data, password)
        except TypeError:
            raise InputError(f"{key_path}: the private key is encrypted; give its password (--key-password-env)")\
                from None
        except ValueError as exc:
            msg = "wrong password or not a PEM private key" if password else "not a PEM private key"
            raise InputError(f"{key_path}: {msg} ({str(exc).splitlines()[0][:80]})") from None
        _check_key_type(self.key.public_key(), str(key_path))
        self.certs: list[x509.Certificate] = []
        if certificate is not None:
            leaf = _load_certs(certificate)[0]
            if leaf.public_key() != self.key.public_key():
                raise InputError(f"{certificate}: the certificate is for another key than {key_path}")
            self.certs = [leaf] + [c for p in chain or [] for c in _load_certs(p)]

    def sign(self, pae: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(pae, ec.ECDSA(_hash_for(self.key.public_key())))
        return self.key.sign(pae)

    def material(self) -> dict[str, Any]:
        if self.certs:
            raw = [{"rawBytes": base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()}
                   for c in self.certs]
            return {"x509CertificateChain": {"certificates": raw}, "tlogEntries": []}
        return {"publicKey": {"hint": key_hint(self.key.public_key())}, "tlogEntries": []}


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path, "certificate"))
    except ValueError:
        raise InputError(f"{path}: not a PEM certificate") from None
    if not certs:
        raise InputError(f"{path}: holds no certificate")
    return certs


def sign(doc: dict[str, Any], signer: KeySigner) -> dict[str, Any]:
    """A Sigstore bundle (v0.3 JSON) holding `doc` in a DSSE envelope signed by `signer`."""
    payload = payload_bytes(doc)
    pae = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={}).pae()
    sig = base64.b64encode(signer.sign(pae)).decode()
    return {"mediaType": BUNDLE_MEDIA_TYPE, "verificationMaterial": signer.material(),
            "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
                             "signatures": [{"sig": sig, "keyid": ""}]}}


def sign_keyless(doc: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - needs a network and an OIDC login
    """Keyless signing through Sigstore's public good instance (Fulcio certificate, Rekor entry)."""
    try:
        from sigstore import dsse
        from sigstore.models import ClientTrustConfig
        from sigstore.oidc import Issuer
        from sigstore.sign import SigningContext

        trust = ClientTrustConfig.production()
        ctx = SigningContext.from_trust_config(trust)
        token = Issuer(trust.signing_config.get_oidc_url()).identity_token()
        with ctx.signer(token) as s:
            bundle = s.sign_dsse(dsse.Statement(payload_bytes(doc)))
        return json.loads(bundle.to_json())
    except Exception as exc:  # noqa: BLE001 - any network or login failure is one line
        raise InputError(f"keyless signing failed (it needs network access to Sigstore and an OIDC login): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


# ---- verification --------------------------------------------------------------------------------------------------
def load_public_key(path: Path) -> Any:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise InputError(f"{path}: not a PEM public key or certificate") from None
    _check_key_type(key, str(path))
    return key


def open_bundle(path: Path) -> dict[str, Any]:
    """A bundle file, checked for the Sigstore bundle layout (sigstore_models) and for one DSSE envelope."""
    from pydantic import ValidationError
    from sigstore_models.bundle.v1 import Bundle

    text = _read(path, "bundle")
    try:
        doc = json.loads(text)
        Bundle.model_validate(doc)
    except (ValueError, UnicodeDecodeError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not JSON"
        raise InputError(f"{path}: not a Sigstore bundle ({first})") from None
    if not isinstance(doc.get("dsseEnvelope"), dict):
        raise InputError(f"{path}: the bundle holds no DSSE envelope (a modeltrace attestation has one)")
    return doc


def _b64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise AttestationError(f"the bundle's {what} is not valid base64") from None


def check_signature(bundle: dict[str, Any], public_key: Any | None = None,
                    trust_roots: list[Path] | None = None) -> Signed:
    """Verify the envelope's signature with a trusted public key, or its certificate chain up to a trusted root;
    return the signed statement. AttestationError (one sentence) for anything that does not hold."""
    env = bundle["dsseEnvelope"]
    payload = _b64(env.get("payload", ""), "payload")
    ptype = env.get("payloadType")
    if ptype != PAYLOAD_TYPE:
        raise AttestationError(f"the envelope's payload type is {ptype!r}, not {PAYLOAD_TYPE}")
    sigs = env.get("signatures") or []
    if len(sigs) != 1:
        raise AttestationError(f"the envelope carries {len(sigs)} signatures; expected one")
    sig = _b64(sigs[0].get("sig", ""), "signature")
    material = bundle["verificationMaterial"]
    if trust_roots:
        key, who = _trusted_leaf(material, trust_roots)
    elif public_key is not None:
        key, who = public_key, f"key {key_hint(public_key)[:16]}…"
        hint = (material.get("publicKey") or {}).get("hint")
        if hint and hint != key_hint(public_key):
            raise AttestationError(f"signed by another key (key hint {hint[:16]}…), not the trusted key "
                                   f"{key_hint(public_key)[:16]}…")
        if not hint and material.get("x509CertificateChain"):
            leaf = _chain(material)[0]
            if leaf.public_key() != public_key:
                raise AttestationError("signed with a certificate for another key than the trusted one")
    else:
        raise InputError("give the trusted public key (--key) or root certificate (--trust-root)")
    pae = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={}).pae()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, pae, ec.ECDSA(_hash_for(key)))
        else:
            key.verify(sig, pae)
    except InvalidSignature:
        raise AttestationError(f"the signature does not verify with {who}: the statement or the signature was "
                               "altered after signing") from None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise AttestationError("the signed payload is not JSON") from None
    validate_statement(doc)
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise AttestationError(f"the statement's predicate is {doc.get('predicateType')!r}, not a modeltrace "
                               f"provenance finding ({PREDICATE_TYPE})")
    return Signed(doc, payload, who)


def _chain(material: dict[str, Any]) -> list[x509.Certificate]:
    raw = (material.get("x509CertificateChain") or {}).get("certificates") or []
    if not raw and material.get("certificate"):
        raw = [material["certificate"]]
    if not raw:
        raise AttestationError("the bundle carries no certificate, so no root can vouch for it (verify with --key)")
    try:
        return [x509.load_der_x509_certificate(_b64(c.get("rawBytes", ""), "certificate")) for c in raw]
    except ValueError:
        raise AttestationError("the bundle's certificate is not a DER certificate") from None


def _trusted_leaf(material: dict[str, Any], roots: list[Path]) -> tuple[Any, str]:
    """The signing certificate's key, after its chain is verified up to one of `roots` (at the time the
    certificate was issued: bundles signed with an offline key carry no trusted timestamp) and it is checked to
    be meant for signatures (KeyUsage digitalSignature)."""
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    certs = _chain(material)
    leaf = certs[0]
    store = Store([c for p in roots for c in _load_certs(p)])

    def signing_use(_policy: Any, _cert: Any, ku: x509.KeyUsage | None) -> None:
        if ku is None or not ku.digital_signature:
            raise ValueError("the certificate is not for digital signatures")

    ee = ExtensionPolicy.permit_all().require_present(x509.KeyUsage, Criticality.AGNOSTIC, signing_use)
    verifier = (PolicyBuilder().store(store).time(leaf.not_valid_before_utc)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
                .build_client_verifier())
    try:
        verifier.verify(leaf, certs[1:])
    except VerificationError as exc:
        raise AttestationError(f"the signing certificate ({leaf.subject.rfc4514_string()}) is not trusted: "
                               f"{str(exc).splitlines()[0][:160]}") from None
    _check_key_type(leaf.public_key(), "signing certificate")
    return leaf.public_key(), f"certificate {leaf.subject.rfc4514_string()}"
