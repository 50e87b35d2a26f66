import copy
import os

import pytest

import personas as P
import appraisal as A
import simulator as S
from conftest import make_tiny_model


def persona_with(concern_ids, willingness=1.0, domain="merchant_recruitment", severity=2):
    bank = P.load_bank(domain)
    by_id = {c["id"]: c for c in bank["concerns"]}
    concerns = [P.Concern(**{**{k: by_id[i][k] for k in P._CONCERN_FIELDS if k != "severity"}, "severity": severity})
                for i in concern_ids]
    return P.Persona(persona_id="test", domain=domain, name="Maria Rossi", traits={"business_type": "pizzeria"},
                     style="terse", willingness=willingness, concerns=concerns, stratum="test")


def appraisal(probed=(), addressed=(), push=False, off_topic=False, too_long=False, open_probe=False,
              false_claims=(), about=(), incoherent=()):
    return {"probed": set(probed), "addressed": set(addressed), "push": push, "off_topic": off_topic,
            "too_long": too_long, "open_probe": open_probe, "false_claims": set(false_claims), "about": set(about),
            "incoherent": list(incoherent)}


@pytest.fixture
def rules(cfg):
    return cfg["simulator"]["rules"]


def step(state, persona, rules, **kw):
    return S.transition(state, persona, appraisal(**kw), rules, max_turns=10)


def test_concern_hidden_until_asked_then_revealed(rules):
    p = persona_with(["commission_fees"])                       # disclosure: probe
    s0 = S.initial_state(p, rules)
    s1 = step(s0, p, rules)                                    # small talk
    assert s1.concern_status["commission_fees"] == "hidden"
    s2 = step(s1, p, rules, probed={"commission_fees"})
    assert s2.concern_status["commission_fees"] == "revealed"
    assert s2.willingness == pytest.approx(s1.willingness + rules["reveal_gain"])
    assert s2.events["revealed"] == ["commission_fees"]


@pytest.mark.parametrize("kind", ["lexical", "semantic"])
def test_asking_is_a_probe_telling_is_not(rules, kind):
    texts = ["Can I ask how much commission you could afford?",          # a question: probe
             "Tell me how you feel about the commission we'd take.",      # an invitation: probe
             "Our commission is the lowest in town.",                     # a statement with the topic word
             "I won't bother you with questions about commission today.",  # a negated question
             "Commission is 15% for the first six months, with no setup fee."]   # an answer, not a probe
    got = A.appraise_items(kind, [{"text": t, "domain": "merchant_recruitment"} for t in texts], rules)
    assert ["commission_fees" in g["probed"] for g in got] == [True, True, False, False, False]
    assert "commission_fees" in got[4]["addressed"] and "commission_fees" not in got[2]["addressed"]


def test_guarded_concern_needs_two_specific_probes(rules):
    p = persona_with(["hidden_deductions"])                     # disclosure: guarded
    s = S.initial_state(p, rules)
    s = step(s, p, rules, probed={"hidden_deductions"})
    assert s.concern_status["hidden_deductions"] == "hidden"
    s = step(s, p, rules, open_probe=True)                      # an open question does not open a guarded one
    assert s.concern_status["hidden_deductions"] == "hidden"
    s = step(s, p, rules, probed={"hidden_deductions"})
    assert s.concern_status["hidden_deductions"] == "revealed"


def test_open_probe_draws_out_the_most_severe_probe_concern_one_per_turn(rules):
    p = persona_with(["contract_lockin", "commission_fees", "scam_suspicion"])   # probe, probe, push
    p.concerns[1].severity = 3
    s = step(S.initial_state(p, rules), p, rules, open_probe=True)
    assert s.events["revealed"] == ["commission_fees"]           # the more severe probe concern first
    s = step(s, p, rules, open_probe=True, about={"commission_fees"})   # "thanks; anything else on your mind?"
    assert s.events["revealed"] == ["contract_lockin"]
    s = step(s, p, rules, open_probe=True, about={"contract_lockin"})   # only the push concern is left: nothing
    assert s.events["revealed"] == [] and s.concern_status["scam_suspicion"] == "hidden"


def test_push_concern_blurted_out_when_pushed(rules):
    p = persona_with(["scam_suspicion"])                        # disclosure: push
    s = step(S.initial_state(p, rules), p, rules, push=True)
    assert s.concern_status["scam_suspicion"] == "revealed"


