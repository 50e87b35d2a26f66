"""The privileged view the model can act on and the warm start: what the note may hold, a call given as
text rendered exactly as a rollout feeds the policy, the stop at the callee's part, the concise expert,
and a supervised stage that learns its data and folds into the weights."""

import os
import re

import pytest
import torch

import config
import kvbatch
import lm
import personas as P
import rollout
import scripted_agents as SA
import simulator as S
import warmstart as W
from conftest import make_tiny_model


@pytest.mark.parametrize("style", P.NOTE_STYLES)
def test_the_note_holds_the_personas_own_concerns_and_nothing_else(style):
    """Every quoted piece of the note is the persona's own concern's statement, its expert question or its
    resolution (the bank's fact for it); no other concern of the bank appears, by id, words or fact."""
    for domain in P.list_domains():
        bank = P.load_bank(domain)
        questions = P.expert_questions(domain)
        for persona in P.sample(domain, 12, 3):
            note = P.private_view(persona, style)
            mine = {c.id for c in persona.concerns}
            allowed = {text for c in persona.concerns
                       for text in (c.statement, c.resolution, *questions[c.id])}
            assert set(re.findall(r'"([^"]+)"', note)) <= allowed
            outside = re.sub(r'"[^"]+"', "", note)                    # what is said outside the quotes
            assert set(re.findall(r"\d\. ([a-z ]+):", outside)) <= {c.replace("_", " ") for c in mine}
            for other in bank["concerns"]:
                if other["id"] in mine:
                    continue
                assert other["id"].replace("_", " ") not in note
                assert other["statement"] not in note and other["resolution"] not in note
                assert not any(q in note for q in questions[other["id"]])


class ScriptedDecoder(kvbatch.KVBatch):
    """KVBatch whose `generate` returns scripted agent turns (token ids + end of turn) instead of sampling,
    so a rollout's ids can be compared with `render_call` of the same texts."""
    script = {}

    def generate(self, max_new_tokens, stop_ids, temperature=0.0, top_p=1.0, generator=None):
        out = {}
        for key in self.keys:
            tokens = self.script[key].pop(0)
            self.rows[key].extend(tokens)
            out[key] = (tokens, [0.0] * len(tokens))
        return out


def scripted_run(cfg, tokenizer, texts, extra=(), stop_at_callee=False):
    model = make_tiny_model(tokenizer)
    sim = S.CognitiveUserSimulator({**cfg["simulator"], "appraiser": "lexical", "utterance": "template",
                                    "max_turns": len(texts)}, seed=0)
    eos = tokenizer.eos_token_id
    ScriptedDecoder.script = {0: [lm.encode(tokenizer, t) + list(x) + [eos] for t, x in
                                  zip(texts, list(extra) + [()] * len(texts))]}
    persona = P.sample("merchant_recruitment", 1, 0)[0]
    roll = {**cfg["rollout"], "stop_at_callee": stop_at_callee}
    return rollout.run(model, tokenizer, sim, [persona], roll, decoder=ScriptedDecoder)[0]


def test_render_call_equals_what_a_rollout_feeds_the_policy(cfg, tokenizer):
    texts = ["Hi, is the commission a worry for you?", "It is 15% for six months.", "Shall I sign you up?"]
    traj = scripted_run(cfg, tokenizer, texts)
    rendered = rollout.render_call(tokenizer, traj.persona, traj.messages, traj.states, traj.decision)
    n = len(rendered.ids)
    assert rendered.ids == traj.ids[:n] and rendered.agent_mask == traj.agent_mask[:n]
    assert rendered.turn_ids == traj.turn_ids[:n] and rendered.note_slots == traj.note_slots
    assert [m["content"] for m in rendered.messages if m["role"] == "assistant"] == texts
    assert sum(rendered.agent_mask) == sum(len(lm.encode(tokenizer, t)) + 1 for t in texts)


