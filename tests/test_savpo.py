"""The SAVPO trainer (savpo.py) on a tiny random model: presets, the policy gradient, resume, options."""
import json
import math
import os

import pytest
import torch

import lm
import savpo
from conftest import make_tiny_model, tiny_cfg


# ----------------------------------------------------------------------------- trainer

def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}


@pytest.mark.parametrize("algo", ["savpo", "grpo", "distill", "refine"])
def test_two_step_smoke_run_of_each_preset(tiny_dir, tmp_path, algo):
    cfg = tiny_cfg(tiny_dir, tmp_path / algo, f"algo={algo}")
    trainer = savpo.Trainer(cfg, log=lambda *a: None)
    before = lora_state(trainer.model)
    result = trainer.train()
    lines = [json.loads(l) for l in open(tmp_path / algo / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2]
    for l in lines:
        assert all(math.isfinite(v) for v in l.values() if isinstance(v, float))
    after = lora_state(trainer.model)
    moved = any(not torch.equal(before[n], after[n]) for n in before)
    if algo in ("savpo", "distill"):   # the distillation signal is dense: weights must move
        assert moved and lines[0]["aopsd_kl"] > 0
    elif algo == "grpo":               # random model, no accepts: no outcome contrast, no update at all
        assert lines[0]["pg_loss"] == 0.0 and lines[0]["aopsd_kl"] == 0.0 and not moved
    else:   # refine, additive STPR: random talk is off-topic (-0.25 willingness), a signal of its own
        assert lines[0]["aopsd_kl"] == 0.0 and lines[0]["pg_loss"] != 0.0 and moved
    assert "success_rate" in result["trained"]["overall"] and "resolve" in result["trained"]["difference_vs_base"]
    assert os.path.exists(tmp_path / algo / "config.yaml")
    samples = [json.loads(l) for l in open(tmp_path / algo / "samples.jsonl")]
    assert samples and "hidden_concerns" in samples[0] and samples[0]["states"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ckpt = tmp_path / algo / "checkpoints" / open(tmp_path / algo / "checkpoints" / "latest").read()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), ckpt / "adapter")
    for n, p in lora_state(loaded).items():
        torch.testing.assert_close(p, after[n])


def test_policy_gradient_raises_the_likelihood_of_accepted_dialogues(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path / "pg", "algo=grpo", "train.lr=5e-2")
    trainer = savpo.Trainer(cfg, log=lambda *a: None)
    trajs, _, _ = trainer.collect(0)
    for i, t in enumerate(trajs):                # pretend the first rollout of each group succeeded
        t.decision = "accept" if i % 2 == 0 else "reject"

    def mean_logp(ts):
        out = []
        with torch.no_grad():
            for t in ts:
                pos, tgt, _, _ = savpo.agent_targets(t)
                logits = lm.selected_logits(trainer.model, [t.ids], (torch.zeros(len(pos), dtype=torch.long),
                                                                    torch.tensor(pos)))
                out.append(torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(tgt)[:, None]).mean())
        return torch.stack(out).mean().item()

    good, bad = trajs[0::2], trajs[1::2]
    before = mean_logp(good) - mean_logp(bad)
    _, per_turn = trainer.advantages(trajs)
    stats = trainer.update(trajs, per_turn, 0)
    assert stats["grad_norm"] > 0 and stats["clip_frac"] == 0.0     # one pass: ratio exactly 1, nothing clipped
    assert mean_logp(good) - mean_logp(bad) > before + 0.05


def test_resume_reproduces_a_straight_run(tiny_dir, tmp_path):
    straight = savpo.Trainer(tiny_cfg(tiny_dir, tmp_path / "a", "train.steps=3"), log=lambda *a: None)
    straight.train()
    first = savpo.Trainer(tiny_cfg(tiny_dir, tmp_path / "b", "train.steps=2"), log=lambda *a: None)
    first.train()
    resumed = savpo.Trainer(tiny_cfg(tiny_dir, tmp_path / "b", "train.steps=3"), resume=True, log=lambda *a: None)
    assert resumed.step == 2
    resumed.train()
    a, b = lora_state(straight.model), lora_state(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)
    timing = {"rollout_tok_s", "rollout_s", "step_s", "peak_mem_gb", "teacher_s", "update_s", "eval_s"}
    la = [{k: v for k, v in json.loads(l).items() if k not in timing} for l in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [{k: v for k, v in json.loads(l).items() if k not in timing} for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert la == lb


def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tiny_dir, tmp_path):
    """The newest trainer.pt cut to 1,000 bytes (a disk that filled up): --resume names the file in one
    sentence, sets the folder aside and continues from the complete checkpoint before it, reproducing
    the lost step exactly; with no complete checkpoint left it starts again from step 0 and says so (it
    used to refuse and advise a plain start, which refuses a folder that holds a run: circular)."""
    run = tmp_path / "run"
    first = savpo.Trainer(tiny_cfg(tiny_dir, run), log=lambda *a: None)      # 2 steps, a checkpoint after each
    first.train()
    straight = lora_state(first.model)
    ckpts = run / "checkpoints"
    damaged = ckpts / "step_000002" / "trainer.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    said = []
    resumed = savpo.Trainer(tiny_cfg(tiny_dir, run), resume=True, log=said.append)
    assert f"checkpoint file {damaged} (" in said[0] and "resumes from step_000001" in said[0] and "\n" not in said[0]
    assert resumed.step == 1 and (ckpts / "step_000002.damaged").is_dir()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]
    resumed.train()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    again = lora_state(resumed.model)
    for n in straight:
        torch.testing.assert_close(again[n], straight[n], atol=1e-6, rtol=1e-5)
    for step in ("step_000001", "step_000002"):          # nothing complete left: step 0, which the seed gives
        pt = ckpts / step / "trainer.pt"
        pt.write_bytes(pt.read_bytes()[:1000])
    said = []
    again = savpo.Trainer(tiny_cfg(tiny_dir, run), resume=True, log=said.append)
    assert again.step == 0 and (ckpts / "step_000001.damaged").is_dir() and not (ckpts / "step_000001").exists()
    assert "resumes from step_000001" in said[0] and "resumes from step 0" in said[1]
    assert said[2] == f"{ckpts}: no complete checkpoint; the run starts again from step 0."
    assert all("\n" not in s for s in said) and (run / "metrics.jsonl").read_text() == ""
    fresh = savpo.Trainer(tiny_cfg(tiny_dir, tmp_path / "fresh"), log=lambda *a: None)
    for n, p in lora_state(again.model).items():         # the same start as a run never begun
        assert torch.equal(p, lora_state(fresh.model)[n])


