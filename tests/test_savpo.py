"""SAVPO losses on hand-computed values, and the trainer on a tiny random model."""
import json
import math
import os

import pytest
import torch

import lm
import savpo
from conftest import make_tiny_model, tiny_cfg


# ----------------------------------------------------------------------------- AOPSD

def test_token_kl_hand_computed_and_zero_when_identical():
    teacher = torch.tensor([[0.0, math.log(3.0)]])      # p_T = [0.25, 0.75]
    student = torch.tensor([[0.0, 0.0]])                # p_S = [0.5, 0.5]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert savpo.token_divergence(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert savpo.token_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_divergence_options_against_closed_forms():
    p_t, p_s = torch.tensor([[0.25, 0.75]]), torch.tensor([[0.5, 0.5]])
    kl = lambda p, q: float((p * (p / q).log()).sum())
    t, s = p_t.log(), p_s.log()
    assert savpo.divergence(t, s, "forward").item() == pytest.approx(kl(p_t, p_s), abs=1e-6)    # 0.1308
    assert savpo.divergence(t, s, "reverse").item() == pytest.approx(kl(p_s, p_t), abs=1e-6)    # 0.1438
    for alpha in (0.5, 0.2, 0.9):   # TRL: (1 - a) KL(S || m) + a KL(T || m), m = a p_T + (1 - a) p_S
        m = alpha * p_t + (1 - alpha) * p_s
        expected = (1 - alpha) * kl(p_s, m) + alpha * kl(p_t, m)
        assert savpo.divergence(t, s, "jsd", alpha).item() == pytest.approx(expected, abs=1e-6)
    assert savpo.divergence(t, s, "jsd", 0.5).item() == pytest.approx(0.0338, abs=1e-4)
    for kind in ("forward", "reverse", "jsd"):      # zero iff the distributions agree
        assert savpo.divergence(t, t, kind).item() == pytest.approx(0.0, abs=1e-7)
    # top-k over the student's support: the student's top-1 (p 0.6) + tail, teacher projected onto it
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    student = torch.tensor([[0.2, 0.6, 0.2]]).log()
    got = savpo.token_divergence(student, teacher, "reverse", vocab="topk", topk=1, support="student").item()
    assert got == pytest.approx(0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7), abs=1e-5)
    got = savpo.token_divergence(student, teacher, "forward", vocab="topk", topk=1, support="teacher").item()
    assert got == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), abs=1e-5)


def test_topk_with_tail_bucket():
    teacher = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    student = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.4)]])
    # k = 1: the teacher's top token (p 0.5 vs 0.2) plus a tail bucket (0.5 vs 0.8)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert savpo.token_divergence(student, teacher, vocab="topk", topk=1).item() == pytest.approx(expected, abs=1e-5)
    full = savpo.token_divergence(student, teacher).item()
    assert savpo.token_divergence(student, teacher, vocab="topk", topk=3).item() == pytest.approx(full, abs=1e-5)


def test_aopsd_is_a_turn_mean_then_weighted_over_turns():
    torch.manual_seed(0)
    V = 11
    student = torch.randn(1, 5, V)
    teacher = torch.randn(1, 5, V)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    turns = torch.tensor([[0, 0, 0, 1, 2]])
    kl = savpo.token_divergence(student[0], teacher[0])
    loss, mean_kl = savpo.aopsd_loss(student, teacher, mask, turns)
    turn_means = [(kl[0] + kl[1]) / 2, kl[3], kl[4]]
    assert loss.item() == pytest.approx(float(sum(turn_means) / 3), abs=1e-6)
    assert mean_kl.item() == pytest.approx(float((kl[0] + kl[1] + kl[3] + kl[4]) / 4), abs=1e-6)
    weights = torch.tensor([[1.0, 0.0, 3.0]])
    loss_w, _ = savpo.aopsd_loss(student, teacher, mask, turns, turn_weights=weights)
    assert loss_w.item() == pytest.approx(float((turn_means[0] + 3 * turn_means[2]) / 4), abs=1e-6)
    # normalised by the whole step's weight (here 10), not by this batch's (4)
    loss_step, _ = savpo.aopsd_loss(student, teacher, mask, turns, turn_weights=weights, weight_total=10.0)
    assert loss_step.item() == pytest.approx(float((turn_means[0] + 3 * turn_means[2]) / 10), abs=1e-6)
    clipped, _ = savpo.aopsd_loss(student, teacher, mask, turns, clip=1e-3)
    assert clipped.item() == pytest.approx(1e-3, abs=1e-7)
    assert savpo.aopsd_loss(teacher, teacher, mask, turns)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() > 0


