"""SAVPO: train a proactive policy against the Cognitive User Simulator (the project's main job).

    python savpo.py                                  # from the shipped warm start to the verdict table, ~8 min
    python savpo.py algo=grpo train.steps=20         # a baseline, any config override
    python savpo.py --resume out_dir=runs/default    # continue a run exactly where it stopped

SAVPO (Simulator-induced Asymmetric-View Policy Optimization) trains one LoRA policy on its own
rollouts with two objectives, defined with their formulas in losses.py:

- AOPSD (Asymmetric On-Policy Self-Distillation): the same network, reading the *privileged view*
  (the student's tokens with a note of the callee's hidden concerns inserted, `aopsd.placement`:
  after the system block, or before every agent turn) without gradient, is the teacher of the
  student's conversation-only view: a per-token divergence on the agent's tokens, averaged within
  each agent turn, then over turns.
- STPR (State-Transition Policy Refinement): a clipped policy gradient whose per-turn advantage has
  its magnitude from the final decision (group-normalised, as in GRPO) and its direction from the
  willingness shift the turn caused.

Total: L = stpr.coef * L_STPR + aopsd.coef * L_AOPSD (+ stpr.ref_kl * KL to the adapter-free base).
Presets (`algo`): savpo = both; grpo = outcome advantages on every turn, no distillation;
distill = AOPSD only; refine = STPR only. trl_savpo.py runs the same objective on TRL's GRPOTrainer.

What is simplified or chosen here where the paper is silent (its full text is not public): the
binary reward, population std in the group normalisation, the sign rule at dw = 0, the KL on raw
(temperature 1) distributions while the policy-gradient ratio uses the sampling temperature, a
fixed (initial-policy) teacher by default as OPSD found most stable, and one optimisation epoch per
batch of rollouts by default.
"""

import contextlib
import os
import random
import signal
import sys
import threading
import time
import typing
import warnings

import torch

import checkpoint
import config
import eval as evaluation  # eval.py; the module name is the design's, the alias avoids the builtin
import kvbatch
import lm
import losses
import personas as P
import rollout
import runfiles
import simulator as S
import warmstart


# =============================================================================================
# From trajectories to the loss terms (shared with trl_savpo.py)
# =============================================================================================

class AgentTargets(typing.NamedTuple):
    """The tokens of one trajectory the policy sampled, as the update needs them. The logits at position
    j predict token j + 1, so `positions` are the positions *before* each sampled token."""
    positions: list     # j, where the logits predict a sampled token (ids[j + 1])
    ids: list           # the sampled tokens ids[j + 1]
    logprobs: list      # their rollout-time log-probs (kept as a drift metric, `logprob_gap_*`)
    turns: list         # the agent turn each belongs to


def agent_targets(traj):
    """The `AgentTargets` of a trajectory: every token its agent mask marks as sampled."""
    pos = [j for j in range(len(traj.ids) - 1) if traj.agent_mask[j + 1]]
    return AgentTargets(pos, [traj.ids[j + 1] for j in pos], [traj.logprobs[j + 1] for j in pos],
                        [traj.turn_ids[j + 1] for j in pos])


def policy_logits(model, trajs, targets):
    """(N, V) logits at every agent-target position of a few trajectories, through the model's own head."""
    rows = torch.tensor([b for b, tg in enumerate(targets) for _ in tg.positions], dtype=torch.long)
    cols = torch.tensor([j for tg in targets for j in tg.positions], dtype=torch.long)
    # tokens after a trajectory's last agent token (the callee's closing line) predict nothing we train
    return lm.selected_logits(model, [t.ids[:tg.positions[-1] + 1] for t, tg in zip(trajs, targets)], (rows, cols))


def step_advantages(trajs, stpr_cfg):
    """STPR advantages of one step's trajectories: (trajectory advantages (N,), [per-turn (K_i,)]), the
    group being the rollouts of one persona (`Trajectory.group`)."""
    rewards = torch.tensor([t.reward for t in trajs])
    dws = [torch.tensor([s["delta_willingness"] for s in t.states], dtype=torch.float32) for t in trajs]
    groups = torch.tensor([t.group for t in trajs])
    return losses.stpr_advantages(rewards, dws, groups, mode=stpr_cfg["mode"], beta=stpr_cfg["beta"])