def test_one_base_model_serves_every_role(tiny_dir, tmp_path):
    trainer = savpo.Trainer(tiny_cfg(tiny_dir, tmp_path / "one"), log=lambda *a: None)
    from transformers import AutoModelForCausalLM
    alone = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert lm.count_base_parameters(trainer.model) == alone
    assert trainer.simulator.model is trainer.model       # simulator = same weights, adapter disabled
    trainable = sum(p.numel() for p in trainer.params)
    assert 0 < trainable < alone / 5                       # only LoRA matrices train


def test_cli_refuses_bad_config_and_existing_run(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'train.stepz'"):
        savpo.main(["train.stepz=3"])
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="--resume"):
        savpo.main([f"out_dir={tmp_path}"])


def test_every_option_runs_and_the_ema_teacher_trails_the_student(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path / "opts", "aopsd.teacher=ema", "aopsd.ema_decay=0.5", "aopsd.vocab=topk",
                   "aopsd.topk=8", "aopsd.turn_weighting=willingness", "aopsd.placement=turn", "aopsd.clip=5.0",
                   "stpr.ref_kl=0.05", "stpr.mode=additive", "train.epochs=2")
    trainer = savpo.Trainer(cfg, log=lambda *a: None)
    trainer.train()
    lines = [json.loads(l) for l in open(tmp_path / "opts" / "metrics.jsonl")]
    assert all(math.isfinite(l["loss"]) and l["aopsd_kl"] > 0 for l in lines)
    assert lines[-1]["ref_kl"] > 0                       # the student has left the reference
    params = dict(trainer.model.named_parameters())
    student = {n: p for n, p in params.items() if "lora_B" in n and ".default." in n}
    ema = {n: params[n.replace(".default.", ".ema.")] for n in student}
    # EMA with decay 0.5 over 4 optimizer steps: non-zero, but not equal to the student
    assert any(e.abs().sum() > 0 for e in ema.values())
    assert any(not torch.allclose(student[n], ema[n]) for n in student)


def test_a_separately_named_simulator_model(tiny_dir, tmp_path, tokenizer):
    other = tmp_path / "other"
    make_tiny_model(tokenizer, seed=7).save_pretrained(other)
    tokenizer.save_pretrained(other)
    trainer = savpo.Trainer(tiny_cfg(tiny_dir, tmp_path / "sep", f"simulator.model={other}",
                                     "simulator.utterance=llm", "simulator.max_new_tokens=4"), log=lambda *a: None)
    assert trainer.simulator.model is not trainer.model
    trajs, _, _ = trainer.collect(0)
    assert all(t.states for t in trajs)


def test_a_written_random_model_runs_the_main_job_and_logs_the_time_split(tmp_path):
    """The GPU smoke path (`bench.py --arch A --write-model DIR`, then savpo.py on DIR), on the CPU with
    the tiny test architecture: no download, and metrics.jsonl carries the step's time split and peak
    memory."""
    import bench
    folder = bench.write_model("tiny-qwen3", str(tmp_path / "tiny-qwen3"))
    out = tmp_path / "run"
    savpo.main([f"model.name_or_path={folder}", "model.warm_start=", f"out_dir={out}", "train.steps=1", "train.personas_per_step=1",
                "train.group_size=2", "rollout.max_new_tokens=4", "simulator.max_turns=1", "personas.eval_n=1",
                "simulator.appraiser=lexical"])
    record = json.loads(open(out / "metrics.jsonl").readline())
    for key in ("rollout_s", "teacher_s", "update_s", "step_s", "peak_mem_gb", "rollout_tok_s"):
        assert record[key] >= 0, key
    assert record["step_s"] >= record["rollout_s"] + record["update_s"] - 0.2


