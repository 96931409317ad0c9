"""The alignment core shared by the audit (align/disguise.py, on full weights) and identify (fingerprint/undisguise.py,
on fingerprints): the acceptance thresholds, the residual-stream map, and the orthogonal (Procrustes) fit.

Data flow: callers hand in token rows (suspect and candidate, the same tokens) or their cross-products; the fit returns
an orthogonal map and its held-out R², and a `ResidualMap` carries whichever map (permutation or rotation) was
accepted to the code that reads candidate tensors in the suspect's basis. Memory: an H x H cross-product and its SVD
(three H x H float64 matrices) per fit; nothing is kept between calls. What each role reads and writes lives in
align/roles.py (from the family data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ACCEPT_LOG10P", "IDENTITY_TAU", "LAYER_MARGIN", "LAYER_MIN_SIM", "MIN_AGREE_SHARE", "MIN_LINE",
           "MIN_PLACED_SHARE", "PERMUTATION_R2_SLACK", "RESIDUAL_MIN_COS", "ROTATION_MIN_R2", "SMALL_MIN_COS",
           "Z_IDENTITY", "Z_STRONG", "Z_WEAK", "ResidualMap", "heldout_r2", "orthogonal", "procrustes", "scaled_r2"]

# ---- acceptance thresholds ------------------------------------------------------------------------------------
#: The layer map's identity similarity (centred cosine of sampled rows) below which a candidate is aligned.
IDENTITY_TAU = 0.2
#: z above which a group (units, or the token rows' residual dimensions) is taken as not permuted.
Z_IDENTITY = 8.0
#: A permutation (units, or the residual stream from fingerprints) is accepted only where its agreement test is at
#: least this significant (log10 p).
ACCEPT_LOG10P = -6.0
#: Residual permutation (audit) accepted when the median matched column cosine reaches this.
RESIDUAL_MIN_COS = 0.3
#: Rotation accepted when an orthogonal fit on half the tokens explains this share of the other half (a merge's
#: minor parent explains ~0.3; an unrelated model gives <= 0).
ROTATION_MIN_R2 = 0.2
#: Head, group and expert matchings accepted when the matched pairs' mean cosine reaches this.
SMALL_MIN_COS = 0.3
#: A layer is remapped when its signature matches another layer this well and clearly better than the runner-up.
LAYER_MIN_SIM, LAYER_MARGIN = 0.5, 0.1
#: Residual permutation (fingerprints) accepted when two matchings on disjoint token halves agree on this share of
#: dimensions (independent models trained on the same data agree on a few privileged dimensions beyond chance).
MIN_AGREE_SHARE = 0.5
#: A matched permutation is used for identify's recipe only when it explains held-out token rows nearly as well as
#: a rotation (where one can be fitted): true permutations fit at least as well in the test corpus (the rotation's
#: freedom overfits), rotated streams lose 0.9 to it.
PERMUTATION_R2_SLACK = 0.1
#: A fingerprint slot whose same-slot z stays below Z_WEAK while another role of its layer exceeds Z_STRONG is
#: disguised ...
Z_WEAK, Z_STRONG = 3.0, 10.0
#: ... or whose `placed_z` stays below this share of an exact copy's.
MIN_PLACED_SHARE = 0.25
#: ... or among whose lines (rows or columns, of at least MIN_LINE values) some match the candidate's line for line
#: (z >= Z_STRONG) and some do not relate (z < Z_WEAK, or under half the lines' median z): units or heads moved
#: within the sampled block. The lines of a merge or fine-tune relate alike (z spread 1 to 2 around the median).
MIN_LINE = 16


@dataclass
class ResidualMap:
    """How the suspect's residual stream sits in the candidate's: W_s ~ W_c M for tensors that read the residual
    (columns), W_s ~ M^T W_c for tensors that write it (rows). M is a permutation (`perm`: candidate dimension of each
    suspect dimension) or a dense orthogonal matrix (`rot`, H_c x H_s); neither means identity.

    `status` records a test's outcome where no map was built: "none" (tested, not accepted), "permuted" (accepted,
    map not computed), "identity" (accepted, and the identity); `agree` of `tested` dimensions agreed between two
    matchings, with the count's `log10_p` (0 unless accepted)."""

    perm: np.ndarray | None = None
    rot: np.ndarray | None = None
    status: str = ""
    agree: int = 0
    tested: int = 0
    log10_p: float = 0.0

    @property
    def kind(self) -> str:
        if self.rot is not None:
            return "rotated"
        if self.status:
            return self.status
        return "permuted" if self.perm is not None else "identity"

    @property
    def share(self) -> float:
        return self.agree / self.tested if self.tested else 0.0

    def cols(self, x: np.ndarray, coords: np.ndarray | None = None, gain: np.ndarray | None = None) -> np.ndarray:
        """Candidate rows `x` (residual along columns, candidate order) in suspect coordinates `coords`."""
        if gain is not None:
            x = x * gain[None, :]
        if self.rot is not None:
            m = self.rot if coords is None else self.rot[:, coords]
            return np.ascontiguousarray(x @ m, dtype=np.float32)
        if self.perm is not None:
            return np.ascontiguousarray(x[:, self.perm if coords is None else self.perm[coords]])
        return x if coords is None else np.ascontiguousarray(x[:, coords])

    def rows(self, x: np.ndarray, coords: np.ndarray, gain: np.ndarray | None = None) -> np.ndarray:
        """A whole candidate tensor `x` with the residual along rows, at suspect residual rows `coords`: k x cols."""
        if gain is not None:
            x = x * gain[:, None]
        if self.rot is not None:
            return (self.rot[:, coords].T @ x).astype(np.float32)
        return np.ascontiguousarray(x[coords if self.perm is None else self.perm[coords]])


