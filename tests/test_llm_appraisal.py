"""The model-based appraisers (llm_appraisal.py): a strict parser, a fallback that is counted, calibrated
log-odds that are deterministic."""

import dataclasses

import llm_appraisal as LA
import simulator as S
from conftest import make_tiny_model, persona_with


def test_generative_parser_is_strict():
    ids = {"commission_fees", "contract_lockin"}
    good = ("<asked>commission_fees</asked><answered>none</answered><open_question>no</open_question>"
            "<push>no</push><off_topic>no</off_topic>")
    assert LA.parse_generative(good, ids) == {"probed": {"commission_fees"}, "addressed": set(), "open_probe": False,
                                             "push": False, "off_topic": False}
    for bad in ["", "yes", good.replace("commission_fees", "made_up"), good + " extra",
                good.replace("<push>no</push>", "<push>maybe</push>")]:
        assert LA.parse_generative(bad, ids) is None


def test_generative_appraiser_survives_garbage(tokenizer, cfg):
    model = make_tiny_model(tokenizer)  # random weights: its "tags" are garbage
    sim_cfg = {**cfg["simulator"], "appraiser": "generative", "utterance": "template", "generative_max_tokens": 8}
    sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0)
    p = persona_with(["commission_fees"], willingness=2.0)
    sim.reset([p, p])
    users, states, done = sim.step(["How much commission could you pay?", "Hello"])
    assert sim.stats["parse_failures"] == 2
    assert states[0].concern_status["commission_fees"] == "revealed"   # the lexical fallback decided


def test_llm_appraiser_is_calibrated_and_deterministic_real_model(real_model, cfg):
    """The 135M model cannot tell asking from telling (F1 ~0.1, docs/simulator.md): what is tested here is the
    mechanism -- contextual calibration, determinism, and the bank's other concerns (for the checklist
    count) coming from the lexical appraiser."""
    tokenizer, model = real_model
    app = LA.LLMAppraiser(model, tokenizer, cfg["simulator"]["rules"])
    q = dict(LA.llm_questions("merchant_recruitment", ["commission_fees"]))["probed:commission_fees"]
    texts = ["Are you worried about the commission we take from each order?", app.CONTENT_FREE]
    scores = app.calibrated([(t, q) for t in texts])
    assert scores == app.calibrated([(t, q) for t in texts])     # same input, same answer
    assert abs(scores[1]) < 1e-5                                 # the content-free message is the zero point
    text = "Is it the contract, the packaging or the reviews that worry you?"   # other concerns, by cue words
    out = app([text], ["merchant_recruitment"], None, [["commission_fees"]])[0]
    assert {"contract_lockin", "packaging_cost", "ratings_reviews"} <= out.probed
    assert {f.name for f in dataclasses.fields(out)} == {"probed", "addressed", "open_probe", "push", "off_topic",
                                                     "too_long", "false_claims", "about", "incoherent"}
    assert out == app([text], ["merchant_recruitment"], None, [["commission_fees"]])[0]


# ----------------------------------------------------------------------------- validity and robustness