def test_chunking_changes_nothing_and_gradients_reach_the_student_only():
    torch.manual_seed(1)
    student = torch.randn(1, 7, 50, requires_grad=True)
    teacher = torch.randn(1, 7, 50, requires_grad=True)
    mask = torch.ones(1, 7, dtype=torch.long)
    turns = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])
    grads = []
    for chunk in (2, 256):
        student.grad = None
        loss, _ = savpo.aopsd_loss(student, teacher, mask, turns, chunk=chunk)
        loss.backward()
        grads.append(student.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert teacher.grad is None                  # the teacher is a stop-gradient target
    assert grads[0].abs().sum() > 0


# ----------------------------------------------------------------------------- STPR

def test_stpr_worked_example():
    rewards = torch.tensor([1.0, 0.0, 0.0])
    dw = [torch.tensor([0.5]), torch.tensor([0.5, 0.0, -0.5]), torch.tensor([0.0])]
    groups = torch.tensor([0, 0, 0])
    adv, per_turn = savpo.stpr_advantages(rewards, dw, groups, "direction")
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([2 * s, -s, -s]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_turn[1], torch.tensor([s, -s, -s]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_turn[0], torch.tensor([2 * s]), atol=1e-4, rtol=0)
    _, outcome = savpo.stpr_advantages(rewards, dw, groups, "outcome")
    torch.testing.assert_close(outcome[1], torch.tensor([-s, -s, -s]), atol=1e-4, rtol=0)
    _, additive = savpo.stpr_advantages(rewards, dw, groups, "additive", beta=1.0)
    dw_rms = torch.cat(dw).pow(2).mean().sqrt()
    torch.testing.assert_close(additive[1], -s + torch.tensor([0.5, 0.0, -0.5]) / dw_rms, atol=1e-4, rtol=0)
    # every turn moved the same way (std 0): the unit is the rms, so the advantages stay finite
    _, same = savpo.stpr_advantages(torch.zeros(2), [torch.tensor([-0.25, -0.25])] * 2, torch.zeros(2), "additive", 0.5)
    torch.testing.assert_close(same[0], torch.tensor([-0.5, -0.5]))


def test_equal_non_dyadic_rewards_give_exactly_zero():
    # 8 x 3.2: a float32 mean is one ulp off, and (r - mean) / (std + eps) was about -0.19 for everyone
    rewards = torch.full((8,), 3.2)
    dw = [torch.tensor([0.5, -0.5])] * 8
    for mode in ("direction", "outcome"):
        adv, per_turn = savpo.stpr_advantages(rewards, dw, torch.zeros(8, dtype=torch.long), mode)
        assert torch.equal(adv, torch.zeros(8)) and all(torch.equal(p, torch.zeros(2)) for p in per_turn)
    # a continuous reward with a real contrast still gets it
    adv, _ = savpo.stpr_advantages(torch.tensor([3.2, 3.2, 1.2, 3.2]), dw[:4], torch.zeros(4, dtype=torch.long))
    assert adv[2] < 0 < adv[0] and adv[0] == adv[1] == adv[3]


def test_stpr_groups_are_normalised_separately_and_equal_rewards_give_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    dw = [torch.tensor([1.0])] * 4
    adv, per_turn = savpo.stpr_advantages(rewards, dw, torch.tensor([0, 0, 1, 1]), "direction")
    assert adv[0] == 0 and adv[1] == 0 and per_turn[0].item() == 0     # no outcome contrast, no signal
    assert adv[2] > 0 > adv[3]
    assert per_turn[3].item() > 0    # failed call, but the turn raised willingness: reinforced


# ----------------------------------------------------------------------------- clipped PG

def test_clipped_pg_hand_computed():
    logp = torch.tensor([[0.5, -0.7, 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, frac, outside = savpo.clipped_pg_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # token 1: ratio e^0.5 = 1.65 > 1.28, A > 0 -> 1.28 (clipped: no gradient); token 2: ratio e^-0.7 =
    # 0.50, A < 0 -> min(-0.50, -0.8) = -0.8 (clipped); token 3 masked out
    assert loss.item() == pytest.approx(-(1.28 - 0.8) / 2, abs=1e-5)
    assert frac.item() == pytest.approx(1.0) and outside.item() == pytest.approx(1.0)
    # the same ratios with the advantages' signs flipped: outside the range, but the min keeps the
    # unclipped term, so the gradient is not removed (TRL's region definition counts neither)
    _, frac_flip, outside_flip = savpo.clipped_pg_loss(logp, old, -adv, mask)
    assert frac_flip.item() == 0.0 and outside_flip.item() == pytest.approx(1.0)
    unclipped, frac0, outside0 = savpo.clipped_pg_loss(old, old, adv, mask)
    assert unclipped.item() == pytest.approx(0.0) and frac0.item() == 0.0 and outside0.item() == 0.0
    assert savpo.ref_kl(logp, logp, mask).item() == pytest.approx(0.0)
    assert savpo.ref_kl(logp, old, mask).item() > 0


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
    assert "success_rate" in result
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
    savpo.main([f"model.name_or_path={folder}", f"out_dir={out}", "train.steps=1", "train.personas_per_step=1",
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
