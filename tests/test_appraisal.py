"""The appraisers' reading of one agent turn (appraisal.py): asking is not telling, a fact answers a worry
only in a sentence about it and only if it is true, and every appraiser returns the one `Appraisal`."""

import os

import pytest
import torch

import appraisal as A
import facts as F
import lm
import personas as P
import validity as V


@pytest.mark.parametrize("kind", ["lexical", "semantic"])
def test_asking_is_a_probe_telling_is_not(rules, kind):
    texts = ["Can I ask how much commission you could afford?",          # a question: probe
             "Tell me how you feel about the commission we'd take.",      # an invitation: probe
             "Our commission is the lowest in town.",                     # a statement with the topic word
             "I won't bother you with questions about commission today.",  # a negated question
             "Commission is 15% for the first six months, with no setup fee."]   # an answer, not a probe
    got = V.appraise_items(kind, [{"text": t, "domain": "merchant_recruitment"} for t in texts], rules)
    assert ["commission_fees" in g.probed for g in got] == [True, True, False, False, False]
    assert "commission_fees" in got[4].addressed and "commission_fees" not in got[2].addressed


def test_every_concern_has_something_checkable_and_the_banks_own_answers_are_never_false(cfg):
    """The checker's precision floor: the bank's resolution and every answer exemplar, said right after the
    callee voiced the worry, are never read as a false claim (semantic appraiser)."""
    app = A.SemanticAppraiser(cfg["simulator"]["rules"])
    for domain in P.list_domains():
        bank = P.load_bank(domain)
        for c in bank["concerns"]:
            sheet = F.truth_book(bank)[c["id"]]
            assert sheet["figures"] or sheet["denies"] or sheet["asserts"], (domain, c["id"])
        items = [(c["id"], t) for c in bank["concerns"] for t in [c["resolution"], *c["answer_examples"]]]
        out = app([t for _, t in items], [domain] * len(items), [(cid,) for cid, _ in items])
        assert [(cid, t) for (cid, t), r in zip(items, out) if r.false_claims] == []
        assert sum(cid in r.addressed for (cid, _), r in zip(items, out)) >= 0.95 * len(items)


def test_a_bluff_is_checked_against_the_worry_just_voiced(cfg):
    """A statement naming no topic ("It's only 5 percent, nothing to worry about.") is about what the callee
    has just voiced; the same words with no worry voiced are unverifiable."""
    app = A.SemanticAppraiser(cfg["simulator"]["rules"])
    text = "It's only 5 percent, honestly nothing to worry about."
    heard, unheard = app([text, text], ["merchant_recruitment"] * 2, [("commission_fees",), ()])
    assert heard.false_claims == {"commission_fees"} and not heard.addressed
    assert "commission_fees" not in unheard.false_claims
    # ... and the true figure, said the same way, answers the voiced worry (listening)
    honest = app(["It's fifteen per cent."], ["merchant_recruitment"], [("commission_fees",)])[0]
    assert honest.addressed == {"commission_fees"} and not honest.false_claims


@pytest.mark.parametrize("kind", ["lexical", "semantic"])
def test_both_appraisers_flag_a_false_figure_and_it_addresses_nothing(cfg, kind):
    items = [{"text": "Commission is a flat thirty percent on every order.", "domain": "merchant_recruitment"},
             {"text": "Commission is 15% for the first six months, then 22%.", "domain": "merchant_recruitment"}]
    lie, truth = V.appraise_items(kind, items, cfg["simulator"]["rules"])
    assert lie.false_claims == {"commission_fees"} and not lie.addressed
    assert not truth.false_claims and truth.addressed == {"commission_fees"}


@pytest.mark.parametrize("sentence, answers", [
    ("Every week brings you to another app.", False),       # the payout fact's words, about another app
    ("Every week brings new customers to your door.", False),
    ("Every week you can grow with us.", False),
    ("Payouts come every week.", True),                      # about the worry: names or resembles it
    ("Every week, straight to your bank.", True),
    ("Every week.", True),                                   # a bare reply: about the worry just voiced
    ("Weekly, every Monday.", True),
])
def test_a_fact_answers_a_worry_only_in_a_sentence_about_it(cfg, sentence, answers):
    """The semantic appraiser: a resolve cue or a true figure of the worry the callee voiced answers it only
    where the sentence names or resembles that worry, or is a bare reply. The base policy won a held-out call
    with 'Every week brings you to another app.' after a payout-timing worry (docs/results.md)."""
    app = A.SemanticAppraiser(cfg["simulator"]["rules"])
    out = app([sentence], ["merchant_recruitment"], [("payout_cash_flow",)])[0]
    assert ("payout_cash_flow" in out.addressed) == answers and not out.false_claims


