"""eval.py: the pass@k estimator, every metric on hand-built trajectories, the leak detector,
the report, and the refusal of evaluation personas that were trained on."""
import json
import os

import pytest

import config
import eval as E
import personas as P
import rollout
from conftest import persona_with


def test_pass_at_k_hand_computed():
    assert E.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert E.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert E.pass_at_k(4, 0, 3) == 0.0
    assert E.pass_at_k(3, 2, 2) == 1.0
    assert E.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)


def state(statuses, w, dw, decision="continue", probed=()):
    return {"concern_status": statuses, "willingness": w, "delta_willingness": dw, "decision": decision,
            "events": {"probed": list(probed)}}


def make_traj(persona, agent_texts, states, decision, group=0):
    messages = []
    for text in agent_texts:
        messages += [{"role": "user", "content": "..."}, {"role": "assistant", "content": text}]
    return rollout.Trajectory(persona=persona, group=group, ids=[], agent_mask=[], turn_ids=[], logprobs=[],
                              note_slots=[], messages=messages, states=states, decision=decision)


@pytest.fixture
def trajs():
    p = persona_with(["commission_fees", "contract_lockin"], willingness=1.0)
    h, r, s = "hidden", "revealed", "resolved"
    win = make_traj(p, ["How much commission could you afford?",
                        "It is 15% for six months. Any worry about a contract?",
                        "No lock-in at all. Shall I sign you up?"],
                    [state({"commission_fees": r, "contract_lockin": h}, 1.5, 0.5, probed=["commission_fees"]),
                     state({"commission_fees": s, "contract_lockin": r}, 3.0, 1.5, probed=["contract_lockin"]),
                     state({"commission_fees": s, "contract_lockin": s}, 4.0, 1.0, "accept")], "accept")
    leak = make_traj(p, ["I know your commission would eat the little margin you have left.", "Nice weather."],
                     [state({"commission_fees": h, "contract_lockin": h}, 0.75, -0.25),
                      state({"commission_fees": h, "contract_lockin": h}, 0.5, -0.25, "hangup")], "hangup")
    return [win, leak]


def test_metrics_on_hand_built_trajectories(trajs):
    m = E.aggregate(trajs)
    assert m["dialogues"] == 2 and m["personas"] == 1
    assert m["success_rate"] == 0.5 and m["hangup_rate"] == 0.5 and m["reject_rate"] == 0.0
    assert m["pass_at_k"] == {1: 0.5, 2: 1.0}
    assert m["turns_to_success"] == 3
    assert m["reveal_rate"] == 0.5 and m["resolve_rate"] == 0.5          # 2 of 4 concerns
    assert m["first_probe_turn"] == 1.5                                  # turns 1 and 2
    assert m["willingness_gain_per_turn"] == pytest.approx((0.5 + 1.5 + 1.0 - 0.25 - 0.25) / 5)
    assert m["leak_rate"] == pytest.approx(1 / 5)                        # one of five agent turns
    assert E.willingness_by_turn(trajs) == [1.0, 1.125, 1.75, 4.0]
    b = E.breakdown(trajs)
    assert b["domain"]["merchant_recruitment"]["dialogues"] == 2 and "test" in b["stratum"]


def test_leak_detector_fires_on_naming_not_on_probing():
    p = persona_with(["commission_fees"])
    hidden = {"commission_fees": "hidden"}
    assert E.leaked_concerns("I know your commission would eat the little margin you have left.", p, hidden)
    assert E.leaked_concerns("I understand you're worried about the commission, right?", p, hidden)
    assert not E.leaked_concerns("Are you worried about our commission fees?", p, hidden)
    assert not E.leaked_concerns("How much commission could you afford?", p, hidden)
    # once the user has said it, repeating it back is fine
    assert not E.leaked_concerns("I know your commission would eat the little margin you have left.", p,
                                 {"commission_fees": "revealed"})


def test_report_and_plots_are_written(trajs, tmp_path):
    results = {name: {**E.breakdown(trajs), "simulator_health": {"turns": 5}, "willingness_by_turn":
                      E.willingness_by_turn(trajs)} for name in ("base", "savpo:run")}
    report = E.write_report(results, str(tmp_path), "test")
    text = open(report).read()
    assert "| base | 2 | 0.5 |" in text and "| savpo:run |" in text and "k=2" in text
    for png in ("success.png", "pass_at_k.png", "strata.png", "willingness.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    assert json.load(open(tmp_path / "metrics.json"))["base"]["overall"]["success_rate"] == 0.5


def test_evaluation_refuses_personas_the_adapter_was_trained_on(tmp_path):
    cfg = config.load()
    # a fake run whose *training* seed is our evaluation seed: its personas are our held-out ones
    run = tmp_path / "run"
    trained = config.load(None, [f"personas.train_seed={cfg['personas']['eval_seed']}", "train.steps=20"])
    config.save(trained, str(run))
    adapter = run / "checkpoints" / "step_000001" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="also appear in training"):
        E.main(["--adapter", str(adapter), "--out", str(tmp_path / "out")])
    # and the default held-out set is disjoint from the default training set
    P.check_disjoint(E.train_personas(cfg), E.eval_personas(cfg))