# ---- the orthogonal fit ---------------------------------------------------------------------------------------
def orthogonal(cross: np.ndarray) -> np.ndarray:
    """The orthogonal M maximising trace(M^T cross), for cross = Xc^T Xs: the Procrustes solution of Xc M ~ Xs."""
    u, _, vt = np.linalg.svd(cross)
    return u @ vt


def scaled_r2(tgt: np.ndarray, pred: np.ndarray) -> float:
    """Share of `tgt`'s variance that `pred` explains, up to one scale (fitted on `tgt`)."""
    scale = float((pred * tgt).sum()) / max(float((pred * pred).sum()), 1e-300)
    den = float(((tgt - tgt.mean(axis=0)) ** 2).sum())
    return 1 - float(((tgt - scale * pred) ** 2).sum()) / den if den > 0 else -math.inf


def heldout_r2(es: np.ndarray, pred: np.ndarray) -> float:
    """R² of `pred` (best scalar multiple, fitted on even rows) for `es` on odd rows."""
    fit, held = slice(0, None, 2), slice(1, None, 2)
    den_fit = float((pred[fit] ** 2).sum())
    scale = float((es[fit] * pred[fit]).sum()) / den_fit if den_fit > 0 else 0.0
    tgt = es[held]
    den = float(((tgt - tgt.mean(axis=0)) ** 2).sum())
    return 1 - float(((tgt - scale * pred[held]) ** 2).sum()) / den if den > 0 else -math.inf


def procrustes(xs: np.ndarray, xc: np.ndarray) -> tuple[np.ndarray, float]:
    """Orthogonal M with xc M ~ xs (up to scale), rows in memory: fitted on even rows, R² on odd rows, then refitted
    on all. (The audit streams the same fit's cross-products: align/residual.py.)"""
    ev, od = slice(0, None, 2), slice(1, None, 2)
    r2 = scaled_r2(xs[od], xc[od] @ orthogonal(xc[ev].T @ xs[ev]))
    return orthogonal(xc.T @ xs), r2