def test_bare_reply():
    assert A.bare_reply("It's fifteen per cent.") and A.bare_reply("Every week.")
    assert not A.bare_reply("Every week brings you to another app.")


@pytest.mark.parametrize("kind", ["lexical", "semantic"])
@pytest.mark.parametrize("domain, text, voiced", [
    # a cue word is not the fact (issue 29): each of these answered the worry before
    ("courier_recruitment", "Don't worry about that: guaranteed minimum, so you're covered.", "income_stability"),
    ("courier_recruitment", "Don't worry, you're covered.", "safety_insurance"),
    ("courier_recruitment", "Instant cash-out to your card is for top-rated riders only, everyone else waits.", "payment_delay"),
    # the voiced worry's topic word beside a true fact of another concern
    ("courier_recruitment", "About getting paid: every rider has free accident insurance.", "payment_delay"),
])
def test_a_cue_word_or_another_facts_truth_answers_nothing(rules, kind, domain, text, voiced):
    (got,) = V.appraise_items(kind, [{"text": text, "domain": domain, "voiced": [voiced]}], rules)
    assert voiced not in got.addressed


@pytest.mark.parametrize("kind", ["lexical", "semantic"])
def test_only_an_ask_to_decide_now_is_a_push(rules, kind):
    """A soft close -- time to think, a call back, a link 'with more information' -- does not ask for the
    decision, so a callee never accepts on it (issue 29)."""
    soft = ["Would you like to sleep on it and I'll ring you next week?", "Can I send you the link with more information?",
            "No pressure. Have a think and I'll give you a ring next week.", "Shall I email you the price breakdown?"]
    pushes = ["Can I put you down as a new rider while we're chatting?", "Shall I get you started today?",
              "Are you in? Say the word and I'll register you straight away.", "Would you like to switch today?"]
    items = [{"text": t, "domain": "courier_recruitment"} for t in soft + pushes]
    got = V.appraise_items(kind, items, rules)
    assert [g.push for g in got] == [False] * len(soft) + [True] * len(pushes)


def test_a_bank_edit_makes_the_reader_rebuild(cfg, tmp_path, monkeypatch):
    """The reader's vectors of a bank are cached on disk under a key of the bank's whole content (issue 30):
    the same bank is read back, not rebuilt; one edited exemplar gives a new key, a rebuild and a new topic."""
    monkeypatch.setattr(lm, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "_BANK_CACHE", {})
    monkeypatch.setattr(P, "_BANK_PATHS", {})
    text = open(os.path.join(P.DOMAIN_DIR, "merchant_recruitment.yaml")).read()
    text = text.replace("name: merchant_recruitment", "name: cache_test_bank", 1)
    original = tmp_path / "bank.yaml"
    original.write_text(text)
    rules = cfg["simulator"]["rules"]
    first = A.SemanticAppraiser(rules)
    topic = first._bank(str(original))["topic"]
    assert len(first.built) == 1 and os.path.isfile(first.built[0])
    again = A.SemanticAppraiser(rules)
    assert torch.equal(again._bank(str(original))["topic"], topic) and again.built == []   # read, not rebuilt
    old = "Is the cut we'd take from each order something that worries you?"
    assert old in text
    original.write_text(text.replace(old, "Does paying us a slice of every sale keep you up at night?"))
    monkeypatch.setattr(P, "_BANK_CACHE", {})    # as in a new process: the edited file is read again
    rebuilt = A.SemanticAppraiser(rules)
    new_topic = rebuilt._bank(str(original))["topic"]
    assert len(rebuilt.built) == 1 and rebuilt.built[0] != first.built[0]
    assert not torch.equal(new_topic[0], topic[0]) and torch.equal(new_topic[1:], topic[1:])
