import copy

import pytest

import personas as P
import simulator as S
from conftest import make_tiny_model


def persona_with(concern_ids, willingness=1.0, domain="merchant_recruitment", severity=2):
    bank = P.load_bank(domain)
    by_id = {c["id"]: c for c in bank["concerns"]}
    concerns = [P.Concern(**{**{k: by_id[i][k] for k in P._CONCERN_FIELDS if k != "severity"}, "severity": severity})
                for i in concern_ids]
    return P.Persona(persona_id="test", domain=domain, name="Maria Rossi", traits={"business_type": "pizzeria"},
                     style="terse", willingness=willingness, concerns=concerns, stratum="test")


def appraisal(probed=(), addressed=(), push=False, off_topic=False, too_long=False):
    return {"probed": set(probed), "addressed": set(addressed), "push": push, "off_topic": off_topic,
            "too_long": too_long, "probed_other": False}


@pytest.fixture
def rules(cfg):
    return cfg["simulator"]["rules"]


def step(state, persona, rules, **kw):
    return S.transition(state, persona, appraisal(**kw), rules, max_turns=10)


def test_concern_hidden_until_probed_then_revealed(rules):
    p = persona_with(["commission_fees"])                       # disclosure: probe
    s0 = S.initial_state(p, rules)
    s1 = step(s0, p, rules)                                    # small talk
    assert s1.concern_status["commission_fees"] == "hidden"
    s2 = step(s1, p, rules, probed={"commission_fees"})
    assert s2.concern_status["commission_fees"] == "revealed"
    assert s2.willingness == pytest.approx(s1.willingness + rules["reveal_gain"])
    assert s2.events["revealed"] == ["commission_fees"]
    # the lexical appraiser sees the probe in real words
    a = S.lexical_appraise("Can I ask how much commission you could afford?", p, rules)
    assert a["probed"] == {"commission_fees"} and not a["push"]


def test_guarded_concern_needs_two_probes(rules):
    p = persona_with(["hidden_deductions"])                     # disclosure: guarded
    s = S.initial_state(p, rules)
    s = step(s, p, rules, probed={"hidden_deductions"})
    assert s.concern_status["hidden_deductions"] == "hidden"
    s = step(s, p, rules, probed={"hidden_deductions"})
    assert s.concern_status["hidden_deductions"] == "revealed"


def test_push_concern_blurted_out_when_pushed(rules):
    p = persona_with(["scam_suspicion"])                        # disclosure: push
    s = step(S.initial_state(p, rules), p, rules, push=True)
    assert s.concern_status["scam_suspicion"] == "revealed"


def test_resolving_raises_willingness_by_severity(rules):
    p = persona_with(["commission_fees"], severity=3)
    s = step(S.initial_state(p, rules), p, rules, probed={"commission_fees"})
    s2 = step(s, p, rules, addressed={"commission_fees"})
    assert s2.concern_status["commission_fees"] == "resolved"
    assert s2.delta_willingness == pytest.approx(rules["resolve_gain"] * 3)
    # answering a concern that was never revealed does nothing
    s3 = step(S.initial_state(p, rules), p, rules, addressed={"commission_fees"})
    assert s3.concern_status["commission_fees"] == "hidden" and s3.delta_willingness == 0


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
    # probe and answer one concern in one turn, push: one concern still open -> no accept
    s = step(s, p, rules, probed={"commission_fees"}, addressed={"commission_fees"}, push=True)
    assert s.decision == "continue" and s.concern_status["commission_fees"] == "resolved"
    s = step(s, p, rules, probed={"contract_lockin"}, addressed={"contract_lockin"})
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


def test_generative_parser_is_strict():
    p = persona_with(["commission_fees", "contract_lockin"])
    good = "<probed>commission_fees</probed><addressed>none</addressed><push>no</push><off_topic>no</off_topic>"
    assert S.parse_generative(good, p) == {"probed": {"commission_fees"}, "addressed": set(), "push": False,
                                           "off_topic": False}
    for bad in ["", "yes", good.replace("commission_fees", "made_up"), good + " extra",
                good.replace("<push>no</push>", "<push>maybe</push>")]:
        assert S.parse_generative(bad, p) is None


def test_echo_and_role_inversion_detection():
    assert S.echoes("Sure, we offer the best commission rates in town", "We offer the best commission rates in town!")
    assert not S.echoes("The commission worries me.", "What do you think about the commission?")
    assert S.echoes("The Great One Calls.", "The Great One Calls.")            # short turns echo whole
    assert not S.echoes("Hello, yes?", "Hello!")
    assert S.ROLE_INVERSION.search("Agent: hello there")
    assert S.ROLE_INVERSION.search("Hi, I'm calling from QuickBite")
    assert not S.ROLE_INVERSION.search("Hello, who is this?")


def test_template_simulator_runs_batched_dialogues_and_words_follow_state(cfg):
    sim_cfg = {**cfg["simulator"], "utterance": "template", "appraiser": "lexical"}
    ps = [persona_with(["commission_fees"], willingness=2.0), persona_with(["contract_lockin"], willingness=2.0)]
    sim = S.CognitiveUserSimulator(sim_cfg, seed=0)
    openings = sim.reset(ps)
    assert len(openings) == 2 and all(openings)
    users, states, done = sim.step(["How much commission would be fair for you?", "Nice weather today."])
    assert states[0].concern_status["commission_fees"] == "revealed"
    assert ps[0].concerns[0].statement in users[0]                 # the reveal is voiced
    assert states[1].concern_status["contract_lockin"] == "hidden"
    assert ps[1].concerns[0].statement not in users[1]             # nothing hidden is voiced
    users, states, done = sim.step(["It's 15% for the first six months, no setup fee. Shall I sign you up?",
                                    "Nice weather today."])
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


def test_llm_appraiser_deterministic_and_flips_on_topic_real_model(real_model, cfg):
    tokenizer, model = real_model
    p = persona_with(["commission_fees", "contract_lockin"])
    app = S.LLMAppraiser(model, tokenizer, cfg["simulator"]["rules"])
    texts = ["Are you worried about our commission fees? Commission is 15% for the first six months.",
             "I love watching football on weekends with my kids."]
    q = [q for k, q in S.llm_questions(p) if k == "probed:commission_fees"][0]
    scores = app._calibrated([(t, q) for t in texts])
    assert scores == app._calibrated([(t, q) for t in texts])     # same input, same answer
    assert scores[0] > cfg["simulator"]["rules"]["llm_margin"] > scores[1]
    first = app(texts, [p, p])
    assert "commission_fees" in first[0]["probed"] and "commission_fees" not in first[1]["probed"]
    assert first == app(texts, [p, p])