def test_an_answer_resolves_only_a_concern_voiced_in_an_earlier_turn(rules):
    p = persona_with(["commission_fees"], severity=3)
    # asked and answered in the same breath: revealed now, but the answer came before the callee spoke
    s = step(S.initial_state(p, rules), p, rules, probed={"commission_fees"}, addressed={"commission_fees"})
    assert s.concern_status["commission_fees"] == "revealed"
    s2 = step(s, p, rules, addressed={"commission_fees"})
    assert s2.concern_status["commission_fees"] == "resolved"
    assert s2.delta_willingness == pytest.approx(rules["resolve_gain"] * 3)
    # answering a concern that was never voiced does nothing
    s3 = step(S.initial_state(p, rules), p, rules, addressed={"commission_fees"})
    assert s3.concern_status["commission_fees"] == "hidden" and s3.delta_willingness == 0


def test_checklists_and_pitches_count_for_no_specific_concern(rules):
    p = persona_with(["hidden_deductions", "commission_fees"])   # guarded, probe
    listed = {"hidden_deductions", "contract_lockin", "packaging_cost"}          # 3 > max_topics
    s = step(S.initial_state(p, rules), p, rules, probed=listed)
    assert s.events["checklist"] and s.probes["hidden_deductions"] == 0
    assert s.events["revealed"] == ["commission_fees"]          # ... it is one open question
    pitched = {"commission_fees", "contract_lockin", "packaging_cost"}
    s2 = step(s, p, rules, addressed=pitched)
    assert s2.events["pitch"] and s2.concern_status["commission_fees"] == "revealed"   # nothing resolved
    s3 = step(s, p, rules, addressed={"commission_fees", "contract_lockin"})         # 2 topics: fine
    assert s3.concern_status["commission_fees"] == "resolved"


def test_pushing_with_open_concerns_lowers_willingness(rules):
    p = persona_with(["commission_fees"], willingness=2.0)
    s = step(S.initial_state(p, rules), p, rules, push=True)
    assert s.willingness == pytest.approx(2.0 - rules["push_penalty"])
    assert s.decision == "continue"


def test_patience_running_out_ends_in_hangup(rules):
    p = persona_with(["commission_fees"], willingness=2.0)
    s = S.initial_state(p, rules)
    for _ in range(rules["patience"] - 1):
        s = step(s, p, rules)
        assert s.decision == "continue"
    s = step(s, p, rules)
    assert s.decision == "hangup" and s.patience == 0
    # an over-long turn costs patience twice
    s = step(S.initial_state(p, rules), p, rules, too_long=True)
    assert s.patience == rules["patience"] - 2


def test_accept_only_under_the_documented_condition(rules):
    p = persona_with(["commission_fees", "contract_lockin"], willingness=2.0, severity=1)
    s = S.initial_state(p, rules)
    s = step(s, p, rules, probed={"commission_fees", "contract_lockin"})
    s = step(s, p, rules, addressed={"commission_fees"}, push=True)    # one concern still open: no accept
    assert s.decision == "continue" and s.concern_status["commission_fees"] == "resolved"
    s = step(s, p, rules, addressed={"contract_lockin"})
    assert all(v == "resolved" for v in s.concern_status.values())
    assert s.willingness >= rules["accept_threshold"]
    assert s.decision == "continue"                            # no push, no accept
    s_push = step(s, p, rules, push=True)
    assert s_push.decision == "accept"
    # everything resolved but willingness below the threshold: a push is not enough
    low = copy.deepcopy(s)
    low.willingness = rules["accept_threshold"] - 0.5
    assert step(low, p, rules, push=True).decision == "continue"


def test_reject_and_timeout(rules):
    p = persona_with(["commission_fees"], willingness=0.25)
    assert step(S.initial_state(p, rules), p, rules, off_topic=True).decision == "reject"
    p2 = persona_with(["commission_fees"], willingness=2.0)
    s = S.initial_state(p2, rules)
    s = S.transition(s, p2, appraisal(probed={"commission_fees"}), rules, max_turns=1)
    assert s.decision == "timeout"


def test_a_false_claim_resolves_nothing_costs_trust_and_a_second_ends_the_call(rules):
    p = persona_with(["commission_fees", "contract_lockin"], willingness=2.5, severity=1)
    s = step(S.initial_state(p, rules), p, rules, probed={"commission_fees", "contract_lockin"})
    lied = step(s, p, rules, addressed={"contract_lockin"}, false_claims={"commission_fees"})   # "a flat 30%"
    assert lied.concern_status == {"commission_fees": "revealed", "contract_lockin": "revealed"}   # nothing resolved
    assert lied.delta_willingness == pytest.approx(-rules["false_claim_penalty"])
    assert lied.events["false_claims"] == ["commission_fees"] and lied.decision == "continue"
    honest = step(s, p, rules, addressed={"contract_lockin"})
    assert honest.concern_status["contract_lockin"] == "resolved"
    again = step(lied, p, rules, false_claims={"packaging_cost"})   # any fact of the bank counts
    assert again.decision == "reject" and again.false_claims_caught == rules["false_claims_to_reject"]