def turn_weights(trajs, weighting):
    """AOPSD weight of every agent turn of one step's trajectories, [{turn: w}], and their sum over the
    step: 1 per turn (`uniform`) or the |delta willingness| the turn caused (`willingness`). A step in
    which no turn moved willingness falls back to uniform (all-zero weights would make the term 0/0)."""
    turns = [sorted({k for k, m in zip(t.turn_ids, t.agent_mask) if m}) for t in trajs]
    weights = [{k: 1.0 if weighting == "uniform" else abs(t.states[k]["delta_willingness"]) for k in ks}
               for t, ks in zip(trajs, turns)]
    total = sum(w for ws in weights for w in ws.values())
    if total <= 0:
        weights = [{k: 1.0 for k in ws} for ws in weights]
        total = sum(len(ws) for ws in weights)
    return weights, total


def teacher_context(model, teacher):
    """The teacher's weights (`aopsd.teacher`): `fixed` = the adapter disabled (the initial policy),
    `ema` = the averaged adapter 'ema', `live` = the current adapter."""
    if teacher == "fixed":
        return lm.adapter_off(model)
    if teacher == "ema":
        return _ema_adapter(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _ema_adapter(model):
    """The averaged adapter 'ema' active inside the block, the student's 'default' after it."""
    model.set_adapter("ema")
    try:
        yield
    finally:
        model.set_adapter("default")


@torch.no_grad()
def teacher_logits(model, tokenizer, batch, targets, aopsd_cfg):
    """The privileged view of each trajectory through the teacher, at the positions predicting the same
    agent tokens as the student's (N, V) logits, in eval mode (the student's mode is restored)."""
    rows, b_idx, c_idx = [], [], []
    for b, (tr, tg) in enumerate(zip(batch, targets)):
        teacher_ids, index = rollout.teacher_view(tr, rollout.note_ids(tokenizer, tr.persona, aopsd_cfg["note"]),
                                                  aopsd_cfg["placement"])
        for j in tg.positions:
            b_idx.append(b)
            c_idx.append(index[j + 1] - 1)     # the teacher position predicting token j + 1
        rows.append(teacher_ids[:c_idx[-1] + 1])
    was_training = model.training
    model.eval()  # deterministic teacher
    with teacher_context(model, aopsd_cfg["teacher"]):
        logits = lm.selected_logits(model, rows, (torch.tensor(b_idx), torch.tensor(c_idx)))
    model.train(was_training)
    return logits


def aopsd_term(student_logits, teacher, targets, weights, weight_total, aopsd_cfg, per_turn=False):
    """L_AOPSD of a few trajectories from the (N, V) student and teacher logits at their agent tokens
    (`targets` order), `weights` [{turn: w}] per trajectory, normalised by the whole step's weight
    total: (loss, mean per-token divergence). per_turn=True also returns {(trajectory, turn): the turn's
    mean divergence, as the loss averaged it} (the loss's own per-token values, for samples.jsonl)."""
    a, device = aopsd_cfg, student_logits.device
    pairs = [(b, k) for b, tg in enumerate(targets) for k in tg.turns]          # (trajectory, turn) of each token
    keys = sorted(set(pairs))
    segment = torch.tensor([keys.index(p) for p in pairs], device=device)                          # (N,)
    turn_w = torch.tensor([[weights[b][k] for b, k in keys]], device=device)                       # (1, K)
    ones = torch.ones(1, len(pairs), device=device)
    options = dict(kind=a["divergence"], alpha=a["alpha"], vocab=a["vocab"], topk=a["topk"], support=a["topk_support"],
                   chunk=a["chunk"])
    loss, mean, div = losses.aopsd_loss(student_logits[None], teacher[None], ones, segment[None], turn_weights=turn_w,
                                        weight_total=weight_total, clip=a["clip"], per_token=True, **options)
    if not per_turn:
        return loss, mean
    turn_div, _ = losses._segment_mean(div, segment, len(keys))                                    # (K,)
    return loss, mean, dict(zip(keys, turn_div.tolist()))


# =============================================================================================
# Trainer
# =============================================================================================

class Trainer:
    """Everything one run needs: one base model + LoRA serving all four roles, the simulator, the
    optimizer, persona schedule, logs and checkpoints. `train()` is the loop."""

    def __init__(self, cfg, resume=False, log=print):
        self.cfg, self.log = cfg, log
        self.out = cfg["out_dir"]
        # every bank (its facts checkable, the guide note's questions) read now: a bad one stops the run before
        # the model loads
        P.check_domains(cfg["personas"]["domains"], cfg["aopsd"]["note"] if cfg["aopsd"]["coef"] > 0 else None)
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])
        self.tokenizer, base = lm.load_model(cfg["model"])
        lm.check_context(base.config, cfg["rollout"]["max_context"], cfg["model"]["name_or_path"])
        t = cfg["train"]
        self.model = lm.add_lora(base, cfg["lora"], gradient_checkpointing=t["gradient_checkpointing"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t["lr"], weight_decay=t["weight_decay"])
        warmup = max(1, t["warmup_steps"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        if cfg["aopsd"]["teacher"] == "ema":
            self.model.add_adapter("ema", self.model.peft_config["default"])
            self._copy_adapter("default", "ema", decay=0.0)
            self.model.set_adapter("default")
        self.sim_tokenizer, self.sim_model = self.tokenizer, self.model   # same base, adapter disabled
        if S.own_model(cfg["simulator"]["model"]):   # "" or an endpoint URL: none to load
            self.sim_tokenizer, self.sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"], "warm_start": ""})
        self.simulator = S.CognitiveUserSimulator(cfg["simulator"], self.sim_model, self.sim_tokenizer, seed=cfg["seed"],
                                                  decoder=kvbatch.decoder_for(self.sim_model, cfg["rollout"]))
        self.train_personas = [p for k in range(t["steps"]) for p in self.personas_for(k)]
        pc = cfg["personas"]
        self.eval_personas = P.sample_many(pc["domains"], pc["eval_n"], pc["eval_seed"],
                                           exclude_ids={p.persona_id for p in self.train_personas})
        P.check_disjoint(self.train_personas, self.eval_personas)
        self.step = 0
        self.skipped_steps = 0
        self.turn_divergence = {}   # of the latest update: {trajectory index: {turn: AOPSD divergence}}
        if resume:
            self._load_checkpoint()
        config.save(cfg, self.out)

    # -- adapters ------------------------------------------------------------------------------
    def _copy_adapter(self, src, dst, decay):
        """dst <- decay * dst + (1 - decay) * src, parameter by parameter."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if f".{src}." in name:
                    q = params[name.replace(f".{src}.", f".{dst}.")]
                    q.mul_(decay).add_(p.detach(), alpha=1 - decay)

    # -- one step ------------------------------------------------------------------------------
    def personas_for(self, step):
        """The training personas of step `step` (0-based): a function of the seed and the step only."""
        pc = self.cfg["personas"]
        return P.schedule(pc["domains"], self.cfg["train"]["personas_per_step"], pc["train_seed"], step,
                          pc["curriculum_steps"])

    def collect(self, step):
        """Rollouts for one step (G per persona), with the model in eval mode and no gradient."""
        self.model.eval()
        t0 = time.perf_counter()
        aopsd, sim_before = self.cfg["aopsd"], self.simulator.stats["generated_tokens"]
        trajs = rollout.run(self.model, self.tokenizer, self.simulator, self.personas_for(step),
                            self.cfg["rollout"], group_size=self.cfg["train"]["group_size"],
                            seed=self.cfg["seed"] * 100_003 + step, progress=f"step {step + 1} rollouts",
                            teacher_placement=aopsd["placement"] if aopsd["coef"] > 0 else None, note=aopsd["note"])
        seconds = time.perf_counter() - t0
        # policy tokens + the simulator's own lines
        generated = sum(sum(t.agent_mask) for t in trajs) + self.simulator.stats["generated_tokens"] - sim_before
        return trajs, seconds, generated

    def advantages(self, trajs):
        return step_advantages(trajs, self.cfg["stpr"])

    def update(self, trajs, per_turn_adv, step):
        """`train.epochs` passes of micro-batched updates over this step's rollouts; each pass is split
        into `train.minibatches` minibatches (at most one per micro-batch), each followed by one optimizer
        step (PPO's minibatches: more steps from the same rollouts for one extra forward, below; 1 = one
        step per pass). Every normaliser is the whole step's: the PG term is a token mean over the step's
        agent tokens (each micro-batch's token mean scaled by its token share, TRL's `dapo`), the AOPSD
        term a weighted turn mean over the step's turns; a minibatch's gradient is then multiplied by the
        number of minibatches, so each optimizer step sees the size of gradient one whole pass would
        (TRL's `dapo` normaliser with steps_per_generation > gradient_accumulation_steps). So the gradient
        does not depend on `train.micro_batch`. The "old" log-probs of the ratio are the behaviour
        policy's, detached: the first pass's own where no optimizer step came before (the first ratio is
        exactly 1 in any dtype), and for the later minibatches of the first pass a forward without
        gradient before any step (TRL's `old_per_token_logps`), since the KV-cached rollout's own
        log-probs drift from a training forward in bf16. Fills `self.turn_divergence` {trajectory index:
        {turn: AOPSD divergence}} from the first pass."""
        t, a, st = self.cfg["train"], self.cfg["aopsd"], self.cfg["stpr"]
        self.turn_divergence = {}
        trainable = [i for i, tr in enumerate(trajs) if sum(tr.agent_mask) > 0]
        targets = {i: agent_targets(trajs[i]) for i in trainable}
        weights, weight_total = turn_weights(trajs, a["turn_weighting"])
        norm = {"tokens": sum(len(targets[i].positions) for i in trainable), "weight_total": weight_total}
        # a trajectory with no PG signal needs no forward at all when nothing else uses it (grpo/refine)
        pg_signal = lambda i: st["coef"] > 0 and bool((per_turn_adv[i] != 0).any())
        work = [i for i in trainable if a["coef"] > 0 or st["ref_kl"] > 0 or pg_signal(i)]
        keys = ("loss", "pg_loss", "aopsd_kl", "clip_frac", "outside_frac", "ref_kl", "grad_norm", "teacher_s")
        stats = {k: 0.0 for k in keys}
        stats.update(nonfinite=0, logprob_gap_mean=0.0, logprob_gap_max=0.0)
        old, done_passes = {}, 0
        order_rng = random.Random(f"{self.cfg['seed']}:{step}")
        # micro-batches never mix personas: the rollouts of one persona share its system prompt, which
        # `lm.selected_logits` then runs once for all of them
        chunks = []
        for g in sorted({trajs[i].group for i in work}):
            members = [i for i in work if trajs[i].group == g]
            chunks += [members[k:k + t["micro_batch"]] for k in range(0, len(members), t["micro_batch"])]
        n_mb = max(1, min(t["minibatches"], len(chunks)))
        from tqdm import tqdm
        bar = tqdm(total=t["epochs"] * len(chunks), desc=f"step {step + 1} update", unit="micro-batch", leave=False)
        for epoch in range(t["epochs"]):
            order_rng.shuffle(chunks)
            minibatches = [chunks[k * len(chunks) // n_mb:(k + 1) * len(chunks) // n_mb] for k in range(n_mb)]
            if epoch == 0 and n_mb > 1:
                self._behaviour_logprobs([c for mb in minibatches[1:] for c in mb], trajs, targets, old)
            pass_stats, skipped = {k: 0.0 for k in keys}, 0
            for minibatch in minibatches:
                finite = True
                self.optimizer.zero_grad(set_to_none=True)
                self.model.train()
                for chunk in minibatch:
                    loss = self._micro_batch_loss(chunk, trajs, targets, per_turn_adv, weights, norm, old, pass_stats,
                                                  first_pass=epoch == 0)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    if loss.requires_grad:
                        (loss * n_mb).backward()
                    pass_stats["loss"] += float(loss.detach())
                    bar.update(1)
                self.model.eval()
                if not finite:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    warnings.warn(f"step {step + 1}: non-finite loss; an update skipped, nothing written from it.")
                    continue
                pass_stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(self.params, t["grad_clip"])) / n_mb
                self.optimizer.step()
                if a["teacher"] == "ema":
                    self._copy_adapter("default", "ema", decay=a["ema_decay"])
            if epoch == 0:
                gaps = torch.cat([(old[i] - torch.tensor(targets[i].logprobs)).abs() for i in old]) if old else torch.zeros(1)
                stats["logprob_gap_mean"], stats["logprob_gap_max"] = float(gaps.mean()), float(gaps.max())
            stats["nonfinite"] += skipped
            if skipped:      # a pass with a skipped update is not averaged into the logged metrics
                continue
            done_passes += 1
            for k in keys:
                stats[k] += pass_stats[k]
        bar.close()
        for k in keys:   # logged as the mean over the passes that updated, not their sum
            stats[k] /= max(1, done_passes)
        self.scheduler.step()
        return stats

    def _agent_logprobs(self, batch, tgs):
        """(N, V) policy logits at the agent tokens of these trajectories, and the (N,) log-probs of the
        sampled tokens, at the rollout's temperature."""
        logits = policy_logits(self.model, batch, tgs)
        ids = torch.tensor([x for tg in tgs for x in tg.ids], device=logits.device)
        return logits, lm.token_logprobs(logits, ids, self.cfg["rollout"]["temperature"])

    def _behaviour_logprobs(self, chunks, trajs, targets, old):
        """The current (behaviour) policy's log-probs of these micro-batches' agent tokens, without gradient,
        into `old`: the ratio's reference for minibatches that run after an optimizer step. One forward per
        persona group rather than per micro-batch: without gradient a group's rollouts fit in one batch,
        and their shared system prompt then runs once (all 32 calls of a default step: 7.2 -> 5.3 s)."""
        groups = {}
        for i in (i for chunk in chunks for i in chunk):
            groups.setdefault(trajs[i].group, []).append(i)
        with torch.no_grad():
            for members in groups.values():
                tgs = [targets[i] for i in members]
                _, logp = self._agent_logprobs([trajs[i] for i in members], tgs)
                old.update(zip(members, logp.cpu().split([len(tg.positions) for tg in tgs])))

    def _micro_batch_loss(self, chunk, trajs, targets, per_turn_adv, weights, norm, old, stats, first_pass):
        """The SAVPO loss of the trajectories `chunk`, on their agent tokens only (flattened to N),
        already scaled by their share of the step (see `update`)."""
        a, st = self.cfg["aopsd"], self.cfg["stpr"]
        batch, tgs = [trajs[i] for i in chunk], [targets[i] for i in chunk]
        pairs = [(b, k) for b, tg in enumerate(tgs) for k in tg.turns]          # (trajectory, turn) of each token
        logits, logp = self._agent_logprobs(batch, tgs)                          # (N, V), (N,)
        device = logits.device
        sizes = [len(tg.positions) for tg in tgs]
        if chunk[0] not in old:   # no optimizer step yet: the behaviour policy's log-probs are these, detached
            old.update(zip(chunk, logp.detach().cpu().split(sizes)))
        old_logp = torch.cat([old[i] for i in chunk]).to(device)
        ones = torch.ones(1, len(pairs), device=device)
        token_share = len(pairs) / norm["tokens"]
        loss = logits.new_zeros((), dtype=torch.float32)
        if st["coef"] > 0:
            adv = torch.tensor([float(per_turn_adv[chunk[b]][k]) for b, k in pairs], device=device)   # (N,)
            pg, clip_frac, outside = losses.clipped_pg_loss(logp[None], old_logp[None], adv[None], ones,
                                                            eps_low=st["eps_low"], eps_high=st["eps_high"])
            loss = loss + st["coef"] * pg * token_share
            stats["pg_loss"] += float(pg.detach()) * token_share
            stats["clip_frac"] += float(clip_frac) * token_share
            stats["outside_frac"] += float(outside) * token_share
        if a["coef"] > 0:
            t0 = time.perf_counter()
            teacher = teacher_logits(self.model, self.tokenizer, batch, tgs, a)                 # (N, V)
            stats["teacher_s"] += time.perf_counter() - t0
            kl_loss, kl_mean, *turn_div = aopsd_term(logits, teacher, tgs, [weights[i] for i in chunk],
                                                     norm["weight_total"], a, per_turn=first_pass)
            loss = loss + a["coef"] * kl_loss
            stats["aopsd_kl"] += float(kl_mean) * token_share
            for (b, k), value in (turn_div[0].items() if turn_div else ()):   # first pass: for samples.jsonl
                self.turn_divergence.setdefault(chunk[b], {})[k] = value
        if st["ref_kl"] > 0:
            with torch.no_grad(), lm.adapter_off(self.model):
                _, ref_logp = self._agent_logprobs(batch, tgs)
            kl_ref = losses.ref_kl(logp[None], ref_logp[None], ones)
            loss = loss + st["ref_kl"] * kl_ref * token_share
            stats["ref_kl"] += float(kl_ref.detach()) * token_share
        return loss

    # -- evaluation, logging, checkpoints ------------------------------------------------------
    def evaluate(self):
        return evaluation.quick(self.model, self.tokenizer, self.cfg, self.eval_personas, seed=self.cfg["seed"],
                                sim_model=self.sim_model, sim_tokenizer=self.sim_tokenizer)

    def final_comparison(self):
        """The run's verdict: the trained policy against the policy it started from (`lm.start_policy`: the
        same weights with a zero adapter, so exactly the initial policy), on the held-out personas, each
        played `personas.eval_samples` times with the same sampling seeds by both, so the calls pair up.
        Per-persona rates, 95% bootstrap intervals over personas and the paired differences (eval.py) go
        to OUT/final/ (metrics.json, report.md, samples_base.jsonl, samples_trained.jsonl: `python view.py
        OUT/final` shows the pairs side by side). Returns {policy: results}."""
        n, out = self.cfg["personas"]["eval_samples"], os.path.join(self.out, "final")
        tables, results = {}, {}
        for name in ("base", "trained"):
            with lm.start_policy(self.model) if name == "base" else contextlib.nullcontext():
                tables[name], results[name] = evaluation.scored_play(
                    self.model, self.tokenizer, self.cfg, self.eval_personas, n, self.cfg["seed"],
                    os.path.join(out, f"samples_{name}.jsonl"), sim_model=self.sim_model,
                    sim_tokenizer=self.sim_tokenizer, progress=f"held-out {name}")
        results["trained"]["difference_vs_base"] = evaluation.paired_difference(tables["base"], tables["trained"])
        evaluation.write_report(results, out, f"{self.cfg['algo']} after {self.step} steps against the policy it "
                                f"started from: {len(self.eval_personas)} held-out personas x {n} calls", plots=False)
        return results

    def checkpoint_dir(self):
        return os.path.join(self.out, "checkpoints")

    def save_checkpoint(self):
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return checkpoint.write(self.checkpoint_dir(), self.step, self.model, {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "skipped_steps": self.skipped_steps, "rng": rng})

    def _load_checkpoint(self):
        """Continue from the newest complete checkpoint (checkpoint.resume: a damaged one is reported and
        skipped; none at all is step 0); the logs are cut back to its step."""
        path, state = checkpoint.resume(self.out, self.model, ("metrics.jsonl", "samples.jsonl"), self.log)
        if state is None:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.log(f"resumed from {path} at step {self.step}")

    def train(self):
        """The loop: rollouts -> advantages -> update -> log (-> evaluate) (-> checkpoint), per step.
        Ctrl-C is deferred to the end of the running step, which is then checkpointed; a second Ctrl-C
        leaves at once and the last checkpoint stands (never a half-applied step)."""
        t = self.cfg["train"]
        os.makedirs(self.out, exist_ok=True)
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        samples_path = os.path.join(self.out, "samples.jsonl")
        from tqdm import tqdm
        bar = tqdm(total=t["steps"], initial=self.step, desc=f"{self.cfg['algo']}", unit="step")
        interrupt = _DeferredInterrupt(self.log)
        try:
            with interrupt:
                while self.step < t["steps"] and not interrupt.requested:
                    self._one_step(metrics_path, samples_path, bar)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"out of memory at step {self.step + 1}: lower train.micro_batch "
                             f"(now {t['micro_batch']}), train.group_size / train.personas_per_step, "
                             f"rollout.max_new_tokens, or set train.gradient_checkpointing=true / "
                             f"model.quantization=4bit.") from None
        bar.close()
        if interrupt.requested:
            path = self.save_checkpoint()
            self.log(f"interrupted: checkpoint of step {self.step} saved to {path}; continue with --resume")
            raise SystemExit(130)
        if not t["save_every"] or self.step % t["save_every"]:
            self.save_checkpoint()
        evaluation.plot_curves(self.out)
        return self.final_comparison()

    def _one_step(self, metrics_path, samples_path, bar):
        """One SAVPO step: rollouts -> advantages -> update, then the logs (and a periodic evaluation) and a
        checkpoint. The algorithm is the first three lines; the rest is bookkeeping."""
        step, t0 = self.step, time.perf_counter()
        trajs, roll_s, generated = self.collect(step)            # G calls per persona, no gradient
        _, per_turn = self.advantages(trajs)                      # STPR: outcome magnitude, willingness direction
        t1 = time.perf_counter()
        stats = self.update(trajs, per_turn, step)                # L = STPR + lambda AOPSD (+ ref KL), micro-batched
        self.skipped_steps += stats["nonfinite"] > 0
        self.step = step + 1
        timing = {"t0": t0, "rollout_s": roll_s, "generated": generated, "update_s": time.perf_counter() - t1}
        self._log_step(trajs, per_turn, stats, timing, metrics_path, samples_path, bar)
        t = self.cfg["train"]
        if t["save_every"] and self.step % t["save_every"] == 0:
            self.save_checkpoint()

    def _log_step(self, trajs, per_turn, stats, timing, metrics_path, samples_path, bar):
        """One line of metrics.jsonl (the rollouts' outcomes, the update's statistics, timings; a held-out
        evaluation every `train.eval_every` steps), the step's dialogues to samples.jsonl with what the update
        used per agent turn, and one line on the terminal."""
        t = self.cfg["train"]
        groups = {}
        for tr in trajs:
            groups.setdefault(tr.group, set()).add(tr.reward)
        record = {"step": self.step, **evaluation.summarize(trajs),
                  "groups_with_signal": round(sum(len(r) > 1 for r in groups.values()) / max(1, len(groups)), 4),
                  **{k: round(v, 5) for k, v in stats.items()}, "lr": self.scheduler.get_last_lr()[0],
                  "rollout_tok_s": round(timing["generated"] / timing["rollout_s"], 1),
                  "rollout_s": round(timing["rollout_s"], 1), "teacher_s": round(stats["teacher_s"], 1),
                  "update_s": round(timing["update_s"], 1)}
        if t["eval_every"] and self.step % t["eval_every"] == 0 and self.step < t["steps"]:
            t2 = time.perf_counter()
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            record["eval_s"] = round(time.perf_counter() - t2, 1)
        record.update(step_s=round(time.perf_counter() - timing["t0"], 1), peak_mem_gb=peak_memory_gb())
        _append_jsonl(metrics_path, record)
        if t["samples_every"] and self.step % t["samples_every"] == 0:
            for i in range(0, len(trajs), t["group_size"]):
                # + what the update used per agent turn: its STPR advantage and its AOPSD divergence (None
                # where the term is off or the trajectory had no forward pass)
                div = self.turn_divergence.get(i, {})
                adv = [round(float(x), 5) for x in per_turn[i]] if self.cfg["stpr"]["coef"] > 0 else None
                _append_jsonl(samples_path, {"step": self.step, **trajs[i].to_dict(), "turn_advantages": adv,
                                             "turn_divergence": [round(div[k], 6) if k in div else None
                                                                 for k in range(trajs[i].n_turns)]})
        bar.update(1)
        bar.write(f"step {self.step:3d} | loss {record['loss']:+.4f} pg {record['pg_loss']:+.4f} "
                  f"kl {record['aopsd_kl']:.4f} | success {record['success_rate']:.2f} groups w/ signal "
                  f"{record['groups_with_signal']:.2f} dw {record['willingness_gain']:+.2f} revealed "
                  f"{record['reveal_rate']:.2f} resolved {record['resolve_rate']:.2f} misinfo "
                  f"{record['misinformation_rate']:.2f} | {record['rollout_tok_s']:.0f} tok/s {record['step_s']:.0f}s")


class _DeferredInterrupt:
    """Within the block, the first SIGINT only sets `requested` (the loop finishes its step and
    checkpoints); a second one raises KeyboardInterrupt. Outside the main thread it does nothing."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, False, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to leave at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


COMPARED = (("success", "success"), ("resolve", "concerns resolved"), ("reveal", "concerns revealed"),
            ("misinformation", "misinformation (false-claim turns)"))


def comparison_table(results, n_personas, n):
    """The final comparison as a small markdown table: each policy's mean and 95% interval, and the paired
    difference, trained - base, with its verdict (an interval holding 0 is no measurable difference)."""
    lines = [f"held-out: {n_personas} personas x {n} calls, the same personas and sampling seeds for both policies; "
             f"means with 95% bootstrap intervals over personas",
             "", "| metric | base (start) | trained | trained - base |", "|---|---|---|---|"]
    diff = results["trained"]["difference_vs_base"]
    for key, label in COMPARED:
        d = diff[key]
        verdict = "no measurable difference" if d[1] <= 0 <= d[2] else ("up" if d[1] > 0 else "down")
        lines.append(f"| {label} | {evaluation.fmt(results['base']['intervals'][key])} | "
                     f"{evaluation.fmt(results['trained']['intervals'][key])} | {evaluation.fmt(d)} {verdict} |")
    return "\n".join(lines)


def peak_memory_gb():
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def _append_jsonl(path, record):
    runfiles.append_jsonl(path, record)


def main(argv=None):
    parsed = config.command_line(argv, __doc__)
    if parsed is None:
        return
    cfg, flags = parsed
    unknown = set(flags) - {"resume"}
    if unknown:
        moved = " (the comparison of every preset is `python compare.py`)" if "compare" in unknown else ""
        raise SystemExit(f"unknown flag --{sorted(unknown)[0]}{moved}; savpo.py takes --config PATH, --resume and "
                         f"key=value overrides.")
    errors = (config.ConfigError, lm.ModelError, P.DomainError, checkpoint.CheckpointError)
    try:
        if flags.get("resume"):
            saved = os.path.join(cfg["out_dir"], "config.yaml")
            if os.path.exists(saved):
                cfg = config.load(saved, [a for a in (argv if argv is not None else sys.argv[1:]) if "=" in a
                                          and not a.startswith("--")])
        elif os.path.exists(os.path.join(cfg["out_dir"], "metrics.jsonl")):
            raise SystemExit(f"{cfg['out_dir']} already holds a run; continue it with --resume or choose "
                             f"another out_dir=...")
        cfg = warmstart.resolve(cfg)
        trainer = Trainer(cfg, resume=bool(flags.get("resume")))
        print(f"{cfg['algo']}: {len(trainer.train_personas)} training personas, {len(trainer.eval_personas)} held "
              f"out; {sum(p.numel() for p in trainer.params):,} trainable LoRA parameters; writing to {cfg['out_dir']}")
        result = trainer.train()
    except errors as e:     # a user's mistake, also one found mid-run: one sentence; the checkpoints stand
        raise SystemExit(f"config error: {e}" if isinstance(e, config.ConfigError) else str(e))
    print(comparison_table(result, len(trainer.eval_personas), cfg["personas"]["eval_samples"]))
    print(f"outputs: {cfg['out_dir']}/metrics.jsonl, samples.jsonl, curves.png, config.yaml, checkpoints/, final/")
    print(f"see the calls side by side: python view.py {cfg['out_dir']}/final")


if __name__ == "__main__":
    main()
