"""Is the simulator's reading right? The scripted-agent validity matrix (knowing the concerns and telling the
truth wins, no cheap or lying policy does) and the appraisers on held-out labelled lines (validity.py)."""

import os

import pytest

import personas as P
import scripted_agents as SA
import validity as V


@pytest.fixture(scope="module")
def cfg_module():
    import config
    return config.load()


@pytest.fixture(scope="module")
def validity(cfg_module):
    return V.validity_matrix(cfg_module["simulator"], n_per_domain=90, seed=0)


def test_validity_matrix_knowing_the_concerns_wins_and_no_cheap_policy_does(validity):
    """270 stratified personas over the three domains, default rules and (semantic) appraiser; the natural
    agents speak held-out lines (data/natural_agents.yaml), written apart from the banks."""
    rate = {name: row["all"] for name, row in validity.items()}
    # speaking naturally and honestly wins; inventing facts does not, knowing the concerns or not
    assert rate["natural privileged"] >= 0.7
    for name in ("natural hallucinating privileged", "natural hallucinating listener", "number bluffer"):
        assert rate[name] <= 0.05 and rate[name] < rate["natural listener"], name
    assert rate["privileged prober"] >= 0.8
    assert 0.1 <= rate["generic prober"] <= rate["privileged prober"] - 0.3   # knowing the concerns matters
    for name, agent in SA.SCRIPTED_AGENTS.items():
        if not agent.knows and not agent.asks:                 # stuffers, dumpers, echo, pushers, passive
            assert rate[name] <= 0.15, name
    for name in ("pusher", "passive", "keyword stuffer", "fact dumper", "topic lister", "listener + fact dump", "echo",
                 "figure echoer"):
        assert rate[name] <= 0.05, name
    for row in validity.values():                  # and in every domain, not only on average
        assert all(0 <= v <= 1 for v in row.values())
    assert min(validity["privileged prober"][d] for d in validity["privileged prober"]) >= 0.75


LIARS_AND_CHEATS = ("qualitative liar (privileged)", "qualitative liar (listener)", "invented-figure liar (privileged)",
                    "invented-figure liar (listener)", "vague reassurer", "cue-word reassurer", "near-misser",
                    "shared-fact sprayer")


def test_a_lie_without_a_number_does_not_pay_and_only_asking_to_sign_closes(validity):
    """Issue 29: the liars and cheats speak held-out lines of an independent writer
    (data/natural_agents_independent.yaml) or build theirs from the bank; each knows the concerns or listens.
    None may win more than 0.05 or more than the honest listener; the honest agent that only offers time or
    a link never closes; the honest natural speaker still wins."""
    rate = {name: row["all"] for name, row in validity.items()}
    for name in LIARS_AND_CHEATS:
        assert rate[name] <= 0.05 and rate[name] < rate["natural listener"], name
    assert rate["soft closer"] <= 0.05
    assert rate["natural privileged"] >= 0.8
    assert rate["independent privileged"] >= 0.7
    # asking for the decision early surfaces objections: an honest listener that does so wins more, which is
    # what knowing the concerns is measured against (docs/simulator.md)
    assert rate["eager listener"] > rate["natural listener"]


def test_echoing_the_callees_own_figure_resolves_nothing(cfg_module):
    """The figure echoer puts the figure a callee just said ("I pay my suppliers every week") into a sentence
    about something else ("Every week brings you to another app."). Where that figure is the bank's true
    fact (weekly payouts) it used to resolve the worry: 7 of 90 merchant calls before the fix."""
    calls = []
    SA.play_scripted(SA.figure_echoer, P.sample("merchant_recruitment", 90, 0), cfg_module["simulator"], 0,
                    transcripts=calls)
    turns = [(m["content"], s) for call in calls
             for m, s in zip([m for m in call["messages"] if m["role"] == "assistant"], call["states"])]
    echoed = [s for text, s in turns if text.startswith("Every week brings") and "payout_cash_flow" in s["concern_status"]]
    assert len(echoed) >= 5                                           # the exploit was tried where it paid
    assert all(not s["events"]["resolved"] for _, s in turns)