def test_an_incoherent_turn_does_nothing(rules):
    """A turn that speaks for the callee or repeats itself draws nothing out, resolves nothing and pushes
    nothing, even if its words hold a worry word or a fact."""
    p = persona_with(["commission_fees"], willingness=3.0)
    s = step(S.initial_state(p, rules), p, rules, probed={"commission_fees"})
    for reason in ("speaks_for_callee", "repeats_itself"):
        t = step(S.initial_state(p, rules), p, rules, probed={"commission_fees"}, open_probe=True,
                 incoherent=[reason])
        assert t.concern_status["commission_fees"] == "hidden" and t.events["incoherent"] == [reason]
        assert t.delta_willingness == pytest.approx(-rules["incoherent_penalty"])
        u = step(s, p, rules, addressed={"commission_fees"}, push=True, incoherent=[reason])
        assert u.concern_status["commission_fees"] == "revealed" and u.decision == "continue"


def test_ignoring_the_worry_just_voiced_draws_nothing_out(rules):
    """After 'I don't want to get stuck in some long contract', asking again 'is there a concern you'd
    like to share?' ignores it: no new reveal, a small cost, and the callee says the worry again."""
    p = persona_with(["contract_lockin", "commission_fees"], willingness=2.0)
    s = step(S.initial_state(p, rules), p, rules, probed={"contract_lockin"})
    assert s.events["revealed"] == ["contract_lockin"]
    ignored = step(s, p, rules, open_probe=True)
    assert ignored.events["revealed"] == [] and ignored.events["incoherent"] == ["ignores_worry"]
    assert ignored.events["ignored"] == ["contract_lockin"]
    assert ignored.delta_willingness == pytest.approx(-rules["ignore_penalty"])
    heard = step(s, p, rules, open_probe=True, about={"contract_lockin"})   # "thanks; anything else?"
    assert heard.events["revealed"] == ["commission_fees"] and not heard.events["incoherent"]
    answered = step(s, p, rules, addressed={"contract_lockin"})
    assert answered.events["resolved"] == ["contract_lockin"] and not answered.events["incoherent"]
    import random
    line = S.CognitiveUserSimulator({"rules": rules, "appraiser": "lexical", "utterance": "template",
                                     "max_turns": 4})._template_line(p, ignored, random.Random(0))
    assert p.concerns[0].statement in line


def test_turns_that_are_not_a_salespersons_line_are_recognised():
    p = persona_with(["commission_fees"])      # Maria Rossi
    for text in ["Here's an alternative: Customer: Hello? Sam: Hi, what worries you?",
                 "This is the owner speaking. Is there anything to share about something they worry about.",
                 "Maria: I'm not sure about the fees.", "I'm worried about the commission, honestly.",
                 "Sam: Hi there.\nCustomer: Who is this?"]:
        assert S.speaks_for_callee(text, p), text
    for text in ["I understand you're worried about the commission.", "Hi Maria, this is Sam from QuickBite.",
                 "Is the commission a worry for you?", "Thanks for telling me about the owner's concerns."]:
        assert not S.speaks_for_callee(text, p), text
    assert S.repeats_itself("Is there a concern you'd like to share?", ["Hello!", "Is there a concern you'd like to share?"])
    assert S.repeats_itself("is there a concern you'd like to share", ["Is there a concern you'd like to share?!"])
    assert not S.repeats_itself("Shall we get you listed today?",
                                ["Commission is 15% for six months. Shall we get you listed today?"])   # re-asking one part
    assert not S.repeats_itself("What's on your mind?", [])


