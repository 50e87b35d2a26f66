"""SAVPO on TRL's GRPOTrainer: the same simulator and the same objective, on as many processes as you have.

    python trl_savpo.py                                           # one process: CPU, or one GPU
    accelerate launch --num_processes 8 trl_savpo.py train.personas_per_step=16 ...   # DDP over 8 GPUs
    torchrun --nproc_per_node 2 trl_savpo.py model.device=cpu ... # two CPU processes over gloo
    python trl_savpo.py --resume out_dir=runs/trl                 # continue from TRL's last checkpoint

savpo.py is the home: one GPU, one readable loop. This file is the road out. It takes config.yaml as
it is and hands the loop to TRL (pinned to 1.16.0 in requirements.txt: the hooks below are internal),
so `accelerate launch` gives data parallelism over GPUs and nodes (DDP, tested on two CPU processes;
ZeRO-3 and FSDP would need the parameters gathered for the rollouts, docs/scaling.md). Four pieces, each
reusing the project's code:

1. The data: one row per (step, persona) of savpo.py's schedule, in order (`shuffle_dataset=False`).
   The prompt is the persona id; TRL's sampler repeats it G = train.group_size times, so step k's
   generation batch holds step k's personas, as in savpo.py.
2. `make_rollout_func`: TRL calls it with this process's prompts. It plays whole calls with
   `rollout.run` (the KV-cached engine; the simulator is the same base with the adapter disabled)
   and splits each dialogue's token ids, exactly as generated, into a "prompt" (system + first user
   turn + the agent's header) and a "completion" (the rest, up to the last agent token), with
   `env_mask` = the agent mask: 0 on every token the environment wrote (user turns, role headers,
   the closings appended after a turn), so the loss never trains them.
3. `SAVPOTrainer`: after TRL's own scoring it replaces GRPO's (B,) advantages by (B, T) STPR
   advantages (`losses.stpr_advantages` over the whole step, gathered from every process), and its
   `compute_loss` adds aopsd.coef * L_AOPSD from the privileged view (`savpo.aopsd_term`, teacher =
   adapter disabled or live) to TRL's clipped policy-gradient loss.
4. `grpo_config`: config.yaml -> GRPOConfig, chosen so that one step equals savpo.py's step: loss
   and gradient agree to 1e-5 on a fixed batch (tests/test_trl.py). The conventions behind it:
   - loss_type `dapo`: TRL divides the summed token losses by the step's agent-token count
     (`num_items_in_batch`, gathered over processes) -- savpo.py's token mean over the step. The
     AOPSD term is divided the same way: by the step's turn-weight total, over processes and
     accumulation steps, so the gradient does not depend on how the step is split.
   - one generation batch = one step (personas_per_step x G rollouts); `gradient_accumulation_steps`
     = `steps_per_generation` = that batch / (micro_batch x processes), divided by train.minibatches
     for `gradient_accumulation_steps` (TRL then steps the optimizer that many times per pass and takes
     the ratio's old log-probs from a forward before them, as savpo.py does); `num_iterations` = epochs.
   - stpr.coef scales the advantages (min(rA, clip(r)A) is linear in A >= 0), beta = stpr.ref_kl
     (TRL's k3 KL to the adapter-free base, token mean: savpo.py's `ref_kl`) with
     `use_bias_correction_kl=False` (TRL 1.16 multiplies the KL by the ratio by default: the same value,
     another gradient), epsilon / epsilon_high = stpr.eps_low / eps_high, temperature = the rollout's
     (1 when greedy); `scale_rewards` is unused (the advantages are replaced).
   - no mixed precision (the model keeps the dtype lm.py loads); torch's AdamW as savpo.py builds it
     (not HF's fused default); the learning rate follows savpo.py's warmup (`create_scheduler`), per
     step of rollouts, not per optimizer step.

What differs from savpo.py: TRL computes the policy log-probs in its own forward, so with AOPSD on the
student runs a second forward for the full-vocabulary logits the KL needs; micro-batches mix personas
(TRL shuffles the step), so the shared-prefix pass of `lm.selected_logits` rarely applies; the EMA
teacher is not built here; checkpoints are TRL's (OUT/checkpoint-N/), the final adapter goes to
OUT/adapter. On vLLM (docs/scaling.md, "Scaling out on TRL"): the simulator cannot be "the base with the adapter
disabled" inside vLLM, which holds merged policy weights, so it stays in-process here.
"""

