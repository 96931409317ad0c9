"""Licence identifiers as model cards write them (Hub ids) mapped to SPDX, and what a change between them means.

The Hub's `license:` field takes its own ids: most are lower-case SPDX ids (`apache-2.0`), some are not SPDX at all
(`llama3.1`, `openrail`, `other`). SBOMs need SPDX ids or `LicenseRef-` names; the card audit needs to know whether a
child's licence differs from its ancestors' and whether the ancestor's terms restrict that.
"""

from __future__ import annotations

from dataclasses import dataclass

from cyclonedx.spdx import fixup_id

#: Hub licence ids that are not SPDX ids (https://huggingface.co/docs/hub/repositories-licenses)
HUB_ONLY = {
    "openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "bsd", "c-uda", "cc", "gfdl", "gpl", "lgpl", "lgpl-lr", "h-research", "intel-research",
    "apple-ascl", "apple-amlr", "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3",
    "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "grok2-community", "openmdw-1.0", "other", "unknown",
}
#: licences whose terms restrict use or redistribution (non-commercial, acceptable-use, naming rules)
RESTRICTIVE_PREFIXES = ("cc-by-nc", "llama", "gemma", "fair-noncommercial", "deepfloyd", "apple-", "h-research",
                        "intel-research", "bigscience-", "creativeml-", "bigcode-", "openrail", "grok2", "c-uda")
COPYLEFT_PREFIXES = ("gpl", "agpl", "lgpl", "cc-by-sa", "mpl", "epl", "eupl", "osl", "cc-by-nc-sa")
#: permissive licences that still require the licence text and notices to travel with derivatives
NOTICE_REQUIRED = ("apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc-by-3.0", "isc")


@dataclass(frozen=True)
class Licence:
    raw: str
    key: str  # lower-case, for comparison
    spdx: str | None  # an SPDX id, or None when the id is not SPDX
    known: bool  # an SPDX id or a Hub id

    @property
    def ref(self) -> str:
        """SPDX id, else a LicenseRef- name usable in SBOMs."""
        if self.spdx:
            return self.spdx
        safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.key) or "unknown"
        return f"LicenseRef-hf-{safe}"

    @property
    def restrictive(self) -> bool:
        return self.key.startswith(RESTRICTIVE_PREFIXES)

    @property
    def copyleft(self) -> bool:
        return self.key.startswith(COPYLEFT_PREFIXES)

    @property
    def vague(self) -> bool:
        """`other`/`unknown`: a licence exists but the id says nothing a machine can check."""
        return self.key in ("other", "unknown")


def parse_licence(raw: str | None) -> Licence | None:
    if raw is None or not str(raw).strip():
        return None
    text = str(raw).strip()
    key = text.lower()
    spdx = fixup_id(text)
    return Licence(text, key, spdx, bool(spdx) or key in HUB_ONLY)


def same_terms(a: Licence, b: Licence) -> bool:
    return a.key == b.key or (a.spdx is not None and a.spdx == b.spdx)


def change_severity(child: Licence, parent: Licence) -> str:
    """How serious a licence change from `parent` to `child` is, for a finding.

    Restrictive or copyleft parents make relicensing a likely violation (critical); permissive parents such as
    Apache-2.0 allow other terms for a derivative only with their licence text and notices kept (high when the card
    does not mention them, which the caller decides)."""
    if parent.restrictive or parent.copyleft:
        return "critical"
    if parent.vague:
        return "medium"
    return "high"