def test_the_simulator_counts_false_claims_and_incoherent_turns(cfg):
    sim_cfg = {**cfg["simulator"], "appraiser": "lexical", "utterance": "template"}
    sim = S.CognitiveUserSimulator(sim_cfg, seed=0)
    ps = [persona_with(["commission_fees"], willingness=2.0), persona_with(["contract_lockin"], willingness=2.0)]
    sim.reset(ps)
    sim.step(["Customer: hello? Sam: Do you worry about the commission?", "Is a long contract a worry for you?"])
    users, states, _ = sim.step(["What's on your mind?", "Is a long contract a worry for you?"])
    assert states[1].events["incoherent"] == ["repeats_itself"]
    users, states, _ = sim.step(["Commission is a flat thirty percent on every order.", "Nice weather."])
    assert states[0].events["false_claims"] == ["commission_fees"]
    assert sim.stats["speaks_for_callee"] == 1 and sim.stats["repeats_itself"] == 1 and sim.stats["false_claims"] == 1
    assert "not" in users[0].lower() or "n't" in users[0].lower()        # "Hold on, that's not true, is it?"


def test_generative_parser_is_strict():
    ids = {"commission_fees", "contract_lockin"}
    good = ("<asked>commission_fees</asked><answered>none</answered><open_question>no</open_question>"
            "<push>no</push><off_topic>no</off_topic>")
    assert A.parse_generative(good, ids) == {"probed": {"commission_fees"}, "addressed": set(), "open_probe": False,
                                             "push": False, "off_topic": False}
    for bad in ["", "yes", good.replace("commission_fees", "made_up"), good + " extra",
                good.replace("<push>no</push>", "<push>maybe</push>")]:
        assert A.parse_generative(bad, ids) is None


def test_echo_and_role_inversion_detection():
    assert S.echoes("Sure, we offer the best commission rates in town", "We offer the best commission rates in town!")
    assert not S.echoes("The commission worries me.", "What do you think about the commission?")
    assert S.echoes("The Great One Calls.", "The Great One Calls.")            # short turns echo whole
    assert not S.echoes("Hello, yes?", "Hello!")
    assert S.ROLE_INVERSION.search("Agent: hello there")
    assert S.ROLE_INVERSION.search("Hi, I'm calling from QuickBite")
    assert not S.ROLE_INVERSION.search("Hello, who is this?")


def test_template_simulator_runs_batched_dialogues_and_words_follow_state(cfg):
    sim_cfg = {**cfg["simulator"], "utterance": "template"}                  # the default (semantic) appraiser
    ps = [persona_with(["commission_fees"], willingness=2.0), persona_with(["contract_lockin"], willingness=2.0)]
    sim = S.CognitiveUserSimulator(sim_cfg, seed=0)
    openings = sim.reset(ps)
    assert len(openings) == 2 and all(openings)
    users, states, done = sim.step(["How do you feel about the commission we take on each order?", "Nice weather today."])
    assert states[0].concern_status["commission_fees"] == "revealed"
    assert ps[0].concerns[0].statement in users[0]                 # the reveal is voiced
    assert states[1].concern_status["contract_lockin"] == "hidden"
    assert ps[1].concerns[0].statement not in users[1]             # nothing hidden is voiced
    users, states, done = sim.step(["You'd pay fifteen percent for your first six months and nothing to set up. "
                                    "Shall I get your restaurant listed today?", "Nice weather today."])
    assert states[0].decision == "accept" and done[0] and not done[1]
    users, states, done = sim.step(["ignored", "Nice weather today."])
    assert users[0] is None                                        # a finished dialogue stays finished


def test_generative_appraiser_survives_garbage(tokenizer, cfg):
    model = make_tiny_model(tokenizer)  # random weights: its "tags" are garbage
    sim_cfg = {**cfg["simulator"], "appraiser": "generative", "utterance": "template", "generative_max_tokens": 8}
    sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0)
    p = persona_with(["commission_fees"], willingness=2.0)
    sim.reset([p, p])
    users, states, done = sim.step(["How much commission could you pay?", "Hello"])
    assert sim.stats["parse_failures"] == 2
    assert states[0].concern_status["commission_fees"] == "revealed"   # the lexical fallback decided


def test_llm_utterances_on_garbage_model_fall_back_and_are_counted(tokenizer, cfg):
    model = make_tiny_model(tokenizer)
    sim_cfg = {**cfg["simulator"], "utterance": "llm", "max_new_tokens": 6, "max_turns": 3}
    sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0)
    p = persona_with(["commission_fees"], willingness=2.0)
    sim.reset([p, p, p])
    for turn in range(3):
        users, states, done = sim.step(["How much commission could you pay?"] * 3)
        for u, s in zip(users, states):
            if u is not None:
                assert u.strip()
        if turn == 0:
            assert all(p.concerns[0].statement in u for u in users)  # random words cannot voice it: fallback
            # the simulator's own view was rolled back to hold what the user "said", not the garbage
            view_text = tokenizer.decode(sim.view.ids(0))
            assert view_text.rstrip().endswith(users[0] + tokenizer.eos_token)
    assert all(done)
    problems = sim.stats["empty_turns"] + sim.stats["role_inversions"] + sim.stats["inconsistent_lines"]
    assert problems >= 3
    assert not sim.view.keys                                         # finished dialogues left the batch


