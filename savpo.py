"""SAVPO: train a proactive policy against the Cognitive User Simulator (the project's main job).

    python savpo.py                                  # default config: CPU, embedded 135M model, ~10 min
    python savpo.py algo=grpo train.steps=20         # a baseline, any config override
    python savpo.py --resume out_dir=runs/default    # continue a run exactly where it stopped

SAVPO (Simulator-induced Asymmetric-View Policy Optimization) trains one LoRA policy on its own
rollouts with two objectives:

- AOPSD (Asymmetric On-Policy Self-Distillation). The *privileged view* of a dialogue is the
  student's token sequence with a note of the callee's hidden concerns inserted (`aopsd.placement`:
  after the system block, or before every agent turn). The same network reads it without gradient
  and is the teacher; the student reads the conversation-only view. Per agent token t:
      KL_t = sum_v p_T(v | privileged prefix) [log p_T(v | ...) - log p_S(v | student prefix)]
  averaged within each agent turn, then over turns (uniform, or weighted by |delta willingness|):
      L_AOPSD = sum_(i,k) w_ik mean_(t in turn k of i) KL_t / sum_(i,k) w_ik
- STPR (State-Transition Policy Refinement). The trajectory advantage is group-normalised from the
  final decision, A_i = (R_i - mean_G R) / (std_G R + eps) with R_i = 1 iff the callee accepted; the
  *direction* of each turn's advantage comes from the willingness shift dw_ik that turn caused:
      A_ik = |A_i| sign(dw_ik)        (sign(A_i) where dw_ik = 0)
  and a clipped policy gradient with asymmetric clip (eps_low, eps_high) uses A_ik on every token
  of turn k:  L_STPR = -mean_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),  r_t = p/p_old.

Total: L = stpr.coef * L_STPR + aopsd.coef * L_AOPSD (+ stpr.ref_kl * KL to the adapter-free base).
Presets (`algo`): savpo = both; grpo = outcome advantages on every turn, no distillation;
distill = AOPSD only; refine = STPR only.

What is simplified or chosen here where the paper is silent (its full text is not public): the
binary reward, population std in the group normalisation, the sign rule at dw = 0, the KL on raw
(temperature 1) distributions while the policy-gradient ratio uses the sampling temperature, a
fixed (initial-policy) teacher by default as OPSD found most stable, and one optimisation epoch per
batch of rollouts by default.
"""

import contextlib
import json
import os
import random
import shutil
import sys
import time
import warnings

import torch

import config
import eval as evaluation  # eval.py; the module name is the design's, the alias avoids the builtin
import lm
import personas as P
import rollout
import simulator as S


# =============================================================================================
# Losses: pure functions of tensors
# =============================================================================================

def _segment_mean(values, segments, n_segments):
    """Mean of `values` (N,) within each segment id (N,) -> (n_segments,), 0 for empty segments."""
    sums = torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add(0, segments, values)
    counts = torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add(
        0, segments, torch.ones_like(values))
    return sums / counts.clamp(min=1), counts


def _kl_full(teacher_logits, student_logits):
    """Exact forward KL(teacher || student) per row over the whole vocabulary. (n, V) -> (n,)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def _kl_topk(teacher_logits, student_logits, k):
    """KL over the teacher's top-k tokens plus one tail bucket holding the rest of the mass. (n,)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    t_top, idx = t.topk(k, -1)                                              # (n, k)
    s_top = s.gather(-1, idx)
    t_tail = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - 1e-6))          # log(1 - sum p_T)
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    return (t_top.exp() * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)


def token_kl(student_logits, teacher_logits, vocab="full", topk=64, chunk=256):
    """Per-token KL(teacher || student) for (N, V) logits, `chunk` rows at a time. Each chunk is
    recomputed in the backward pass (checkpointing), so the softmax temporaries never exceed
    chunk x V whatever N and V are. Returns (N,)."""
    from torch.utils.checkpoint import checkpoint
    fn = _kl_full if vocab == "full" else (lambda t, s: _kl_topk(t, s, topk))
    pieces = []
    for i in range(0, student_logits.shape[0], chunk):
        s, t = student_logits[i:i + chunk], teacher_logits[i:i + chunk]
        pieces.append(checkpoint(fn, t, s, use_reentrant=False) if s.requires_grad else fn(t, s))
    return torch.cat(pieces) if pieces else student_logits.new_zeros(0)


