"""SAVPO on TRL's GRPOTrainer (trl_savpo.py) against the native trainer (savpo.py), on a tiny random model:
the same dialogues, the same advantages, the same loss and gradient, and two processes in step."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import config
import losses
import savpo
import trl_savpo
from conftest import tiny_cfg


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_default(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n and ".default." in n}


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    """The native trainer and the TRL one, built from the same config (hence the same initial adapter),
    and step 0's rollouts of the native one. Options chosen so every term of the loss is on: STPR with a
    coefficient, AOPSD weighted by willingness, the reference KL."""
    out = tmp_path_factory.mktemp("trl")
    cfg = tiny_cfg(tiny_dir, out / "run", "train.steps=1", "train.save_every=0", "stpr.coef=0.7", "stpr.ref_kl=0.05",
                   "aopsd.turn_weighting=willingness", "train.grad_clip=1e6", "simulator.max_turns=3")
    native = savpo.Trainer(copy.deepcopy(cfg), log=lambda *a: None)
    trajs, _, _ = native.collect(0)
    trainer = trl_savpo.build_trainer(copy.deepcopy(cfg))
    return native, trainer, trajs


def prompts_of(native):
    G = native.cfg["train"]["group_size"]
    return [p.persona_id for p in native.personas_for(0) for _ in range(G)]


def test_rollout_func_returns_the_dialogues_as_played(pair, tokenizer):
    """The same token ids as savpo.py's rollouts, split into prompt (up to the first agent token) and
    completion (up to the last); env_mask is 0 exactly on what the environment wrote; the ids decode to
    the dialogue: each run of mask-1 tokens is one agent message, the runs between hold the user lines."""
    native, trainer, expected = pair
    out = trainer.rollout_func(prompts_of(native), trainer)
    assert len(out["trajectory"]) == len(expected)
    for traj, prompt, completion, mask in zip(expected, out["prompt_ids"], out["completion_ids"], out["env_mask"]):
        last = max(j for j, m in enumerate(traj.agent_mask) if m)
        assert prompt + completion == traj.ids[:last + 1]
        assert mask == traj.agent_mask[len(prompt):last + 1] and mask[0] == 1 and not any(traj.agent_mask[:len(prompt)])
        runs, start = [], 0                        # maximal runs of equal mask values over the completion
        for c in range(1, len(mask) + 1):
            if c == len(mask) or mask[c] != mask[start]:
                runs.append((mask[start], completion[start:c]))
                start = c
        agent = [tokenizer.decode(ids, skip_special_tokens=True).strip() for m, ids in runs if m]
        assert agent == [m["content"] for m in traj.messages if m["role"] == "assistant"]
        users = [m["content"] for m in traj.messages if m["role"] == "user"]
        between = [tokenizer.decode(ids, skip_special_tokens=True) for m, ids in runs if not m]
        assert users[0] in tokenizer.decode(prompt) and len(between) == len(agent) - 1
        assert all(line in text for line, text in zip(users[1:], between))   # the user line after each agent turn


def fixed_batch(native, trajs):
    """Step 0's rollouts with a contrast of outcomes (the first of each group accepted) and willingness
    shifts that differ from turn to turn (the random policy's are all -0.25), so every STPR mode and the
    AOPSD turn weights vary; TRL's rollout_func replaced by one returning (copies of) them."""
    trajs = copy.deepcopy(trajs)
    for i, t in enumerate(trajs):
        t.decision = "accept" if i % native.cfg["train"]["group_size"] == 0 else "reject"
        for k, state in enumerate(t.states):
            state["delta_willingness"] = [0.5, -0.25, 0.0][(i + k) % 3]
    return trajs, lambda prompts, trainer: trl_savpo.trl_batch(copy.deepcopy(trajs), 0, native.cfg["train"]["group_size"])


@pytest.mark.parametrize("mode", ["direction", "additive", "outcome"])
def test_per_token_advantages_are_stpr_on_each_turns_agent_tokens(pair, mode):
    native, trainer, trajs = pair
    trajs, trainer.rollout_func = fixed_batch(native, trajs)
    st = {**trainer.cfg["stpr"], "mode": mode}
    trainer.cfg["stpr"] = st
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts_of(native)])
    _, per_turn = losses.stpr_advantages(torch.tensor([t.reward for t in trajs]),
                                         [torch.tensor([s["delta_willingness"] for s in t.states]) for t in trajs],
                                         torch.tensor([t.group for t in trajs]), mode=mode, beta=st["beta"])
    expected = torch.zeros_like(out["advantages"])                                      # (B, T)
    for b, t in enumerate(trajs):
        start = len(trl_savpo.trl_sample(t)[0])
        for j in range(start, max(j for j, m in enumerate(t.agent_mask) if m) + 1):
            if t.agent_mask[j]:
                expected[b, j - start] = st["coef"] * per_turn[b][t.turn_ids[j]]
    assert out["advantages"].shape == out["completion_ids"].shape
    torch.testing.assert_close(out["advantages"], expected, atol=1e-6, rtol=0)
    assert (expected != 0).any() and len({round(float(x), 5) for x in expected[expected != 0]}) > 1


