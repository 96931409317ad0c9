"""The bert and gpt2 families get disguise checks from their data alone (`[roles]` in their family files): a
permuted residual stream, permuted MLP units and permuted attention heads are seen through by the audit and by
identify. GPT-2's heads sit in a fused c_attn (q, k and v as column blocks of a Conv1D), which align/units.py cuts
into q, k and v: the one piece of code these families needed beyond their data.

Models are small random checkpoints (tests/family_models.py); the disguises are checked to preserve the function with
transformers before anything else relies on them.
"""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.align.roles import roles_named
from modeltrace.architectures import Slot, family_names
from modeltrace.audit import run_audit
from modeltrace.fingerprint import make_fingerprint
from modeltrace.identify import identify
from modeltrace.index import Index
from modeltrace.verdict import decide
from tests import disguise as D
from tests import family_models as F

FAMILIES = ("bert", "gpt2")


def _disguise(m: D.Model, seed: int) -> D.Model:
    rng = np.random.default_rng(seed)
    return F.permute_heads(F.permute_residual(F.permute_mlp(m, rng), rng), rng)


def _units_only(m: D.Model, seed: int) -> D.Model:
    """MLP units and attention heads permuted, the residual stream in place."""
    rng = np.random.default_rng(seed)
    return F.permute_heads(F.permute_mlp(m, rng), rng)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """Per family: base, two fine-tunes, their 0.6 / 0.4 linear merge, two independents (saved), and the merge and
    the base disguised."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for k, family in enumerate(FAMILIES):
        base = F.make(family, 10 * k)
        ft1, ft2 = F.fine_tune(base, 10 * k + 1), F.fine_tune(base, 10 * k + 2)
        models = {"base": base, "ft1": ft1, "ft2": ft2, "merge": F.linear_merge(ft1, ft2, 0.6),
                  "indep1": F.make(family, 10 * k + 3), "indep2": F.make(family, 10 * k + 4)}
        models["merge_disguised"] = _disguise(models["merge"], 10 * k + 5)
        models["base_disguised"] = _disguise(base, 10 * k + 6)
        models["merge_units"] = _units_only(models["merge"], 10 * k + 7)
        out[family] = {n: D.save(m, root / family / n) for n, m in models.items()}
    return out


def test_every_family_with_role_data_is_ready():
    ready = {n for n in family_names() if roles_named(n).ready}
    assert {"llama", "mixtral", "qwen_moe", "bert", "gpt2"} <= ready and "mpnet" not in ready
    gpt2, bert = roles_named("gpt2"), roles_named("bert")
    assert gpt2.axes("mlp_up") == ("residual", "mlp") and gpt2.axes("mlp_down") == ("mlp", "residual")
    assert bert.axes("mlp_up") == ("mlp", "residual") and bert.axes("attn_o_bias") == ("residual", "")
    assert bert.gain_slot(Slot("attn_q", 0)) == Slot("embed_norm")
    assert bert.gain_slot(Slot("attn_q", 1)) == Slot("mlp_norm", 0)
    assert bert.gain_slot(Slot("mlp_up", 1)) == Slot("attn_norm", 1)
    assert roles_named("qwen_moe").gain_slot(Slot("shared_expert_gate", 2)) == Slot("mlp_norm", 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_disguise_preserves_the_function(fam, tmp_path, family):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    plain = F.make(family, 99)
    paths = [D.save(m, tmp_path / n, dtype="F32") for n, m in (("a", plain), ("b", _disguise(plain, 7)))]
    ids = torch.tensor(rng.integers(0, F.V, (2, 12)))
    cls = tf.BertModel if family == "bert" else tf.GPT2LMHeadModel
    outs = []
    for p in paths:
        model = cls.from_pretrained(p).eval()
        with torch.no_grad():
            o = model(input_ids=ids)
        outs.append((o.pooler_output if family == "bert" else o.logits).numpy())
    assert np.abs(outs[0]).max() > 0 and np.allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_sees_through_a_disguised_merge(fam, family):
    p = fam[family]
    v = decide(run_audit(str(p["merge_disguised"]), [str(p["ft1"]), str(p["ft2"])]))
    assert (v["relation"], v["method"]) == ("merge", "linear"), v["summary"]
    w = {x["model"]: x["weight"] for x in v["parents"]}
    assert abs(w["ft1"] - 0.6) < 0.02 and abs(w["ft2"] - 0.4) < 0.02, w
    undone = " ".join(v["alignment"]["ft1"]["undone"])
    for note in ("residual stream permuted", "MLP units permuted in 2 of 2 layers", "attention heads permuted"):
        assert note in undone, undone


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_calls_a_disguised_copy_a_copy(fam, family):
    p = fam[family]
    v = decide(run_audit(str(p["base_disguised"]), [str(p["base"]), str(p["indep1"])]))
    assert v["relation"] == "copy" and v["parents"][0]["model"] == "base", v["summary"]


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_of_an_unrelated_model_stays_independent(fam, family):
    p = fam[family]
    v = decide(run_audit(str(p["indep2"]), [str(p["base_disguised"])]))
    assert v["relation"] == "independent", v["summary"]


@pytest.fixture(scope="module")
def index(fam, tmp_path_factory):
    ix = Index(tmp_path_factory.mktemp("family_index") / "ix.sqlite", create=True)
    for family, p in fam.items():
        for n in ("base", "ft1", "ft2", "indep1", "indep2"):
            assert ix.add(make_fingerprint(str(p[n])), f"{family}_{n}").status == "added"
    return ix


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("suspect, evidence, notes", [
    ("merge_disguised", "tokens", ("residual stream permuted",)),
    ("merge_units", "coordinates", ("MLP units permuted (or replaced) in 2 of 2 layers",)),
])
def test_identify_sees_through_a_disguised_merge(fam, index, family, suspect, evidence, notes):
    res = identify(make_fingerprint(str(fam[family][suspect])), index, top=5)
    assert (res["relation"], res["method"]) == ("merge", "linear"), res["summary"]
    w = {p["model"]: p["weight"] for p in res["parents"]}
    assert abs(w[f"{family}_ft1"] - 0.6) < 0.02 and abs(w[f"{family}_ft2"] - 0.4) < 0.02, res["summary"]
    assert res["disguise"]["evidence"] == evidence
    undone = "; ".join(res["disguise"]["undone"])
    for note in notes:
        assert note in undone, undone
    if suspect == "merge_units":  # heads named from the roles' spaces (align/roles.py), GPT-2's fused c_attn too
        assert "attention heads permuted (or replaced) in 2 of 2 layers" in undone, undone