def aopsd_loss(student_logits, teacher_logits, mask, turn_ids, turn_weights=None, vocab="full", topk=64,
               chunk=256, clip=0.0):
    """Asymmetric on-policy self-distillation loss.

    student_logits (B, T, V)  the student's logits; position t predicts token t+1 of its sequence
    teacher_logits (B, T, V)  the teacher's logits gathered at the *same* predicted tokens (aligned)
    mask           (B, T)     1 where the predicted token is an agent token
    turn_ids       (B, T)     agent turn of the predicted token (any value where mask = 0)
    turn_weights   (B, K)     weight of each (trajectory, turn); None = uniform
    Returns (loss, mean per-token KL): per-token KL, optionally clipped at `clip`, averaged within
    each turn, then a weighted mean over the turns present.

    Example: one trajectory, two turns with 2 and 1 agent tokens whose KLs are [0.2, 0.4] and [0.9]:
    turn means [0.3, 0.9]; uniform weights give loss 0.6 (a token mean would give 0.5).
    """
    m = mask.bool()
    kl = token_kl(student_logits[m], teacher_logits[m].detach(), vocab, topk, chunk)     # (N,)
    if clip > 0:
        kl = kl.clamp(max=clip)
    n_turns = int(turn_ids[m].max()) + 1 if m.any() else 1
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[m]
    segments = rows * n_turns + turn_ids[m].long()                                       # (N,)
    turn_kl, counts = _segment_mean(kl, segments, mask.shape[0] * n_turns)              # (B*K,)
    present = (counts > 0).to(kl.dtype)
    if turn_weights is None:
        weights = present
    else:
        weights = turn_weights[:, :n_turns].reshape(-1).to(kl.dtype) * present
        if weights.sum() <= 0:
            weights = present
    loss = (turn_kl * weights).sum() / weights.sum().clamp(min=1e-8)
    return loss, kl.detach().mean() if kl.numel() else kl.new_zeros(())


def stpr_advantages(final_rewards, delta_w, groups, mode="direction", beta=0.5, eps=1e-6):
    """Per-turn advantages from the final decision (magnitude) and willingness shifts (direction).

    final_rewards (N,)        R_i, 1 iff the callee accepted
    delta_w       [ (K_i,) ]  willingness change caused by each agent turn of trajectory i
    groups        (N,)        group id (rollouts of the same persona)
    mode: 'direction' A_ik = |A_i| sign(dw_ik), sign(A_i) where dw_ik = 0   (SAVPO's STPR)
          'additive'  A_ik = A_i + beta * dw_ik / (std of all dw + eps)
          'outcome'   A_ik = A_i                                           (plain GRPO)
    with A_i = (R_i - mean_G R) / (std_G R + eps), population std within the group.
    Returns (trajectory advantages (N,), [ (K_i,) per-turn advantages ]).

    Worked example, one group of 3 rollouts, R = [1, 0, 0]: mean 1/3, std 0.471, so
    A = [1.414, -0.707, -0.707]. If rollout 2 moved willingness by dw = [+0.5, 0, -0.5], its turn
    advantages are [+0.707, -0.707, -0.707]: the turn that raised willingness is reinforced even in a
    failed call, the others are pushed down. In 'outcome' mode all three would be -0.707.
    """
    final_rewards = final_rewards.float()
    adv = torch.zeros_like(final_rewards)
    for g in groups.unique():
        sel = groups == g
        r = final_rewards[sel]
        adv[sel] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    all_dw = torch.cat([d.float() for d in delta_w]) if delta_w else torch.zeros(0)
    dw_scale = all_dw.std(unbiased=False) + eps if all_dw.numel() > 1 else 1.0
    per_turn = []
    for a, dw in zip(adv, delta_w):
        dw = dw.float()
        if mode == "direction":
            direction = torch.where(dw != 0, torch.sign(dw), torch.sign(a).expand_as(dw))
            per_turn.append(a.abs() * direction)
        elif mode == "additive":
            per_turn.append(a + beta * dw / dw_scale)
        elif mode == "outcome":
            per_turn.append(a.expand_as(dw).clone())
        else:
            raise ValueError(f"unknown stpr.mode {mode!r}; allowed: direction, additive, outcome")
    return adv, per_turn


