"""Learn-to-Ask: the splitter, parser, rewards, graders and kappa on hand-computed cases; the logs the
privileged expert writes; GRPO and the CLI on a tiny random model."""
import json
import math

import pytest
import torch

import learn_to_ask
import lm
import personas as P
from learn_to_ask import data as D, policy as L, reward as R
from conftest import make_tiny_model


# ----------------------------------------------------------------------------- logs -> samples

SESSION = {"session_id": "s1", "domain": "merchant_recruitment",
           "hidden_concerns": {"commission_fees": "commission fees: too expensive", "contract_lockin": "lock-in"},
           "messages": [
               {"role": "system", "content": "call details"},
               {"role": "user", "content": "Hello?"},
               {"role": "assistant", "content": "Is the commission a worry?", "probes": ["commission_fees"]},
               {"role": "user", "content": "Yes, it eats my margin."},
               {"role": "user", "content": "Also, who are you?"},
               {"role": "assistant", "content": "15% at first. Is a long contract a worry?", "probes": ["contract_lockin"]},
               {"role": "user", "content": "I hate lock-in."},
               {"role": "assistant", "content": "No minimum term. Shall I sign you up?", "probes": []},
               {"role": "user", "content": "Okay."}]}


def test_split_full_prefix_stop_continue_and_empty_info_drop():
    samples = D.split_session(SESSION)
    msgs = SESSION["messages"]
    # cuts after each run of user messages: indices 2, 5 (two user messages together), 7, 9
    assert [len(s["context"]) for s in samples] == [2, 5, 7, 9]
    for s in samples:
        assert s["context"] == [{"role": m["role"], "content": m["content"]} for m in msgs[:len(s["context"])]]
    assert [s["decision_truth"] for s in samples] == ["continue", "continue", "continue", "stop"]
    assert samples[0]["info_ids"] == ["commission_fees", "contract_lockin"]
    assert samples[1]["info_truth"] == ["lock-in"]             # text from hidden_concerns
    assert samples[2]["info_truth"] == []                      # only the push remains
    kept, dropped = D.drop_empty(samples)
    assert dropped == 1 and [s["sample_id"] for s in kept] == ["s1#0", "s1#1", "s1#3"]
    assert D.split_session(SESSION, labels=False)[0]["info_truth"] is None     # left to the llm extractor