def test_a_turn_that_starts_the_callees_part_ends_before_it(cfg, tokenizer):
    persona = P.sample("merchant_recruitment", 1, 0)[0]
    clean, tail = "Is the commission a worry for you?", f" Customer: Yes. {persona.name.split()[0]}: It is."
    tokens = lm.encode(tokenizer, clean + tail)
    keep = rollout.callee_cut(tokenizer, tokens, persona)
    assert tokenizer.decode(tokens[:keep]).strip() == clean
    assert rollout.callee_cut(tokenizer, lm.encode(tokenizer, clean), persona) is None
    # in a rollout: only the turn's own part stays, as sampled, and the end of turn is context
    extra = lm.encode(tokenizer, tail)
    traj = scripted_run(cfg, tokenizer, [clean], extra=[extra], stop_at_callee=True)
    assert traj.messages[1]["content"] == clean and traj.callee_cuts == 1
    agent = [t for t, m in zip(traj.ids, traj.agent_mask) if m]
    assert agent == lm.encode(tokenizer, clean)                     # the end of turn was not sampled: context
    whole = scripted_run(cfg, tokenizer, [clean], extra=[extra], stop_at_callee=False)
    assert whole.messages[1]["content"].endswith("It is.") and whole.callee_cuts == 0


def test_the_expert_keeps_to_the_turn_budget_and_one_move_of_each_kind(tokenizer):
    persona = P.sample("courier_recruitment", 1, 4)[0]
    obs = {"persona": persona, "bank": P.load_bank(persona.domain), "asked": {}, "turn": 1,
           "status": {c.id: "hidden" for c in persona.concerns}, "voiced": set()}
    first = W.expert_turn(obs, tokenizer, 39)
    assert first.startswith("Hi, this is Sam") and len(lm.encode(tokenizer, first)) <= 40
    cid = persona.concerns[0].id
    obs.update(turn=2, voiced={cid}, status={**obs["status"], cid: "revealed"})
    second = W.expert_turn(obs, tokenizer, 39)
    assert second.startswith(W.shortest_answer(tokenizer, next(c for c in obs["bank"]["concerns"] if c["id"] == cid)))
    assert second.count("?") <= 1                                  # an answer and at most one question
    obs.update(turn=3, voiced=set(), status={c.id: "resolved" for c in persona.concerns})
    assert W.expert_turn(obs, tokenizer, 39) == SA.push_line(obs["bank"])


def test_the_warm_start_learns_its_calls_and_folds_into_the_weights(tiny_dir, tmp_path, tokenizer):
    cfg = config.load(None, [f"model.name_or_path={tiny_dir}", "model.warm_start=", f"warmstart.out_dir={tmp_path}", "warmstart.calls=3",
                             "warmstart.epochs=2", "warmstart.lr=5e-3", "warmstart.micro_batch=3",
                             "simulator.appraiser=lexical", "aopsd.note=guide", "personas.eval_n=3"])
    path = W.train(cfg, log=lambda *a: None)
    losses = [__import__("json").loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert losses[1] < losses[0]                                   # it learns its data
    calls = [__import__("json").loads(line) for line in open(tmp_path / "calls.jsonl")]
    assert len(calls) == 3 and all(c["messages"][0]["role"] == "user" for c in calls)
    # model.warm_start folds the adapter into the weights: the same logits as base + adapter
    from peft import PeftModel
    tok, base = lm.load_model({**cfg["model"], "warm_start": ""})
    with_adapter = PeftModel.from_pretrained(base, path).eval()
    _, merged = lm.load_model({**cfg["model"], "warm_start": path})
    ids = torch.tensor([lm.encode(tok, "Hello, is the commission a worry?")])
    assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-4)
    # in bfloat16 the adapter is folded into the float32 weights first, then rounded once
    _, merged16 = lm.load_model({**cfg["model"], "dtype": "bfloat16", "warm_start": path})
    for (name, a), b in zip(merged.state_dict().items(), merged16.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
    with pytest.raises(lm.ModelError, match="warm_start"):
        lm.load_model({**cfg["model"], "warm_start": str(tmp_path / "nowhere")})
    # the release: float16 weights its manifest hashes, the config it was made with, the same policy to rounding
    import hashlib
    import json
    released = W.release({**cfg, "model": {**cfg["model"], "warm_start": ""}}, str(tmp_path), dest=str(tmp_path / "rel"))
    manifest = json.load(open(os.path.join(released, "MANIFEST.json")))
    blob = open(os.path.join(released, manifest["weights"]), "rb").read()
    assert hashlib.sha256(blob).hexdigest() == manifest["sha256"] and manifest["cross_entropy_by_epoch"] == losses
    assert manifest["train_dtype"] == "float32"                    # what a rebuild must pass as model.dtype
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(os.path.join(released, manifest["weights"])).values()} == {torch.float16}
    _, shipped = lm.load_model({**cfg["model"], "warm_start": os.path.join(released, "adapter")})
    assert torch.allclose(shipped(ids).logits, merged(ids).logits, atol=1e-2)
    assert config.check_warm_start({**cfg, "model": {**cfg["model"], "warm_start": os.path.join(released, "adapter")}})