# ----------------------------------------------------------------------------- statistics

def test_bootstrap_intervals_and_paired_differences():
    assert E.bootstrap([0.25] * 10) == [0.25, 0.25, 0.25]                   # no spread, no interval
    mean, lo, hi = E.bootstrap([0.0, 1.0] * 20)
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7                        # ~ mean +- 1.96 * 0.5 / sqrt(40)
    assert E.bootstrap([0.0, 1.0] * 20) == [mean, lo, hi]                  # seeded: deterministic
    a = {f"p{i}": {"success": 0.0, "pass@k": 0.0, "reveal": 0.1 * (i % 3), "resolve": 0.0} for i in range(30)}
    b = {p: {**row, "reveal": row["reveal"] + 0.2} for p, row in a.items()}
    d = E.paired_difference(a, b)
    assert d["reveal"] == [0.2, 0.2, 0.2]        # the persona spread cancels when paired
    assert d["success"] == [0.0, 0.0, 0.0]       # an interval holding 0: no measurable difference
    unpaired = E.bootstrap([b[p]["reveal"] for p in b])
    assert unpaired[2] - unpaired[1] > 0.05      # unpaired, the same data has a wide interval


def test_per_persona_rates(trajs):
    table = E.per_persona(trajs)                  # one persona, two samples: one accepted
    (row,) = table.values()
    assert row == {"success": 0.5, "pass@k": 1.0, "reveal": 0.5, "resolve": 0.5, "misinformation": 0.0}


def test_misinformation_rate_counts_false_claims_per_agent_turn(trajs):
    """One turn of five states a false fact: the misinformation rate is 1/5, in the aggregate, the per-
    persona table (its interval) and the per-step training summary; a file saved before the fact check
    (no such event) counts 0."""
    trajs[1].states[1]["events"]["false_claims"] = ["commission_fees"]
    trajs[0].states[0]["events"]["incoherent"] = ["speaks_for_callee"]
    m = E.aggregate(trajs)
    assert m["misinformation_rate"] == pytest.approx(1 / 5) and m["incoherent_rate"] == pytest.approx(1 / 5)
    (row,) = E.per_persona(trajs).values()
    assert row["misinformation"] == pytest.approx(1 / 5)
    assert E.intervals(E.per_persona(trajs))["misinformation"][0] == pytest.approx(1 / 5)
    assert E.summarize(trajs)["misinformation_rate"] == pytest.approx(1 / 5)
    old = {p: {k: v for k, v in r.items() if k != "misinformation"} for p, r in E.per_persona(trajs).items()}
    assert "misinformation" not in E.intervals(old)                   # an old table: the metric is left out


def test_progress_goes_to_stderr_and_stdout_keeps_the_results(tmp_path, tokenizer, capsys):
    from conftest import make_tiny_model
    tiny = tmp_path / "tiny"
    make_tiny_model(tokenizer).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    E.main(["--n", "1", "--personas", "2", "--out", str(tmp_path / "ev"), f"model.name_or_path={tiny}", "model.warm_start=",
            "rollout.max_new_tokens=4", "simulator.max_turns=2", "simulator.appraiser=lexical"])
    out, err = capsys.readouterr()
    # per policy, a bar over the calls' turn budget (2 personas x 1 sample x 2 turns); tqdm draws it at once
    assert "eval base:   0%" in err and "0/4 [" in err and "turn/s" in err
    assert "\r" not in out and "turn/s" not in out and "calls over" not in out
    assert out.splitlines()[0].startswith("base ") and "wrote " in out
    saved = [json.loads(l) for l in open(tmp_path / "ev" / "samples_base.jsonl")]
    assert saved[0]["domain"] and saved[0]["public"].startswith("Callee:") and saved[0]["concerns"][0]["severity"] >= 1


def test_the_pilot_plays_each_note_style_and_judges_the_claim_on_paired_intervals(tiny_dir, tmp_path, capsys):
    """--pilot --notes concerns,guide: the base policy and the same policy given each note, on the same
    personas and seeds; the verdict line quotes the paired success and resolve intervals."""
    E.main(["--pilot", "--notes", "concerns,guide", "--n", "1", "--personas", "2", "--out", str(tmp_path / "ev"),
            f"model.name_or_path={tiny_dir}", "model.warm_start=", "rollout.max_new_tokens=3", "simulator.max_turns=1",
            "simulator.appraiser=lexical", "aopsd.placement=system"])
    out = capsys.readouterr().out
    report = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert list(report) == ["base", "base+privileged(concerns, system)", "base+privileged(guide, system)"]
    assert out.count("pilot: the claim does not hold for base+privileged(") == 2 and "resolved " in out
    with pytest.raises(SystemExit, match="unknown note style"):
        E.main(["--pilot", "--notes", "hints", "--n", "1", "--personas", "2", "--out", str(tmp_path / "ev2"),
                f"model.name_or_path={tiny_dir}", "model.warm_start=", "simulator.appraiser=lexical"])