def test_llm_appraiser_is_calibrated_and_deterministic_real_model(real_model, cfg):
    """The 135M model cannot tell asking from telling (F1 ~0.1, README): what is tested here is the
    mechanism -- contextual calibration, determinism, and the bank's other concerns (for the checklist
    count) coming from the lexical appraiser."""
    tokenizer, model = real_model
    app = A.LLMAppraiser(model, tokenizer, cfg["simulator"]["rules"])
    q = dict(A.llm_questions("merchant_recruitment", ["commission_fees"]))["probed:commission_fees"]
    texts = ["Are you worried about the commission we take from each order?", app.CONTENT_FREE]
    scores = app.calibrated([(t, q) for t in texts])
    assert scores == app.calibrated([(t, q) for t in texts])     # same input, same answer
    assert abs(scores[1]) < 1e-5                                 # the content-free message is the zero point
    text = "Is it the contract, the packaging or the reviews that worry you?"   # other concerns, by cue words
    out = app([text], ["merchant_recruitment"], [["commission_fees"]])[0]
    assert {"contract_lockin", "packaging_cost", "ratings_reviews"} <= out["probed"]
    assert set(out) == {"probed", "addressed", "open_probe", "push", "off_topic", "too_long", "false_claims", "about"}
    assert out == app([text], ["merchant_recruitment"], [["commission_fees"]])[0]


# ----------------------------------------------------------------------------- validity and robustness

@pytest.fixture(scope="module")
def validity(cfg_module):
    return S.validity_matrix(cfg_module["simulator"], n_per_domain=90, seed=0)


@pytest.fixture(scope="module")
def cfg_module():
    import config
    return config.load()


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
    for name, (_, knows, asks) in S.SCRIPTED_AGENTS.items():
        if not knows and not asks:                 # stuffers, dumpers, echo, pushers, passive
            assert rate[name] <= 0.15, name
    for name in ("pusher", "passive", "keyword stuffer", "fact dumper", "topic lister", "listener + fact dump", "echo",
                 "figure echoer"):
        assert rate[name] <= 0.05, name
    for row in validity.values():                  # and in every domain, not only on average
        assert all(0 <= v <= 1 for v in row.values())
    assert min(validity["privileged prober"][d] for d in validity["privileged prober"]) >= 0.75


def test_echoing_the_callees_own_figure_resolves_nothing(cfg_module):
    """The figure echoer puts the figure a callee just said ("I pay my suppliers every week") into a sentence
    about something else ("Every week brings you to another app."). Where that figure is the bank's true
    fact (weekly payouts) it used to resolve the worry: 7 of 90 merchant calls before the fix."""
    calls = []
    S.play_scripted(S.figure_echoer, P.sample("merchant_recruitment", 90, 0), cfg_module["simulator"], 0,
                    transcripts=calls)
    turns = [(m["content"], s) for call in calls
             for m, s in zip([m for m in call["messages"] if m["role"] == "assistant"], call["states"])]
    echoed = [s for text, s in turns if text.startswith("Every week brings") and "payout_cash_flow" in s["concern_status"]]
    assert len(echoed) >= 5                                           # the exploit was tried where it paid
    assert all(not s["events"]["resolved"] for _, s in turns)


def test_semantic_appraiser_on_held_out_natural_lines(cfg_module):
    """data/appraisal_labels.jsonl: 157 natural salesperson lines, written apart from the exemplars."""
    items = A.read_labels(os.path.join(os.path.dirname(P.DOMAIN_DIR), "appraisal_labels.jsonl"))
    assert len(items) >= 90 and {it["domain"] for it in items} == set(P.list_domains())
    rules = cfg_module["simulator"]["rules"]
    semantic = A.scores(items, A.appraise_items("semantic", items, rules))
    lexical = A.scores(items, A.appraise_items("lexical", items, rules))
    assert semantic["probe"]["f1"] >= 0.8 and semantic["addresses"]["f1"] >= 0.8
    assert semantic["probe"]["f1"] > lexical["probe"]["f1"] + 0.3       # why semantic is the default