def test_one_step_on_trl_has_the_native_loss_and_gradient(pair):
    """Parity: on a fixed batch (with a non-zero adapter, so the fixed teacher and the reference differ from
    the student), TRL's step -- its own clipped PG with our per-token advantages and beta KL, plus our
    AOPSD term, through its shuffling, micro-batching and gradient accumulation -- has savpo.py's loss
    and gradient."""
    native, trainer, trajs = pair
    trainer.cfg["stpr"] = {**trainer.cfg["stpr"], "mode": native.cfg["stpr"]["mode"]}
    torch.manual_seed(1)
    with torch.no_grad():                         # the same non-zero adapter in both models
        theirs = lora_default(trainer.model)
        for name, p in lora_default(native.model).items():
            p.add_(torch.randn_like(p) * 0.02)           # KL to the reference ~0.3 nats a token
            theirs[name].copy_(p)
    trajs, trainer.rollout_func = fixed_batch(native, trajs)

    native_grads = {}
    real_step = native.optimizer.step

    def record_native():
        native_grads.update({n: p.grad.clone() for n, p in lora_default(native.model).items()})
        real_step()
    native.optimizer.step = record_native
    _, per_turn = native.advantages(trajs)
    stats = native.update(copy.deepcopy(trajs), per_turn, 0)

    from transformers import TrainerCallback
    trl_grads, trl_losses = {}, []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            trl_grads.update({n: p.grad.clone() for n, p in lora_default(model).items()})
    trainer.add_callback(Record())
    real_loss = trainer.compute_loss

    def recorded_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        trl_losses.append(float(loss.detach()))
        return loss
    trainer.compute_loss = recorded_loss
    before = {n: p.detach().clone() for n, p in lora_default(trainer.model).items()}
    trainer.train()

    assert len(trl_losses) == trainer.args.gradient_accumulation_steps > 1       # several micro-batches
    assert stats["pg_loss"] != 0 and stats["aopsd_kl"] > 0 and stats["ref_kl"] > 0
    print(f"native loss {stats['loss']:.7f}, TRL loss {sum(trl_losses):.7f}")
    assert sum(trl_losses) == pytest.approx(stats["loss"], abs=1e-5)
    assert trl_grads.keys() == native_grads.keys() and native_grads
    worst = max(float((trl_grads[n] - native_grads[n]).abs().max()) for n in native_grads)
    scale = max(float(g.abs().max()) for g in native_grads.values())
    print(f"largest gradient difference {worst:.2e} (largest gradient entry {scale:.2e})")
    for n in native_grads:                        # float32 summation order only (measured: 7e-6 of 1.1)
        torch.testing.assert_close(trl_grads[n], native_grads[n], atol=1e-5, rtol=1e-5)
    after = lora_default(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)              # the optimizer stepped