def test_auto_warm_start_trains_once_and_its_runs_are_evaluated_on_it(tiny_dir, tmp_path, capsys):
    """model.warm_start=auto trains the warm start the first time only; a run on it saves the folder in its
    config, and eval.py plays that run's adapter on the same warm-started base (and says so)."""
    import eval as E
    import savpo
    common = [f"model.name_or_path={tiny_dir}", "model.warm_start=", f"warmstart.out_dir={tmp_path / 'ws'}", "warmstart.calls=2",
              "warmstart.epochs=1", "simulator.appraiser=lexical", "personas.eval_n=2"]
    cfg = config.load(None, [*common, "model.warm_start=auto"])
    resolved = W.resolve(cfg)
    path = resolved["model"]["warm_start"]
    assert path == str(tmp_path / "ws" / "adapter") and (tmp_path / "ws" / "adapter" / "adapter_config.json").exists()
    stamp = (tmp_path / "ws" / "adapter" / "adapter_config.json").stat().st_mtime
    assert W.resolve(cfg)["model"]["warm_start"] == path
    assert (tmp_path / "ws" / "adapter" / "adapter_config.json").stat().st_mtime == stamp     # not trained again
    from conftest import tiny_cfg
    run = tiny_cfg(tiny_dir, tmp_path / "run", "train.steps=1", f"model.warm_start={path}")
    savpo.Trainer(run, log=lambda *a: None).train()
    adapter = tmp_path / "run" / "checkpoints" / "step_000001" / "adapter"
    E.main(["--adapter", str(adapter), "--n", "1", "--personas", "2", "--no-base", "--out", str(tmp_path / "ev"),
            f"model.name_or_path={tiny_dir}", "model.warm_start=", "simulator.appraiser=lexical", "rollout.max_new_tokens=4",
            "simulator.max_turns=1"])
    assert f"model.warm_start={path}" in capsys.readouterr().err
    assert config.load(str(tmp_path / "ev" / "config.yaml"))["model"]["warm_start"] == path