import json
import os
import random
import re
import sys
import warnings

import torch

import checkpoint
import config
import eval as evaluation  # eval.py
import kvbatch
import lm
import personas as P
import rollout
import runfiles
import savpo
import simulator as S

TRL_VERSION = "1.16.0"          # the hooks used here are internal to TRL: requirements.txt pins this
RANK_SEED = 1_000_003           # another process plays with seed + rank x this (rank 0: savpo.py's seed)


def grpo_config(cfg, num_processes=None):
    """The GRPOConfig that makes one TRL step equal one savpo.py step (module docstring, point 4).
    A config TRL cannot split evenly is refused in one sentence."""
    import trl
    if trl.__version__ != TRL_VERSION:
        warnings.warn(f"trl {trl.__version__} is installed but trl_savpo.py was tested with {TRL_VERSION}, whose internal "
                      f"hooks it uses; install trl=={TRL_VERSION} or rerun tests/test_trl.py before trusting a run.")
    from trl import GRPOConfig
    num_processes = num_processes or int(os.environ.get("WORLD_SIZE", 1))
    t, st, rl = cfg["train"], cfg["stpr"], cfg["rollout"]
    rollouts = t["personas_per_step"] * t["group_size"]
    per_pass = t["micro_batch"] * num_processes
    if t["group_size"] < 2:
        raise config.ConfigError(f"config key 'train.group_size' is {t['group_size']}; TRL's GRPOTrainer needs >= 2.")
    if rollouts % per_pass:
        raise config.ConfigError(
            f"a step's {rollouts} rollouts (train.personas_per_step x train.group_size) do not split into micro-batches "
            f"of train.micro_batch={t['micro_batch']} on each of {num_processes} process(es); choose them so that "
            f"{rollouts} is a multiple of train.micro_batch x processes.")
    if cfg["aopsd"]["teacher"] == "ema":
        raise config.ConfigError("config key 'aopsd.teacher' is 'ema', which trl_savpo.py does not build; "
                                 "use fixed or live (or savpo.py for the EMA teacher).")
    accumulation = rollouts // per_pass
    if accumulation % t["minibatches"]:
        raise config.ConfigError(
            f"config key 'train.minibatches' is {t['minibatches']}, which does not divide the {accumulation} "
            f"micro-batches of a step (train.personas_per_step x train.group_size / (train.micro_batch x processes)) "
            f"as TRL needs; choose a divisor of {accumulation}.")
    per_step = t["epochs"] * t["minibatches"]           # TRL counts optimizer steps: this many per step of rollouts
    return GRPOConfig(
        output_dir=cfg["out_dir"], seed=cfg["seed"], report_to="none", logging_steps=1,
        use_cpu=lm.pick_device(cfg["model"]["device"]) == "cpu", bf16=False, fp16=False,
        max_steps=t["steps"] * per_step,
        num_generations=t["group_size"], per_device_train_batch_size=t["micro_batch"],
        gradient_accumulation_steps=accumulation // t["minibatches"], steps_per_generation=accumulation,
        num_iterations=t["epochs"],
        shuffle_dataset=False,
        optim="adamw_torch", learning_rate=t["lr"], weight_decay=t["weight_decay"], max_grad_norm=t["grad_clip"],
        gradient_checkpointing=False,                   # lm.add_lora turns it on from train.gradient_checkpointing
        loss_type="dapo", epsilon=st["eps_low"], epsilon_high=st["eps_high"], beta=st["ref_kl"],
        use_bias_correction_kl=False,                   # the KL as savpo.py differentiates it (docs/savpo.md, conventions)
        temperature=lm.logprob_temperature(rl["temperature"]), max_completion_length=rl["max_context"],
        save_strategy="steps" if t["save_every"] else "no", save_steps=max(1, t["save_every"] * per_step),
        save_total_limit=2)