def clipped_pg_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28):
    """Token-mean clipped policy-gradient (PPO/GRPO) objective.

    logp, old_logp, adv, mask: (B, T). Returns (loss, fraction of agent tokens clipped).
    loss = -sum_t mask_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) / sum_t mask_t
    """
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    n = mask.sum().clamp(min=1)
    loss = -(objective * mask).sum() / n
    clip_frac = (((ratio - clipped_ratio).abs() > 1e-6).float() * mask).sum() / n
    return loss, clip_frac.detach()


def ref_kl(logp, ref_logp, mask):
    """k3 estimate of KL(policy || reference) per token, token-mean: exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return ((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1)


# =============================================================================================
# Batching trajectories for the update
# =============================================================================================

def agent_targets(traj):
    """Positions j whose *next* token j+1 the policy sampled: (positions, target ids, old log-probs,
    turn of each target). The logits at position j predict token j+1."""
    pos = [j for j in range(len(traj.ids) - 1) if traj.agent_mask[j + 1]]
    return (pos, [traj.ids[j + 1] for j in pos], [traj.logprobs[j + 1] for j in pos],
            [traj.turn_ids[j + 1] for j in pos])


def _hidden(model, rows, pad_id):
    """Last hidden states (B, T, H) of right-padded rows through the (LoRA-wrapped) decoder."""
    device = next(model.parameters()).device
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device=device)
        mask[i, :len(r)] = 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model(input_ids=ids, attention_mask=mask).last_hidden_state


def _logits_at(model, hidden, rows_cols):
    """lm_head on the selected (row, col) positions only: (N, V), never (B, T, V)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    b, c = rows_cols
    return base.lm_head(hidden[b, c])


# =============================================================================================
# Trainer
# =============================================================================================

