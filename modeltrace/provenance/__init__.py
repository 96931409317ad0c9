"""Evidence anyone can check: content identities that survive re-sharding (content.py), signed in-toto provenance
attestations in DSSE / Sigstore bundles (attest.py), and their checks against a report and a model (check.py)."""

from modeltrace.provenance.content import ContentDigest, TensorDigest, compare, content_digest

__all__ = ["ContentDigest", "TensorDigest", "compare", "content_digest"]