def trl_sample(traj):
    """One dialogue as TRL's prompt / completion: (prompt ids, completion ids, env mask, rollout log-probs).
    The prompt ends just before the first agent token, the completion at the last one (what follows
    it is the turn's closing, which nothing trains); prompt + completion = traj.ids up to there."""
    agent = [j for j, m in enumerate(traj.agent_mask) if m]
    start, end = (agent[0], agent[-1] + 1) if agent else (len(traj.ids) - 1, len(traj.ids))
    return (traj.ids[:start], traj.ids[start:end], traj.agent_mask[start:end], traj.logprobs[start:end])


def trl_batch(trajs, rank, group_size):
    """This process's trajectories in rollout_func's format, plus the trajectories themselves (`trajectory`,
    read by the reward function and by SAVPOTrainer). A group is G consecutive rollouts of the whole step,
    this process's being the rank-th slice of it (TRL's order), so `Trajectory.group` is set from that."""
    for i, t in enumerate(trajs):
        t.group = (rank * len(trajs) + i) // group_size
    prompt_ids, completion_ids, env_mask, logprobs = zip(*map(trl_sample, trajs))
    return {"prompt_ids": list(prompt_ids), "completion_ids": list(completion_ids), "logprobs": list(logprobs),
            "env_mask": list(env_mask), "trajectory": trajs}


def make_rollout_func(cfg, personas_by_id, simulator):
    """TRL's `rollout_func(prompts, trainer)`: this process's prompts (persona ids, each already repeated
    G times) -> whole calls against the simulator (`rollout.run`, ids exactly as generated) -> `trl_batch`."""
    aopsd = cfg["aopsd"]

    def rollout_func(prompts, trainer):
        """Step k's calls for these persona ids, played with the current adapter (savpo.py's seed on rank 0)."""
        unknown = [p for p in prompts if p not in personas_by_id]
        if unknown:
            raise ValueError(f"prompt {unknown[0]!r} is not a persona id of this run's schedule; the dataset's "
                             f"prompts must be persona ids (trl_savpo.persona_dataset).")
        rank = trainer.accelerator.process_index
        step = trainer.state.global_step // (cfg["train"]["epochs"] * cfg["train"]["minibatches"])
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():   # group_size 1 over the repeated list: the same dialogues as G per persona
            trajs = rollout.run(model, trainer.processing_class, simulator, [personas_by_id[p] for p in prompts],
                                cfg["rollout"], group_size=1, seed=cfg["seed"] * 100_003 + step + RANK_SEED * rank,
                                teacher_placement=aopsd["placement"] if aopsd["coef"] > 0 else None,
                                note=aopsd["note"])
        model.train(was_training)
        return trl_batch(trajs, rank, cfg["train"]["group_size"])
    return rollout_func


def decision_reward(completions, trajectory, **kwargs):
    """R_i = 1 iff the callee accepted. TRL logs it; the advantages are STPR's (SAVPOTrainer)."""
    return [t.reward for t in trajectory]


def persona_dataset(cfg):
    """The training rows: savpo.py's persona schedule, step by step, one persona id per row. Returns
    (datasets.Dataset, {persona id: Persona})."""
    from datasets import Dataset
    schedule = evaluation.train_personas(cfg)
    return Dataset.from_dict({"prompt": [p.persona_id for p in schedule]}), {p.persona_id: p for p in schedule}