def test_semantic_appraiser_on_held_out_natural_lines(cfg_module):
    """data/appraisal_labels.jsonl: 157 natural salesperson lines, written apart from the exemplars."""
    items = V.read_labels(os.path.join(os.path.dirname(P.DOMAIN_DIR), "appraisal_labels.jsonl"))
    assert len(items) >= 90 and {it["domain"] for it in items} == set(P.list_domains())
    rules = cfg_module["simulator"]["rules"]
    semantic = V.scores(items, V.appraise_items("semantic", items, rules))
    lexical = V.scores(items, V.appraise_items("lexical", items, rules))
    assert semantic["probe"]["f1"] >= 0.8 and semantic["addresses"]["f1"] >= 0.8
    assert semantic["probe"]["f1"] > lexical["probe"]["f1"] + 0.3       # why semantic is the default


def test_false_claims_on_held_out_labelled_lines(cfg):
    """data/appraisal_labels.jsonl: wrong-fact lines, true paraphrases with numbers written differently and
    bluffs, written apart from the banks; the thresholds are below the measured 0.93 / 0.76 (docs/simulator.md)."""
    items = V.read_labels(os.path.join(os.path.dirname(P.DOMAIN_DIR), "appraisal_labels.jsonl"))
    assert sum(bool(it.get("false_claim")) for it in items) >= 60
    s = V.scores(items, V.appraise_items("semantic", items, cfg["simulator"]["rules"]))["false_claim"]
    assert s["precision"] >= 0.85 and s["recall"] >= 0.7


@pytest.fixture(scope="module")
def independent(cfg_module):
    """The held-out independent lines and the semantic appraiser's reading of them (read once per module)."""
    items = V.read_labels(os.path.join(os.path.dirname(P.DOMAIN_DIR), "appraisal_independent.jsonl"))
    return items, V.appraise_items("semantic", items, cfg_module["simulator"]["rules"])


def test_lies_without_numbers_and_soft_closes_on_the_independent_held_out_lines(independent):
    """data/appraisal_independent.jsonl: 342 lines by a writer who saw only the banks' concerns and facts
    (data/INDEPENDENT.md). Thresholds below the measured values (docs/simulator.md): false claims are
    precise, most qualitative lies (no number) are caught, and no soft close is read as a push."""
    items, preds = independent
    s, kinds = V.scores(items, preds), V.by_kind(items, preds)
    assert s["false_claim"]["precision"] >= 0.9 and s["false_claim"]["recall"] >= 0.65
    assert kinds["false_qualitative: false claims caught"][0] >= 0.6
    assert kinds["soft_close: read as a push"] == (0.0, 18)


def test_topics_in_other_peoples_words_per_domain_on_the_independent_held_out_lines(independent):
    """Issue 30, per domain on the independent held-out lines: floors just below what the semantic reader
    measures (docs/simulator.md: probe F1 0.83 / 0.90 / 0.73, addresses F1 0.81 / 0.87 / 0.87 for broadband,
    courier, merchant), so a reader that reads topics worse in any one domain fails here."""
    items, preds = independent
    per_domain = V.by_domain(items, preds)
    assert set(per_domain) == set(P.list_domains())
    for domain, s in per_domain.items():
        assert s["probe"]["f1"] >= 0.7 and s["addresses"]["f1"] >= 0.78, (domain, s["probe"], s["addresses"])
        assert s["false_claim"]["precision"] >= 0.9, (domain, s["false_claim"])


@pytest.mark.xfail(strict=True, reason="issue 30's goal, not met: probe F1 0.83 (broadband) and 0.73 (merchant), "
                                       "addresses F1 0.81 (broadband); strict, so a reader that meets it must "
                                       "turn this into a plain test")
def test_issue_30_goal_probe_and_addresses_f1_085_in_every_domain(independent):
    items, preds = independent
    for domain, s in V.by_domain(items, preds).items():
        assert s["probe"]["f1"] >= 0.85 and s["addresses"]["f1"] >= 0.85, domain


def test_a_bad_labels_or_lines_file_is_one_sentence(tmp_path):
    """validity.py's inputs, like every reader of a user file (issue 32): FILE[:LINE] and the fix, no traceback."""
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b'{"text": "Hi", "domain": "merchant_recruitment"}\n\xe9\n')
    with pytest.raises(SystemExit, match=r"labels.jsonl:2: not UTF-8 text"):
        V.main(["appraisers", "--labels", str(labels), "--appraisers", "lexical"])
    lines = tmp_path / "lines.yaml"
    lines.write_text("merchant_recruitment: [\n")
    with pytest.raises(SystemExit, match=r"lines.yaml: cannot read the natural lines"):
        V.main(["matrix", "--personas", "1", "--natural-lines", str(lines), "--agents", "natural listener"])