class Trainer:
    """Everything one run needs: one base model + LoRA serving all four roles, the simulator, the
    optimizer, persona splits, logs and checkpoints. `train()` is the loop."""

    def __init__(self, cfg, resume=False, log=print):
        self.cfg, self.log = cfg, log
        self.out = cfg["out_dir"]
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])
        self.tokenizer, base = lm.load_model(cfg["model"])
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
        sim_tokenizer, sim_model = self.tokenizer, self.model   # same base, adapter disabled
        if cfg["simulator"]["model"]:
            sim_tokenizer, sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"]})
        self.simulator = S.CognitiveUserSimulator(cfg["simulator"], sim_model, sim_tokenizer, seed=cfg["seed"])
        pc = cfg["personas"]
        n_train = t["steps"] * t["personas_per_step"]
        self.train_personas = P.sample_many(pc["domains"], n_train, pc["train_seed"])
        self.eval_personas = P.sample_many(pc["domains"], pc["eval_n"], pc["eval_seed"],
                                           exclude_ids={p.persona_id for p in self.train_personas})
        P.check_disjoint(self.train_personas, self.eval_personas)
        self.step = 0
        self.skipped_steps = 0
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

    def _teacher_ctx(self):
        mode = self.cfg["aopsd"]["teacher"]
        if mode == "fixed":
            return lm.adapter_off(self.model)
        if mode == "ema":
            return _ActiveAdapter(self.model, "ema")
        return contextlib.nullcontext()  # live: the current adapter

    # -- one step ------------------------------------------------------------------------------
    def personas_for(self, step):
        k = self.cfg["train"]["personas_per_step"]
        return self.train_personas[step * k:(step + 1) * k]

    def collect(self, step):
        """Rollouts for one step (G per persona), with the model in eval mode and no gradient."""
        self.model.eval()
        t0 = time.perf_counter()
        trajs = rollout.run(self.model, self.tokenizer, self.simulator, self.personas_for(step),
                            self.cfg["rollout"], group_size=self.cfg["train"]["group_size"],
                            seed=self.cfg["seed"] * 100_003 + step)
        seconds = time.perf_counter() - t0
        generated = sum(sum(t.agent_mask) for t in trajs) + getattr(getattr(self.simulator, "view", None),
                                                                     "generated_tokens", 0)
        return trajs, seconds, generated

    def advantages(self, trajs):
        rewards = torch.tensor([t.reward for t in trajs])
        dws = [torch.tensor([s["delta_willingness"] for s in t.states], dtype=torch.float32) for t in trajs]
        groups = torch.tensor([t.group for t in trajs])
        st = self.cfg["stpr"]
        return stpr_advantages(rewards, dws, groups, st["mode"], st["beta"])

    def update(self, trajs, per_turn_adv, step):
        """`train.epochs` passes of micro-batched updates over this step's rollouts. Each micro-batch's
        loss is scaled by its share of the step's agent tokens (PG) or agent turns (AOPSD), so the
        accumulated gradient is that of the token-mean / turn-mean over the whole step."""
        t = self.cfg["train"]
        trainable = [i for i, tr in enumerate(trajs) if sum(tr.agent_mask) > 0]
        totals = {"tokens": sum(sum(trajs[i].agent_mask) for i in trainable),
                  "turns": sum(trajs[i].n_turns for i in trainable)}
        order_rng = random.Random(f"{self.cfg['seed']}:{step}")
        stats = {"loss": 0.0, "pg_loss": 0.0, "aopsd_kl": 0.0, "clip_frac": 0.0, "ref_kl": 0.0,
                 "grad_norm": 0.0, "nonfinite": 0}
        for epoch in range(t["epochs"]):
            order = trainable[:]
            order_rng.shuffle(order)
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            self.model.train()
            for start in range(0, len(order), t["micro_batch"]):
                chunk = order[start:start + t["micro_batch"]]
                loss = self._micro_batch_loss([trajs[i] for i in chunk], [per_turn_adv[i] for i in chunk],
                                              totals, stats)
                if not torch.isfinite(loss):
                    finite = False
                    break
                if loss.requires_grad:
                    loss.backward()
                stats["loss"] += float(loss.detach())
            self.model.eval()
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                stats["nonfinite"] += 1
                warnings.warn(f"step {step}: non-finite loss; update skipped, nothing written from it.")
                continue
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, t["grad_clip"]))
            self.optimizer.step()
            if self.cfg["aopsd"]["teacher"] == "ema":
                self._copy_adapter("default", "ema", decay=self.cfg["aopsd"]["ema_decay"])
        self.scheduler.step()
        return stats

    def _micro_batch_loss(self, batch, advs, totals, stats):
        """The SAVPO loss of a few trajectories, on their agent tokens only (flattened to N)."""
        a, st = self.cfg["aopsd"], self.cfg["stpr"]
        temperature = self.cfg["rollout"]["temperature"] or 1.0   # greedy rollouts were scored at T = 1
        targets = [agent_targets(tr) for tr in batch]
        rows = torch.tensor([b for b, tg in enumerate(targets) for _ in tg[0]])
        cols = torch.tensor([j for tg in targets for j in tg[0]])
        # each (trajectory, turn) pair is one AOPSD segment
        pairs = [(b, k) for b, tg in enumerate(targets) for k in tg[3]]
        keys = sorted(set(pairs))
        hidden = _hidden(self.model, [tr.ids for tr in batch], self.tokenizer.pad_token_id)
        logits = _logits_at(self.model, hidden, (rows, cols))                                   # (N, V)
        device = logits.device
        target_ids = torch.tensor([x for tg in targets for x in tg[1]], device=device)         # (N,)
        old_logp = torch.tensor([x for tg in targets for x in tg[2]], device=device)           # (N,)
        adv = torch.tensor([float(advs[b][k]) for b, k in pairs], device=device)               # (N,)
        logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, target_ids[:, None])[:, 0]
        ones = torch.ones(1, len(pairs), device=device)
        token_share = len(pairs) / totals["tokens"]
        loss = logits.new_zeros((), dtype=torch.float32)
        if st["coef"] > 0:
            pg, clip_frac = clipped_pg_loss(logp[None], old_logp[None], adv[None], ones, st["eps_low"], st["eps_high"])
            loss = loss + st["coef"] * pg * token_share
            stats["pg_loss"] += float(pg.detach()) * token_share
            stats["clip_frac"] += float(clip_frac) * token_share
        if a["coef"] > 0:
            teacher_logits = self._teacher_logits(batch, targets)                               # (N, V)
            segment = torch.tensor([keys.index(p) for p in pairs], device=device)
            weights = None
            if a["turn_weighting"] == "willingness":
                weights = torch.tensor([[abs(batch[b].states[k]["delta_willingness"]) for b, k in keys]],
                                       device=device)
            kl_loss, kl_mean = aopsd_loss(logits[None], teacher_logits[None], ones, segment[None], weights,
                                          a["vocab"], a["topk"], a["chunk"], a["clip"])
            loss = loss + a["coef"] * kl_loss * (sum(tr.n_turns for tr in batch) / totals["turns"])
            stats["aopsd_kl"] += float(kl_mean) * token_share
        if st["ref_kl"] > 0:
            with torch.no_grad(), lm.adapter_off(self.model):
                ref_hidden = _hidden(self.model, [tr.ids for tr in batch], self.tokenizer.pad_token_id)
                ref_logits = _logits_at(self.model, ref_hidden, (rows, cols))
            ref_logp = torch.log_softmax(ref_logits.float() / temperature, -1).gather(-1, target_ids[:, None])[:, 0]
            kl_ref = ref_kl(logp[None], ref_logp[None], ones)
            loss = loss + st["ref_kl"] * kl_ref * token_share
            stats["ref_kl"] += float(kl_ref.detach()) * token_share
        return loss

    @torch.no_grad()
    def _teacher_logits(self, batch, targets):
        """The privileged view of each trajectory through the teacher, at the positions predicting
        the same agent tokens as the student's (N, V) logits."""
        a = self.cfg["aopsd"]
        rows, b_idx, c_idx = [], [], []
        for b, (tr, tg) in enumerate(zip(batch, targets)):
            teacher_ids, index = rollout.teacher_view(tr, rollout.note_ids(self.tokenizer, tr.persona),
                                                      a["placement"])
            rows.append(teacher_ids)
            for j in tg[0]:
                b_idx.append(b)
                c_idx.append(index[j + 1] - 1)     # the teacher position predicting token j + 1
        was_training = self.model.training
        self.model.eval()  # deterministic teacher; the student's mode is restored below
        with self._teacher_ctx():
            hidden = _hidden(self.model, rows, self.tokenizer.pad_token_id)
            logits = _logits_at(self.model, hidden, (torch.tensor(b_idx), torch.tensor(c_idx)))
        self.model.train(was_training)
        return logits

    # -- evaluation, logging, checkpoints ------------------------------------------------------
    def evaluate(self):
        return evaluation.quick(self.model, self.tokenizer, self.cfg, self.eval_personas, seed=self.cfg["seed"])

    def checkpoint_dir(self):
        return os.path.join(self.out, "checkpoints")

    def save_checkpoint(self):
        return write_checkpoint(self.checkpoint_dir(), self.step, self.model, {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "skipped_steps": self.skipped_steps,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})

    def _load_checkpoint(self):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights
        root = self.checkpoint_dir()
        latest = os.path.join(root, "latest")
        if not os.path.exists(latest):
            raise SystemExit(f"--resume: no checkpoint in {root}; start without --resume or set out_dir "
                             f"to the run to continue.")
        path = os.path.join(root, open(latest).read().strip())
        for adapter in os.listdir(os.path.join(path, "adapter")):
            sub = os.path.join(path, "adapter", adapter)
            if os.path.isdir(sub):  # extra adapters (ema) are saved in sub-folders
                set_peft_model_state_dict(self.model, load_peft_weights(sub), adapter_name=adapter)
        set_peft_model_state_dict(self.model, load_peft_weights(os.path.join(path, "adapter")),
                                  adapter_name="default")
        state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.log(f"resumed from {path} at step {self.step}")

    def train(self):
        t = self.cfg["train"]
        os.makedirs(self.out, exist_ok=True)
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        samples_path = os.path.join(self.out, "samples.jsonl")
        from tqdm import tqdm
        bar = tqdm(total=t["steps"], initial=self.step, desc=f"{self.cfg['algo']}", unit="step")
        try:
            while self.step < t["steps"]:
                step = self.step
                t0 = time.perf_counter()
                trajs, roll_s, generated = self.collect(step)
                traj_adv, per_turn = self.advantages(trajs)
                stats = self.update(trajs, per_turn, step)
                record = {"step": step + 1, **summarize(trajs), **{k: round(v, 5) for k, v in stats.items()},
                          "lr": self.scheduler.get_last_lr()[0], "rollout_tok_s": round(generated / roll_s, 1),
                          "rollout_s": round(roll_s, 1), "step_s": round(time.perf_counter() - t0, 1),
                          "peak_mem_gb": peak_memory_gb()}
                self.skipped_steps += stats["nonfinite"] > 0
                self.step = step + 1
                if t["eval_every"] and self.step % t["eval_every"] == 0 and self.step < t["steps"]:
                    record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
                _append_jsonl(metrics_path, record)
                if t["samples_every"] and self.step % t["samples_every"] == 0:
                    for tr in trajs[::self.cfg["train"]["group_size"]]:
                        _append_jsonl(samples_path, {"step": self.step, **tr.to_dict()})
                if t["save_every"] and self.step % t["save_every"] == 0:
                    self.save_checkpoint()
                bar.update(1)
                bar.write(f"step {self.step:3d} | loss {record['loss']:+.4f} pg {record['pg_loss']:+.4f} "
                          f"kl {record['aopsd_kl']:.4f} | success {record['success_rate']:.2f} "
                          f"dw {record['willingness_gain']:+.2f} resolved {record['resolve_rate']:.2f} | "
                          f"{record['rollout_tok_s']:.0f} tok/s {record['step_s']:.0f}s")
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint()
            self.log(f"interrupted: checkpoint of step {self.step} saved to {path}; continue with --resume")
            raise SystemExit(130)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"out of memory at step {self.step + 1}: lower train.micro_batch "
                             f"(now {t['micro_batch']}), train.group_size / train.personas_per_step, "
                             f"rollout.max_new_tokens, or set train.gradient_checkpointing=true / "
                             f"model.quantization=4bit.") from None
        bar.close()
        if not t["save_every"] or self.step % t["save_every"]:
            self.save_checkpoint()
        evaluation.plot_curves(self.out)
        return self.evaluate()