def _trainer_class():
    """SAVPOTrainer, defined on first use so that importing this file does not import TRL."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class JsonlLog(TrainerCallback):
        """Every logged step as one line of OUT/metrics.jsonl (the main process writes it)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                runfiles.append_jsonl(os.path.join(args.output_dir, "metrics.jsonl"),
                                      {"step": state.global_step, **logs})

    class SAVPOTrainer(GRPOTrainer):
        """GRPOTrainer with SAVPO's objective: per-token STPR advantages and the AOPSD term."""

        def __init__(self, cfg, model, tokenizer, args, train_dataset, rollout_func):
            self.cfg = cfg
            super().__init__(model=model, reward_funcs=[decision_reward], args=args, train_dataset=train_dataset,
                             processing_class=tokenizer, rollout_func=rollout_func, callbacks=[JsonlLog()])

        def create_scheduler(self, num_training_steps, optimizer=None):
            """savpo.py's warmup: step k of rollouts runs at lr x min(1, (k + 1) / warmup_steps), constant after."""
            t = self.cfg["train"]
            warmup, per_step = max(1, t["warmup_steps"]), t["epochs"] * t["minibatches"]
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda s: min(1.0, (s // per_step + 1) / warmup))
            return self.lr_scheduler

        def _generate_and_score_completions(self, inputs):
            """TRL's rollout and scoring, then SAVPO's per-token advantages: STPR over every process's
            trajectories of the step (as savpo.py computes them), this process's share mapped onto the
            completion tokens and scaled by stpr.coef. The trajectories and AOPSD turn weights ride along
            with the batch (TRL shuffles and splits lists with the tensors)."""
            from accelerate.utils import gather_object
            output = super()._generate_and_score_completions(inputs)
            mine = [x["trajectory"] for x in inputs]
            everyone = gather_object(mine)                      # process order: TRL's global order
            _, per_turn = savpo.step_advantages(everyone, self.cfg["stpr"])
            weights, weight_total = savpo.turn_weights(everyone, self.cfg["aopsd"]["turn_weighting"])
            first = self.accelerator.process_index * len(mine)
            advantages = torch.zeros(output["completion_ids"].shape, dtype=torch.float32)          # (B, T)
            for b, traj in enumerate(mine):
                prompt, completion, _, _ = trl_sample(traj)
                for c, j in enumerate(range(len(prompt), len(prompt) + len(completion))):
                    if traj.agent_mask[j]:
                        advantages[b, c] = per_turn[first + b][traj.turn_ids[j]]
            output["advantages"] = (self.cfg["stpr"]["coef"] * advantages).to(output["completion_ids"].device)
            output["trajectory"] = mine
            output["aopsd_weights"] = weights[first:first + len(mine)]
            output["aopsd_weight_total"] = torch.tensor(float(weight_total))                   # 0-dim: not split
            summary = evaluation.summarize(everyone)
            for key in ("success_rate", "willingness_gain", "reveal_rate", "resolve_rate", "misinformation_rate", "turns"):
                self._metrics["train"][f"savpo/{key}"].append(summary[key])
            return output

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """TRL's loss (clipped PG with the STPR advantages, + beta x KL_ref), + aopsd.coef x L_AOPSD of
            this micro-batch's trajectories, divided like TRL's `dapo` term: by the step's total over
            processes (DDP averages them) and accumulation steps."""
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            a = self.cfg["aopsd"]
            if a["coef"] <= 0:
                return loss
            trajs = [t for t in inputs["trajectory"] if sum(t.agent_mask)]
            weights = [w for t, w in zip(inputs["trajectory"], inputs["aopsd_weights"]) if sum(t.agent_mask)]
            if not trajs:
                return loss
            policy = self.accelerator.unwrap_model(model)
            targets = [savpo.agent_targets(t) for t in trajs]
            student = savpo.policy_logits(policy, trajs, targets)                              # (N, V)
            teacher = savpo.teacher_logits(policy, self.processing_class, trajs, targets, a)   # (N, V)
            total = (inputs["aopsd_weight_total"] / self.accelerator.num_processes
                     * self.current_gradient_accumulation_steps / self.args.steps_per_generation)
            kl_loss, kl_mean = savpo.aopsd_term(student, teacher, targets, weights, total, a)
            self._metrics["train"]["savpo/aopsd_kl"].append(float(kl_mean))
            return loss + a["coef"] * kl_loss

    return SAVPOTrainer


def build_trainer(cfg):
    """Everything one TRL run needs, built like savpo.Trainer builds it (same seed, same initial adapter,
    same simulator), then handed to SAVPOTrainer."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # rollout_func is "experimental" in TRL 1.16
    args = grpo_config(cfg)        # first: it starts the process group and picks this process's device
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    tokenizer, base = lm.load_model(cfg["model"])
    lm.check_context(base.config, cfg["rollout"]["max_context"], cfg["model"]["name_or_path"])
    model = lm.add_lora(base, cfg["lora"], gradient_checkpointing=cfg["train"]["gradient_checkpointing"])
    sim_tokenizer, sim_model = tokenizer, model                # same base, adapter disabled
    if S.own_model(cfg["simulator"]["model"]):   # "" or an endpoint URL: none to load
        sim_tokenizer, sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"], "warm_start": ""})
    simulator = S.CognitiveUserSimulator(cfg["simulator"], sim_model, sim_tokenizer, seed=cfg["seed"],
                                         decoder=kvbatch.decoder_for(sim_model, cfg["rollout"]))
    dataset, personas_by_id = persona_dataset(cfg)
    trainer = _trainer_class()(cfg, model, tokenizer, args, dataset, make_rollout_func(cfg, personas_by_id, simulator))
    trainer.simulator = simulator
    return trainer


def adapter_checksums(trainer):
    """sha256 of this process's trained LoRA weights, gathered from every process: data parallelism is
    only right if they are all the same."""
    import hashlib
    from accelerate.utils import gather_object
    model = trainer.accelerator.unwrap_model(trainer.model)
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name and ".default." in name:
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([digest.hexdigest()])


def main(argv=None):
    """The command line: config + overrides -> a TRL run -> the adapter, its checksums, a held-out evaluation."""
    parsed = config.command_line(argv, __doc__)
    if parsed is None:
        return
    cfg, flags = parsed
    if set(flags) - {"resume"}:
        raise SystemExit(f"unknown flag --{sorted(set(flags) - {'resume'})[0]}; trl_savpo.py takes --config PATH, "
                         f"--resume and key=value overrides.")
    resume = bool(flags.get("resume"))
    metrics = os.path.join(cfg["out_dir"], "metrics.jsonl")
    try:
        if resume:
            saved = os.path.join(cfg["out_dir"], "config.yaml")
            if os.path.exists(saved):
                cfg = config.load(saved, [a for a in (sys.argv[1:] if argv is None else argv) if "=" in a
                                          and not a.startswith("--")])
        elif os.path.exists(metrics):
            raise SystemExit(f"{cfg['out_dir']} already holds a run; continue it with --resume or choose another "
                             f"out_dir=...")
        cfg = config.check_warm_start(cfg)
        out = cfg["out_dir"]
        steps_saved = [int(d.split("-")[1]) for d in (os.listdir(out) if os.path.isdir(out) else [])
                       if re.fullmatch(r"checkpoint-\d+", d)]
        if resume and not steps_saved and not os.path.exists(metrics):
            raise SystemExit(f"--resume: nothing to resume in {out} (no checkpoint-N, no metrics.jsonl); start without "
                             f"--resume, or set the out_dir of the run to continue.")
        trainer = build_trainer(cfg)
        main_process = trainer.accelerator.is_main_process
        if resume and main_process:   # the steps logged after the checkpoint (all, without one) are trained again
            if not steps_saved:
                print(f"{out}: no TRL checkpoint (checkpoint-N); the run starts again from step 0.")
            checkpoint.truncate_jsonl(metrics, max(steps_saved, default=0))
    except (config.ConfigError, lm.ModelError, P.DomainError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"config error: {e}" if isinstance(e, config.ConfigError) else str(e))
    if main_process:
        config.save(cfg, cfg["out_dir"])
        print(f"{cfg['algo']} on TRL {TRL_VERSION}: {trainer.accelerator.num_processes} process(es), "
              f"{cfg['train']['steps']} steps x {cfg['train']['personas_per_step']} personas x G "
              f"{cfg['train']['group_size']}; writing to {cfg['out_dir']}")
    has_checkpoint = resume and bool(steps_saved)
    trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    sums = adapter_checksums(trainer)
    if main_process:
        same = "identical" if len(set(sums)) == 1 else "DIFFERENT: the processes fell out of step"
        print(f"LoRA adapter sha256 on each of {len(sums)} process(es): {', '.join(s[:16] for s in sums)} ({same})")
        trainer.save_model(os.path.join(cfg["out_dir"], "adapter"))
        model = trainer.accelerator.unwrap_model(trainer.model)
        sim = trainer.simulator
        result = evaluation.quick(model, trainer.processing_class, cfg, evaluation.eval_personas(cfg), seed=cfg["seed"],
                                  sim_model=sim.model, sim_tokenizer=sim.tokenizer)
        print(f"final evaluation on held-out personas: {json.dumps(result)}")
        print(f"outputs: {cfg['out_dir']}/metrics.jsonl, config.yaml, adapter/, checkpoint-N/")


if __name__ == "__main__":
    main()