def test_samples_carry_the_turn_advantages_and_divergences_the_update_used(tiny_dir, tmp_path, capsys):
    cfg = tiny_cfg(tiny_dir, tmp_path / "turns", "train.steps=1")
    trainer = savpo.Trainer(cfg, log=lambda *a: None)
    seen, update = {}, trainer.update

    def spy(trajs, per_turn, step):
        seen.update(trajs=trajs, per_turn=per_turn, stats=update(trajs, per_turn, step))
        return seen["stats"]

    trainer.update = spy
    trainer.train()
    samples = [json.loads(l) for l in open(tmp_path / "turns" / "samples.jsonl")]
    G, divergence = cfg["train"]["group_size"], trainer.turn_divergence
    assert len(samples) == len(seen["trajs"]) // G
    for j, s in enumerate(samples):       # samples.jsonl keeps the first rollout of each group
        i = j * G
        assert len(s["turn_advantages"]) == len(s["turn_divergence"]) == len(s["states"]) > 0
        assert s["turn_advantages"] == pytest.approx(seen["per_turn"][i].tolist(), abs=1e-5)
        assert s["turn_divergence"] == pytest.approx([divergence[i][k] for k in range(len(s["states"]))], abs=1e-6)
    # every turn of the step has one divergence, and with uniform turn weights the AOPSD term of the
    # loss is their mean: loss - stpr.coef * pg = aopsd.coef * mean over turns
    turns = [v for d in divergence.values() for v in d.values()]
    assert len(turns) == sum(t.n_turns for t in seen["trajs"]) and min(turns) > 0
    stats = seen["stats"]
    aopsd_term = stats["loss"] - cfg["stpr"]["coef"] * stats["pg_loss"]
    assert aopsd_term == pytest.approx(cfg["aopsd"]["coef"] * sum(turns) / len(turns), rel=1e-4)
    # progress (rollout turns, then the update's micro-batches) goes to stderr; stdout keeps the step line
    out, err = capsys.readouterr()
    assert "step 1 rollouts" in err and "step 1 update" in err and "turn" in err
    assert "\r" not in out and "it/s" not in out and "step   1 | loss" in out


def test_the_start_policy_is_exactly_the_initial_policy_and_nests_under_the_simulators_adapter_off(tokenizer):
    """lm.start_policy: inside, the logits are the adapter-free ones even though the trained adapter is
    non-zero, and an `adapter_off` inside it (the simulator's role) does not bring the trained adapter
    back; after it, the trained adapter is active and trainable again and the zero one is gone."""
    torch.manual_seed(0)
    model = lm.add_lora(make_tiny_model(tokenizer), {"r": 4, "alpha": 8, "dropout": 0.0,
                                                    "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)          # a trained adapter
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    trained = model(input_ids=ids).logits
    with lm.adapter_off(model):
        initial = model(input_ids=ids).logits
    assert not torch.allclose(trained, initial)
    with lm.start_policy(model):
        assert torch.equal(model(input_ids=ids).logits, initial)
        with lm.adapter_off(model):
            pass
        assert torch.equal(model(input_ids=ids).logits, initial)
    assert torch.equal(model(input_ids=ids).logits, trained)
    assert list(model.peft_config) == ["default"]
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_the_final_comparison_pairs_the_trained_policy_with_its_start(tiny_dir, tmp_path, one_thread):
    """The run ends with the held-out comparison: both policies play the same personas with the same seeds.
    With both loss terms off the adapter stays zero, so the trained policy's calls are the start's, token
    for token, and every paired difference is exactly 0; with training on, the start's calls are still
    those of a fresh model (the trained adapter does not leak into the base row)."""
    still = tiny_cfg(tiny_dir, tmp_path / "still", "stpr.coef=0", "aopsd.coef=0", "personas.eval_samples=2")
    result = savpo.Trainer(still, log=lambda *a: None).train()
    final = tmp_path / "still" / "final"
    base = [json.loads(line) for line in open(final / "samples_base.jsonl")]
    trained = [json.loads(line) for line in open(final / "samples_trained.jsonl")]
    assert len(base) == len(trained) == 2 * 2
    assert [d["messages"] for d in base] == [d["messages"] for d in trained]
    assert all(v == [0.0, 0.0, 0.0] for v in result["trained"]["difference_vs_base"].values())
    assert "trained - base" in savpo.comparison_table(result, 2, 2)
    moved = tiny_cfg(tiny_dir, tmp_path / "moved", "personas.eval_samples=2", "train.lr=5e-2")
    savpo.Trainer(moved, log=lambda *a: None).train()
    moved_base = [json.loads(line) for line in open(tmp_path / "moved" / "final" / "samples_base.jsonl")]
    moved_trained = [json.loads(line) for line in open(tmp_path / "moved" / "final" / "samples_trained.jsonl")]
    assert [d["messages"] for d in moved_base] == [d["messages"] for d in base]
    assert [d["messages"] for d in moved_trained] != [d["messages"] for d in base]
