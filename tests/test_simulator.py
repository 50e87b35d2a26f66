"""The Cognitive User Simulator: the transition rule step by step (on hand-made appraisals), what is not a
salesperson's line, and the simulator's batched dialogues and user lines."""

import copy

import pytest

import appraisal as A
import simulator as S
from conftest import make_tiny_model, persona_with


def appraisal(probed=(), addressed=(), push=False, off_topic=False, too_long=False, open_probe=False,
              false_claims=(), about=(), incoherent=()):
    return A.Appraisal(probed=set(probed), addressed=set(addressed), push=push, off_topic=off_topic,
                       too_long=too_long, open_probe=open_probe, false_claims=set(false_claims), about=set(about),
                       incoherent=list(incoherent))


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