def test_the_long_cpu_preset_warm_starts_with_the_guide_note_and_refuses_a_mismatched_adapter(tiny_dir, tmp_path):
    """presets/cpu_long.yaml loads over config.yaml (a partial file) and starts from the shipped warm start with
    the guide note; an adapter trained for another note is refused by name instead of silently reused."""
    cfg = config.load("presets/cpu_long.yaml")
    assert os.path.abspath(W.resolve(cfg)["model"]["warm_start"]) == os.path.join(W.RELEASE, "adapter") and cfg["aopsd"]["note"] == "guide"
    assert cfg["train"]["steps"] > config.load()["train"]["steps"] and cfg["out_dir"] == "runs/cpu_long"
    common = [f"model.name_or_path={tiny_dir}", f"warmstart.out_dir={tmp_path / 'ws'}", "warmstart.calls=2",
              "warmstart.epochs=1", "simulator.appraiser=lexical", "model.warm_start=auto"]
    W.resolve(config.load("presets/cpu_long.yaml", [*common, "aopsd.note=concerns"]))
    with pytest.raises(config.ConfigError, match="aopsd.note=concerns"):
        W.resolve(config.load("presets/cpu_long.yaml", common))


def test_the_comparison_preset_trains_128_dialogues_a_run_from_the_shipped_warm_start():
    """presets/compare.yaml (issue 31's comparison): at least 128 training dialogues a run, one-concern
    personas throughout, from the shipped warm start; each run's own final comparison is kept small."""
    cfg = config.load("presets/compare.yaml")
    t = cfg["train"]
    assert t["steps"] * t["personas_per_step"] * t["group_size"] >= 128
    assert cfg["personas"]["curriculum_steps"] >= t["steps"]
    assert cfg["personas"]["eval_n"] * cfg["personas"]["eval_samples"] <= 4
    assert os.path.abspath(W.resolve(cfg)["model"]["warm_start"]) == os.path.join(W.RELEASE, "adapter")


def test_the_shipped_warm_start_is_the_one_its_manifest_names_and_fits_the_default_config():
    """data/warmstart/: the adapter config.yaml starts every run from. Its weights are the file MANIFEST.json
    hashes (a rebuilt or edited file shows), at most 5 MB, and it was made for the default config's MUST_MATCH
    keys (model, note, placement, expert-call set, LoRA shape): resolve() accepts it from any directory."""
    import hashlib
    import json
    manifest = json.load(open(os.path.join(W.RELEASE, "MANIFEST.json")))
    blob = open(os.path.join(W.RELEASE, manifest["weights"]), "rb").read()
    assert hashlib.sha256(blob).hexdigest() == manifest["sha256"] and len(blob) == manifest["bytes"] <= 5_000_000
    assert manifest["command"].startswith("python warmstart.py") and manifest["cross_entropy_by_epoch"]
    cfg = config.load()
    assert os.path.normpath(os.path.join(config.HERE, cfg["model"]["warm_start"])) == os.path.join(W.RELEASE, "adapter")
    made = config.load(os.path.join(W.RELEASE, "config.yaml"))
    assert all(config.get(made, key) == config.get(cfg, key) for key in W.MUST_MATCH)
    assert W.resolve(cfg)["model"]["warm_start"]
    with pytest.raises(config.ConfigError, match="aopsd.placement"):
        W.resolve(config.load(None, ["aopsd.placement=system"]))


def test_a_warm_start_folder_is_checked_against_the_run_and_found_from_another_directory(tmp_path, monkeypatch):
    """model.warm_start=FOLDER with the config it was made with beside it: a run that differs in a MUST_MATCH
    key is refused by name; a relative folder inside the project resolves from another directory."""
    made = config.load(None, ["aopsd.note=concerns"])
    (tmp_path / "ws" / "adapter").mkdir(parents=True)
    config.save(made, str(tmp_path / "ws"))
    folder = str(tmp_path / "ws" / "adapter")
    W.resolve(config.load(None, [f"model.warm_start={folder}", "aopsd.note=concerns"]))
    with pytest.raises(config.ConfigError, match="aopsd.note=concerns"):
        W.resolve(config.load(None, [f"model.warm_start={folder}", "aopsd.note=guide"]))
    monkeypatch.chdir(tmp_path)
    shipped = W.resolve(config.load(None, ["model.warm_start=data/warmstart/adapter"]))["model"]["warm_start"]
    assert shipped == os.path.join(W.RELEASE, "adapter")