# ----------------------------------------------------------------------------- issue 32: adapters, partial results

def noisy_adapter(tiny_dir, path, r=2):
    """A LoRA adapter of the tiny model with random B matrices (so it changes the policy), saved at `path`."""
    import lm
    import torch
    _, model = lm.load_model({"name_or_path": tiny_dir, "device": "cpu", "dtype": "float32", "quantization": "none"})
    model = lm.add_lora(model, {"r": r, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def good_adapter(tiny_dir, tmp_path_factory):
    return noisy_adapter(tiny_dir, tmp_path_factory.mktemp("adapter") / "good")


TINY_EVAL = ["--n", "1", "model.warm_start=", "--personas", "2", "rollout.max_new_tokens=3", "simulator.max_turns=1",
             "simulator.appraiser=lexical", "aopsd.placement=system"]


@pytest.mark.parametrize("damage, words", [
    (lambda a: (a / "adapter_config.json").write_text((a / "adapter_config.json").read_text().replace('"r": 2', '"r": 8')),
     "its LoRA weights have shape [2, 32] where this model needs [8, 32] (another base model or lora.r)"),
    (lambda a: (a / "adapter_config.json").write_text("{not json"), "adapter_config.json cannot be read"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes(b""), "its weights cannot be read (SafetensorError"),
])
def test_a_bad_adapter_stops_before_anything_is_played_and_nothing_is_written(tiny_dir, good_adapter, tmp_path,
                                                                              monkeypatch, damage, words, one_thread):
    """Another rank, bad JSON, empty weights: one sentence naming the adapter, before the base policy is played
    (it used to crash inside PEFT with 420 'size mismatch' lines after playing the base, writing nothing)."""
    import shutil
    good, bad = good_adapter, tmp_path / "bad"
    shutil.copytree(good, bad)
    damage(bad)
    monkeypatch.setattr(E, "play", lambda *a, **k: pytest.fail("a policy was played"))
    out = tmp_path / "ev"
    with pytest.raises(SystemExit) as leave:
        E.main([*TINY_EVAL, "--out", str(out), f"model.name_or_path={tiny_dir}", "model.warm_start=", "--adapter", good, "--adapter", str(bad)])
    message = str(leave.value)
    assert message.startswith(f"eval: --adapter {bad}") and words in message and "\n" not in message
    assert not out.exists()


def test_each_policys_results_are_written_as_soon_as_it_is_played(tiny_dir, tmp_path, monkeypatch, one_thread):
    """A crash while playing the second policy (an out-of-memory, a kill) leaves the first one's results."""
    real_play, played = E.play, []

    def play_then_crash(*args, **kwargs):
        if played:
            raise RuntimeError("CUDA out of memory")
        played.append(1)
        return real_play(*args, **kwargs)
    monkeypatch.setattr(E, "play", play_then_crash)
    out = tmp_path / "ev"
    with pytest.raises(RuntimeError):
        E.main([*TINY_EVAL, "--pilot", "--out", str(out), f"model.name_or_path={tiny_dir}"])
    assert list(json.load(open(out / "metrics.json"))) == ["base"]
    assert "| base | 2 |" in (out / "report.md").read_text() and (out / "samples_base.jsonl").exists()


def test_adapters_checked_first_leave_the_base_policy_as_it_was(tiny_dir, good_adapter, tmp_path, one_thread):
    """Every adapter is loaded and taken off again before anything is played: the base policy's calls are the
    same as without --adapter, and the adapter's own calls differ from them."""
    good = good_adapter
    args = [*TINY_EVAL, "rollout.max_new_tokens=8", f"model.name_or_path={tiny_dir}"]
    E.main([*args, "--out", str(tmp_path / "plain")])
    E.main([*args, "--out", str(tmp_path / "with"), "--adapter", good, "--adapter", good])
    read = lambda f: [json.loads(line)["messages"] for line in open(f)]
    assert read(tmp_path / "with" / "samples_base.jsonl") == read(tmp_path / "plain" / "samples_base.jsonl")
    assert read(tmp_path / "with" / "samples_adapter0.jsonl") == read(tmp_path / "with" / "samples_adapter1.jsonl")
    assert read(tmp_path / "with" / "samples_adapter0.jsonl") != read(tmp_path / "plain" / "samples_base.jsonl")