def write_checkpoint(root, step, model, trainer_state):
    """Write root/step_N/{adapter/, trainer.pt} completely, then point root/latest at it with an atomic
    rename: a kill at any moment leaves the previous checkpoint usable. Keeps the last two."""
    name = f"step_{step:06d}"
    tmp, final = os.path.join(root, name + ".tmp"), os.path.join(root, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    for old in sorted(d for d in os.listdir(root) if d.startswith("step_") and d != name)[:-1]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


class _ActiveAdapter:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        self.model.set_adapter("default")


def summarize(trajs):
    """Success rate, willingness gain and concern rates of a batch of trajectories."""
    n = max(1, len(trajs))
    concerns = sum(len(t.persona.concerns) for t in trajs) or 1
    final = [t.states[-1] if t.states else None for t in trajs]
    gain = [f["willingness"] - t.persona.willingness for t, f in zip(trajs, final) if f]
    status = [v for f in final if f for v in f["concern_status"].values()]
    return {"success_rate": round(sum(t.reward for t in trajs) / n, 4),
            "willingness_gain": round(sum(gain) / max(1, len(gain)), 4),
            "reveal_rate": round(sum(s != "hidden" for s in status) / concerns, 4),
            "resolve_rate": round(sum(s == "resolved" for s in status) / concerns, 4),
            "turns": round(sum(t.n_turns for t in trajs) / n, 2),
            "agent_tokens": sum(sum(t.agent_mask) for t in trajs)}


def peak_memory_gb():
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def _append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None):
    try:
        cfg, flags = config.from_argv(argv)
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    if "help" in flags or "h" in flags:
        print(__doc__)
        return
    unknown = set(flags) - {"resume"}
    if unknown:
        raise SystemExit(f"unknown flag --{sorted(unknown)[0]}; savpo.py takes --config PATH, --resume and "
                         f"key=value overrides.")
    if flags.get("resume"):
        saved = os.path.join(cfg["out_dir"], "config.yaml")
        if os.path.exists(saved):
            cfg = config.load(saved, [a for a in (argv if argv is not None else sys.argv[1:]) if "=" in a
                                      and not a.startswith("--")])
    elif os.path.exists(os.path.join(cfg["out_dir"], "metrics.jsonl")):
        raise SystemExit(f"{cfg['out_dir']} already holds a run; continue it with --resume or choose "
                         f"another out_dir=...")
    try:
        trainer = Trainer(cfg, resume=bool(flags.get("resume")))
    except (lm.ModelError, P.DomainError) as e:
        raise SystemExit(str(e))
    print(f"{cfg['algo']}: {len(trainer.train_personas)} training personas, {len(trainer.eval_personas)} held out; "
          f"{sum(p.numel() for p in trainer.params):,} trainable LoRA parameters; writing to {cfg['out_dir']}")
    result = trainer.train()
    print(f"final evaluation on held-out personas: {json.dumps(result)}")
    print(f"outputs: {cfg['out_dir']}/metrics.jsonl, samples.jsonl, curves.png, config.yaml, checkpoints/")


if __name__ == "__main__":
    main()