@pytest.mark.parametrize("overrides, says", [
    (["train.group_size=1", "stpr.mode=additive"], "'train.group_size' is 1; TRL's GRPOTrainer needs >= 2"),
    (["train.personas_per_step=3", "train.group_size=2", "train.micro_batch=4"], "6 is a multiple of train.micro_batch"),
    (["aopsd.teacher=ema"], "use fixed or live"),
    (["train.minibatches=3"], "'train.minibatches' is 3, which does not divide the 2 micro-batches")])
def test_configs_trl_cannot_run_are_refused_in_one_sentence(tiny_dir, tmp_path, overrides, says):
    with pytest.raises(config.ConfigError, match=re.escape(says)) as refused:
        trl_savpo.grpo_config(tiny_cfg(tiny_dir, tmp_path / "bad", *overrides), num_processes=1)
    assert "\n" not in str(refused.value)


def test_minibatches_map_to_optimizer_steps_within_one_generation(tiny_dir, tmp_path):
    """train.minibatches=2 on 2 micro-batches a step: one generation per step of rollouts, an optimizer step
    per micro-batch, so TRL counts 2 x epochs optimizer steps per savpo.py step."""
    args = trl_savpo.grpo_config(tiny_cfg(tiny_dir, tmp_path / "mb", "train.minibatches=2", "train.epochs=2"),
                                 num_processes=1)
    assert (args.steps_per_generation, args.gradient_accumulation_steps, args.num_iterations) == (2, 1, 2)
    assert args.max_steps == 2 * 2 * 2                   # train.steps x epochs x minibatches


def test_two_processes_train_in_step(tiny_dir, tmp_path):
    """`torchrun --nproc_per_node 2 trl_savpo.py ...`: two CPU processes over gloo, the real entry point.
    Both end with the same adapter (the run prints each process's sha256), and it has moved; with
    train.minibatches=2 TRL steps the optimizer twice per step of rollouts."""
    out = tmp_path / "ddp"
    args = [f"model.name_or_path={tiny_dir}", "model.warm_start=", f"out_dir={out}", "model.device=cpu", "train.steps=2",
            "train.save_every=0", "train.personas_per_step=2", "train.group_size=2", "train.micro_batch=1",
            "rollout.max_new_tokens=6", "simulator.max_turns=2", "simulator.appraiser=lexical",
            "simulator.utterance=template", "personas.eval_n=1", "aopsd.placement=system", "train.lr=1e-2",
            "train.minibatches=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "trl_savpo.py"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    sums = re.search(r"sha256 on each of 2 process\(es\): (\w+), (\w+) \(identical\)", run.stdout)
    assert sums and sums.group(1) == sums.group(2), run.stdout[-2000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4] and all(x["savpo/aopsd_kl"] > 0 for x in steps)
    from safetensors.torch import load_file
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(float(w.abs().max()) > 0 for n, w in adapter.items() if "lora_B" in n)   # LoRA B starts at 0


def test_resume_of_a_folder_without_a_run_is_one_sentence_before_the_trainer_is_built(tmp_path, monkeypatch):
    """Issue 32: with no TRL checkpoint, --resume used to build the whole trainer and then say 'start without
    --resume', which the plain start refuses once metrics.jsonl exists. A folder that holds no run is refused at
    once; one with logs but no checkpoint starts again from step 0 (as savpo.py does)."""
    monkeypatch.setattr(trl_savpo, "build_trainer", lambda cfg: pytest.fail("the trainer was built"))
    with pytest.raises(SystemExit, match="nothing to resume in .* start without --resume"):
        trl_savpo.main(["--resume", f"out_dir={tmp_path / 'typo'}"])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st')
    (tmp_path / "config.yaml").write_text("train: {lr: -1}\n")      # its saved config, damaged: one sentence
    with pytest.raises(SystemExit, match=r"config error: config key 'train.lr' \(set in .*config.yaml\) is -1"):
        trl_savpo.main(["--resume", f"out_dir={tmp_path}"])