def test_read_logs_names_file_and_line_skips_or_refuses(tmp_path):
    path = tmp_path / "logs.jsonl"
    path.write_text(json.dumps(SESSION) + "\n{not json\n" + json.dumps({"session_id": "x"}) + "\n\n"
                    + json.dumps({**SESSION, "session_id": "s2", "messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    seen = []
    sessions, problems = D.read_logs(str(path), "skip", log=seen.append)
    assert [s["session_id"] for s in sessions] == ["s1"]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "messages" in problems[1] and "role" in problems[2]
    assert len(seen) == 1 and seen[0].startswith(f"skipped 3 malformed lines of {path}: 2: not valid JSON")
    with pytest.raises(D.LogError, match=f"{path}:2: not valid JSON"):
        D.read_logs(str(path), "refuse")
    with pytest.raises(D.LogError, match="does not exist"):
        D.read_logs(str(tmp_path / "missing.jsonl"))


def test_a_byte_that_is_not_utf8_spoils_its_line_only(tmp_path):
    """A Latin-1 'é' in one log line: that line is skipped as FILE:LINE under on_bad_line: skip (the whole
    command used to stop with a UnicodeDecodeError), and named under refuse."""
    path = tmp_path / "logs.jsonl"
    path.write_bytes(json.dumps(SESSION).encode() + b"\n" + json.dumps({**SESSION, "session_id": "s2"}).encode()
                     .replace(b"Hello?", b"Caf\xe9?") + b"\n")
    seen = []
    sessions, problems = D.read_logs(str(path), "skip", log=seen.append)
    column = path.read_bytes().split(b"\n")[1].index(b"\xe9") + 1
    assert [s["session_id"] for s in sessions] == ["s1"]
    assert problems == [f"{path}:2: not UTF-8 text (byte 0xe9 at column {column})"]
    with pytest.raises(D.LogError, match=f"{path}:2: not UTF-8 text"):
        D.read_logs(str(path), "refuse")


@pytest.mark.parametrize("content, words", [
    ("", "no usable session (0 malformed lines skipped)"),
    ("{not json\n[]\n", "no usable session (2 malformed lines skipped)"),
])
def test_prepare_on_logs_without_a_session_says_so(tmp_path, content, words, capsys):
    """It used to advise the llm extractor ('no assistant message carries probes labels') for an empty file."""
    path = tmp_path / "logs.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as leave:
        L.main(["prepare", f"learn_to_ask.logs={path}", f"learn_to_ask.out_dir={tmp_path / 'out'}"])
    assert str(leave.value).startswith(f"{path}: {words}") and "extractor" not in str(leave.value)
    assert not (tmp_path / "out").exists()


def test_files_the_commands_read_back_are_named_when_damaged(tmp_path):
    cfg = learn_to_ask.load_config(None, [f"learn_to_ask.out_dir={tmp_path}"])
    (tmp_path / "samples.jsonl").write_text(json.dumps({"sample_id": "a#0", "session_id": "a", "context": SESSION["messages"][:2],
                                                        "decision_truth": "stop", "info_ids": [], "split": "train"})
                                            + "\n" + '{"sample_id": "a#1"}\n')
    with pytest.raises(D.LogError, match=r"samples.jsonl:2: 'session_id' is missing .*learn_to_ask prepare"):
        D.load_samples(cfg, "train")
    (tmp_path / "eval.json").write_text('{"base": {"reward": 0.')
    with pytest.raises(D.LogError, match=r"eval.json cannot be read .*move it aside"):
        L._report(cfg, "eval", "base", {"reward": 1.0}, ["reward"])
    stop_only = [{"sample_id": f"a#{k}", "decision_truth": "stop"} for k in range(3)]
    with pytest.raises(D.LogError, match="no continue sample, and learn_to_ask.stop_fraction=0.4 asks for 3"):
        L.step_batches(stop_only, 5, 0.4, 0)


def test_llm_extractor_output_is_parsed_robustly():
    assert D.parse_info_list("commission fees\n- contract lock-in\n2) Commission fees\n* 'packaging'\n") == \
        ["commission fees", "contract lock-in", "packaging"]
    assert D.parse_info_list("none\n- None.\n1. 2. 3.") == []
    assert D.parse_info_list("soggy food\n- 2. Soggy food\n- 3. late rider") == ["soggy food", "late rider"]


# ----------------------------------------------------------------------------- parser and reward

@pytest.mark.parametrize("text,expected", [
    ("<action>Is the commission a worry?</action><state>nothing known</state>", ("question", "Is the commission a worry?", "nothing known")),
    ("  <action> Any worries? </action>\n<state>x</state>\n", ("question", "Any worries?", "x")),
    ("<action><stop/></action><state>all known</state>", ("stop", "", "all known")),
    ("<action><stop /></action><state>done</state>", ("stop", "", "done")),
    ("<action>Any worries?</action>", ("malformed", "", "")),                         # no state
    ("<action>Any worries?</action><state></state>", ("malformed", "", "")),          # empty state
    ("<action></action><state>x</state>", ("malformed", "", "")),                     # empty action
    ("<action>Q?</action><state>x</state> and more", ("malformed", "", "")),          # extra text
    ("<action>Q?</action><state>a</state><state>b</state>", ("malformed", "", "")),   # extra tags
    ("<action><stop/> ok?</action><state>x</state>", ("malformed", "", "")),          # stop plus text
    ("Is the commission a worry?", ("malformed", "", "")),
])
def test_strict_parser(text, expected):
    assert R.parse_action(text) == expected


@pytest.mark.parametrize("truth,kind,fmt,content,expected", [
    # (truth, reply kind, grader format, grader content) -> R for default, sum, Ra, Rs (beta = 2)
    ("continue", "question", 1.0, 1.0, (4.0, 3.0, 3.0, 4.0)),
    ("continue", "question", 1.0, 0.5, (3.0, 2.5, 2.0, 4.0)),
    ("continue", "question", 0.5, 0.0, (1.5, 1.5, 0.5, 3.5)),
    ("continue", "question", 0.0, 0.0, (1.0, 1.0, 0.0, 3.0)),
    ("stop", "stop", 0.0, 0.0, (4.0, 3.0, 3.0, 4.0)),          # a right stop: content 1, format 1
    ("stop", "question", 1.0, 1.0, (0.0, 0.0, 0.0, 0.0)),      # wrong decision: nothing
    ("continue", "stop", 0.0, 0.0, (0.0, 0.0, 0.0, 0.0)),
    ("continue", "malformed", 1.0, 1.0, (0.0, 0.0, 0.0, 0.0)),
    ("stop", "malformed", 0.0, 0.0, (0.0, 0.0, 0.0, 0.0)),
])
def test_reward_every_mode(truth, kind, fmt, content, expected):
    got = tuple(R.reward(truth, kind, fmt, content, mode)[0] for mode in ("default", "sum", "Ra", "Rs"))
    assert got == pytest.approx(expected)
    assert R.reward(truth, kind, fmt, content, "default", beta=1.0)[0] <= expected[0]


def test_grader_is_called_only_when_truth_and_prediction_continue():
    calls = []

    def grade(items):
        calls.extend(items)
        return [(1.0, 0.5)] * len(items)
    cont = {"decision_truth": "continue", "info_truth": ["x"], "info_ids": [], "domain": None, "context": []}
    stop = {**cont, "decision_truth": "stop"}
    q = "<action>Any worry?</action><state>s</state>"
    records = R.score([cont, cont, stop, stop], [q, "<action><stop/></action><state>s</state>", q, "junk"], grade,
                      {"reward": "default", "beta": 2.0, "reward_parse": "strict"})
    assert len(calls) == 1 and calls[0]["question"] == "Any worry?"
    assert [r["R"] for r in records] == [3.0, 0.0, 0.0, 0.0]
    m = R.summarize(records)
    assert m["continue_acc"] == 0.5 and m["stop_acc"] == 0.0 and m["decision_acc"] == 0.25
    assert m["content_mean"] == 0.25 and m["win_rate"] == 0.0 and m["malformed"] == 0.25


@pytest.mark.parametrize("truth,text,expected_kind,expected_R", [
    # the published rule (Trinity-RFT learn2ask reward_fn), grader answering format 1, content 0.5
    ("stop", "<action><stop/></action><state>all known</state>", "stop", 4.0),      # exact stop: P = 1
    ("stop", "<action><stop/></action><state>ok</state> Thank you!", "stop", 3.0),  # stop + text: P = 0
    ("stop", "<stop/>", "stop", 3.0),                                              # bare marker: P = 0
    ("stop", "<action>Any worry?</action><state>s</state>", "question", 0.0),       # wrong decision
    ("continue", "<action>Any worry?</action><state>s</state>", "question", 3.0),   # graded continue
    ("continue", "Is the commission a worry?", "question", 3.0),                   # untagged: still graded
    ("continue", "<action>Any worry?</action>", "question", 3.0),                  # no state: still graded
    ("continue", "<action><stop/></action><state>s</state>", "stop", 0.0),          # wrong decision
])
def test_published_reward_rule_case_table(truth, text, expected_kind, expected_R):
    sample = {"decision_truth": truth, "info_truth": ["x"], "info_ids": [], "domain": None, "context": []}
    lt = {"reward": "default", "beta": 2.0, "reward_parse": "published"}
    record = R.score([sample], [text], lambda items: [(1.0, 0.5)] * len(items), lt)[0]
    assert record["kind"] == expected_kind and record["R"] == expected_R
    strict = R.score([sample], [text], lambda items: [(1.0, 0.5)] * len(items), {**lt, "reward_parse": "strict"})[0]
    assert strict["R"] == (expected_R if R.parse_action(text)[0] != "malformed" else 0.0)


# ----------------------------------------------------------------------------- graders

@pytest.mark.parametrize("question,ids,domain,expected", [
    ("Is the commission a worry for you?", ["commission_fees"], "merchant_recruitment", (1.0, 1.0)),
    ("Is the commission a worry? And the contract?", ["commission_fees"], "merchant_recruitment", (0.5, 1.0)),
    ("Is the contract a worry for you?", ["commission_fees"], "merchant_recruitment", (1.0, 0.5)),   # another concern's cue
    ("How big is your kitchen? Your menu? Your tables?", ["commission_fees"], "merchant_recruitment", (0.0, 0.5)),
    ("Do you like football?", ["commission_fees"], "merchant_recruitment", (1.0, 0.0)),
    ("Tell me about the commission.", ["commission_fees"], "merchant_recruitment", (0.0, 1.0)),
])
def test_proxy_grader(question, ids, domain, expected):
    assert R.proxy_grade(question, ids, [], domain) == expected


def test_proxy_grader_without_a_domain_bank_uses_reference_words():
    assert R.proxy_grade("Does the headache get worse at night?", [], ["headache: severe, at night"], None) == (1.0, 1.0)
    assert R.proxy_grade("Any fever?", [], ["headache: severe"], None) == (1.0, 0.0)


def test_cohen_kappa_hand_computed():
    a = [1, 1, 1, 0.5, 0, 0, 1, 0]
    b = [1, 1, 0.5, 0.5, 0, 1, 1, 0]
    # p_o = 6/8; marginals a: 1 -> 4, 0.5 -> 1, 0 -> 3; b: 1 -> 4, 0.5 -> 2, 0 -> 2
    p_e = (4 * 4 + 1 * 2 + 3 * 2) / 64
    assert R.cohen_kappa(a, b) == pytest.approx((0.75 - p_e) / (1 - p_e))
    assert R.cohen_kappa(a, a) == 1.0
    assert R.cohen_kappa([1, 0, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.0)


def test_shipped_grader_labels_and_proxy_calibration(tmp_path):
    items = R.read_labels("data/grader_labels.jsonl")
    assert len(items) >= 50 and len({it["domain"] for it in items}) == 3
    assert {it["content"] for it in items} == {0, 0.5, 1} and {it["format"] for it in items} == {0, 0.5, 1}
    cfg = learn_to_ask.load_config(None, [f"learn_to_ask.out_dir={tmp_path}"])
    R.calibrate(cfg)
    table = (tmp_path / "calibration.md").read_text()
    assert "| proxy |" in table and not (tmp_path / "calibration.json").exists()   # nothing to choose among


def test_llm_grader_reads_scores_from_letter_logprobs(tokenizer):
    model = make_tiny_model(tokenizer)
    items = [{"question": "Is the commission a worry?", "reference": ["commission fees"], "context": "Hello?"},
             {"question": "Football?", "reference": ["contract"], "context": "Hi"}]
    lp = R.choice_logprobs(model, tokenizer, [R.grader_prompt("rubric", items[0], "content")])
    assert lp.shape == (1, 3) and lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    raw, bias = R.llm_scores(model, tokenizer, items, "short")
    for variant in ("short", "short+cal"):
        grades = R.llm_grade(model, tokenizer, items, variant)
        assert all(f in R.SCORES and c in R.SCORES for f, c in grades)
        lp = raw - bias if variant.endswith("+cal") else raw
        assert [g[1] for g in grades] == [R.SCORES[int(i)] for i in lp[:, 1].argmax(-1)]


# ----------------------------------------------------------------------------- expert logs

def test_expert_logs_probe_every_hidden_concern_with_exact_labels(tmp_path):
    cfg = learn_to_ask.load_config(None, [f"learn_to_ask.logs={tmp_path}/logs.jsonl", "learn_to_ask.log_sessions=6"])
    D.make_logs(cfg)
    sessions, problems = D.read_logs(str(tmp_path / "logs.jsonl"))
    assert len(sessions) == 6 and not problems and len({s["domain"] for s in sessions}) == 3
    for s in sessions:
        probed = [p for m in s["messages"] for p in m.get("probes", [])]
        assert set(probed) == set(s["hidden_concerns"])             # every concern, nothing else
        assert s["messages"][-1]["role"] == "user"
        samples, _ = D.drop_empty(D.split_session(s))
        assert samples[-1]["decision_truth"] == "stop" and samples[0]["info_ids"] == list(dict.fromkeys(probed))
        assert all(x["decision_truth"] == "continue" for x in samples[:-1])


def test_expert_questions_are_checked():
    good = {"merchant_recruitment": {c["id"]: ["Is the commission a worry?", "Any margin worry?"]
                                     for c in P.load_bank("merchant_recruitment")["concerns"]}}
    with pytest.raises(D.LogError, match="hidden_deductions"):
        D.check_questions(good, ["merchant_recruitment"], "q.yaml")     # commission cue, not hidden's


# ----------------------------------------------------------------------------- sampling and GRPO

def test_grpo_update_raises_the_likelihood_of_rewarded_completions(tokenizer):
    cfg = learn_to_ask.load_config(None, ["learn_to_ask.lr=5e-2"])
    lt = cfg["learn_to_ask"]
    model = lm.add_lora(make_tiny_model(tokenizer), cfg["lora"])
    prompt = L.prompt_ids(tokenizer, SESSION["messages"][:2], "<action>")
    completions = L.sample_completions(model, tokenizer, [prompt], 4, 6, 0.7, torch.Generator().manual_seed(0))[0]

    def logps():
        with torch.no_grad():
            out = []
            for tokens, _, _ in completions:
                pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
                logits = lm.selected_logits(model, [prompt + tokens], (torch.zeros_like(pos), pos))
                out.append(torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0])
            return out
    before = logps()
    for (_, recorded, _), fresh in zip(completions, before):     # rollout log-probs = a fresh forward pass
        torch.testing.assert_close(torch.tensor(recorded), fresh, atol=1e-4, rtol=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lt["lr"])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    stats = L.grpo_update(model, optimizer, [prompt] * 4, completions, adv, lt, 0.7)
    after = logps()
    gap = lambda lp: (lp[0].sum() + lp[2].sum() - lp[1].sum() - lp[3].sum()).item()
    assert stats["grad_norm"] > 0 and gap(after) > gap(before) + 0.05


def test_stop_text_ends_a_reply(tokenizer):
    model = make_tiny_model(tokenizer)
    prefix = "<action>Any worry?</action><state>none</state>"
    out = L.sample_completions(model, tokenizer, [[1, 2, 3]], 2, 10, 0.7, torch.Generator().manual_seed(0), prefix)[0]
    assert all(len(tokens) == 1 and text == prefix for tokens, _, text in out)   # stopped at the first token


def test_two_step_training_eval_play_and_cli_on_a_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = [f"model.name_or_path={tiny_dir}", f"learn_to_ask.out_dir={out}", f"learn_to_ask.logs={tmp_path}/logs.jsonl",
            "learn_to_ask.log_sessions=6", "learn_to_ask.test_fraction=0.5", "learn_to_ask.steps=2",
            "learn_to_ask.samples_per_step=2", "learn_to_ask.group_size=2", "learn_to_ask.max_new_tokens=6",
            "learn_to_ask.save_every=1", "learn_to_ask.n_eval_samples=3", "learn_to_ask.eval_rollouts=1",
            "learn_to_ask.play_n=3", "learn_to_ask.play_turns=2"]
    with pytest.raises(SystemExit, match="logs.jsonl' does not exist"):
        L.main(["prepare", *args])
    with pytest.raises(SystemExit, match="run `python -m learn_to_ask prepare` first"):
        L.main(["train", *args])
    L.main(["make-logs", *args])
    L.main(["prepare", *args])
    L.main(["train", *args])
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(math.isfinite(v) for x in lines for v in x.values() if isinstance(v, float))
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "latest").read_text() == "step_000002"
    with pytest.raises(SystemExit, match="--resume"):
        L.main(["train", *args])
    L.main(["train", *args, "--resume", "learn_to_ask.steps=3"])
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3]
    L.main(["eval", *args])
    L.main(["eval", "--adapter", str(out), *args])
    results = json.load(open(out / "eval.json"))
    assert set(results) == {"base", f"trained ({out})"}
    for r in results.values():      # a random model never writes the tags or the stop marker: under the
        # published rule every reply is a malformed "continue", right exactly on the continue samples
        assert r["malformed"] == 1.0 and r["stop_acc"] == 0.0 and r["continue_acc"] == 1.0 and r["n"] == 3
        assert r["reward"] >= r["decision_acc"] > 0      # a right decision is worth at least R_s = 1
    L.main(["play", "--adapter", str(out), *args])
    played = json.load(open(out / "play.json"))[f"trained ({out})"]
    assert played["dialogues"] == 3 and played["stop_no_stop"] == 1.0 and played["malformed_turns"] >= 3
    with pytest.raises(SystemExit, match="unknown config key 'learn_to_ask.stepz'"):
        L.main(["train", "learn_to_ask.stepz=1"])


def test_reward_difference_is_paired_and_bootstrapped_over_sessions():
    base = {"a#0": 1.0, "a#1": 1.0, "b#2": 0.0, "c#3": 2.0, "only-base#4": 9.0}
    trained = {"a#0": 2.0, "a#1": 4.0, "b#2": 0.0, "c#3": 2.0, "only-trained#5": -9.0}
    mean, low, high = L.session_difference(base, trained)
    assert mean == pytest.approx((2.0 + 0.0 + 0.0) / 3, abs=1e-4)   # session a's two samples count once
    assert low == 0.0 and high == 2.0                        # a resample of three sessions
    assert L.session_difference(base, base) == [0.0, 0.0, 0.0]
