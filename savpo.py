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
import math
import os
import random
import shutil
import signal
import sys
import threading
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


def divergence(teacher_logp, student_logp, kind="forward", alpha=0.5):
    """Per-row divergence between two distributions given as log-probs over the same support (n, K),
    in TRL's convention (`trl/experimental/sdft/loss_utils.py`, `alpha`):

      forward  (alpha 0)  KL(teacher || student) = sum_v p_T (log p_T - log p_S)   [mode-covering]
      reverse  (alpha 1)  KL(student || teacher) = sum_v p_S (log p_S - log p_T)   [mode-seeking]
      jsd      (alpha)    (1 - alpha) KL(student || m) + alpha KL(teacher || m),
                          m = alpha p_T + (1 - alpha) p_S   (generalised JSD; 0.5 = the symmetric JSD)

    Returns (n,), non-negative. Example, p_T = [0.25, 0.75], p_S = [0.5, 0.5]: forward 0.1308,
    reverse 0.1438, jsd(0.5) 0.0338 (each term against m = [0.375, 0.625])."""
    if kind == "forward":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha)]), 0)
        kl_t = (teacher_logp.exp() * (teacher_logp - m)).sum(-1)
        kl_s = (student_logp.exp() * (student_logp - m)).sum(-1)
        return (1 - alpha) * kl_s + alpha * kl_t
    raise ValueError(f"unknown divergence {kind!r}; allowed: forward, reverse, jsd")


def _with_tail(logp_top):
    """Append one bucket holding the mass outside a top-k support: (n, k) -> (n, k + 1), sums to 1."""
    captured = torch.logsumexp(logp_top, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logp_top, torch.log(-torch.expm1(captured))], -1)


def _token_divergence(teacher_logits, student_logits, kind, alpha, vocab, topk, support):
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    if vocab == "topk":   # the top-k tokens of one side (`support`), the other projected onto them, + tail
        idx = (t if support == "teacher" else s).topk(topk, -1).indices                    # (n, k)
        t, s = _with_tail(t.gather(-1, idx)), _with_tail(s.gather(-1, idx))
    return divergence(t, s, kind, alpha)


def token_divergence(student_logits, teacher_logits, kind="forward", alpha=0.5, vocab="full", topk=64,
                     support="teacher", chunk=256):
    """Per-token divergence of (N, V) logits, over the full vocabulary or a top-k support plus a tail
    bucket (`support`: whose top-k, TRL's `topk_support`), `chunk` rows at a time. Each chunk is
    recomputed in the backward pass (checkpointing), so the softmax temporaries never exceed
    chunk x V whatever N and V are. Returns (N,)."""
    from torch.utils.checkpoint import checkpoint
    fn = lambda t, s: _token_divergence(t, s, kind, alpha, vocab, topk, support)
    pieces = []
    for i in range(0, student_logits.shape[0], chunk):
        s, t = student_logits[i:i + chunk], teacher_logits[i:i + chunk]
        pieces.append(checkpoint(fn, t, s, use_reentrant=False) if s.requires_grad else fn(t, s))
    return torch.cat(pieces) if pieces else student_logits.new_zeros(0)


def aopsd_loss(student_logits, teacher_logits, mask, turn_ids, turn_weights=None, weight_total=None,
               kind="forward", alpha=0.5, vocab="full", topk=64, support="teacher", chunk=256, clip=0.0):
    """Asymmetric on-policy self-distillation loss.

    student_logits (B, T, V)  the student's logits; position t predicts token t+1 of its sequence
    teacher_logits (B, T, V)  the teacher's logits gathered at the *same* predicted tokens (aligned)
    mask           (B, T)     1 where the predicted token is an agent token
    turn_ids       (B, T)     agent turn of the predicted token (any value where mask = 0)
    turn_weights   (B, K)     weight of each (trajectory, turn); None = uniform (1 each)
    weight_total   scalar     the sum of the weights over the *whole optimisation step*; None = the
                              sum over the turns present here. The trainer passes the step's total,
                              so splitting a step into micro-batches changes nothing.
    Returns (loss, mean per-token divergence): per-token divergence (`kind`, `alpha`: see
    `divergence`), optionally clipped at `clip`, averaged within each turn, then
    sum_turns w * turn_mean / weight_total.

    Example: one trajectory, two turns with 2 and 1 agent tokens whose divergences are [0.2, 0.4] and
    [0.9]: turn means [0.3, 0.9]; uniform weights give loss 0.6 (a token mean would give 0.5).
    """
    m = mask.bool()
    div = token_divergence(student_logits[m], teacher_logits[m].detach(), kind, alpha, vocab, topk, support,
                           chunk)                                                         # (N,)
    if clip > 0:
        div = div.clamp(max=clip)
    n_turns = int(turn_ids[m].max()) + 1 if m.any() else 1
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[m]
    segments = rows * n_turns + turn_ids[m].long()                                       # (N,)
    turn_div, counts = _segment_mean(div, segments, mask.shape[0] * n_turns)            # (B*K,)
    present = (counts > 0).to(div.dtype)
    weights = present if turn_weights is None else turn_weights[:, :n_turns].reshape(-1).to(div.dtype) * present
    total = weights.sum() if weight_total is None else torch.as_tensor(weight_total, dtype=div.dtype)
    loss = (turn_div * weights).sum() / total.clamp(min=1e-8)
    return loss, div.detach().mean() if div.numel() else div.new_zeros(())


def stpr_advantages(final_rewards, delta_w, groups, mode="direction", beta=0.5, eps=1e-6):
    """Per-turn advantages from the final decision (magnitude) and willingness shifts (direction).

    final_rewards (N,)        R_i, 1 iff the callee accepted
    delta_w       [ (K_i,) ]  willingness change caused by each agent turn of trajectory i
    groups        (N,)        group id (rollouts of the same persona)
    mode: 'direction' A_ik = |A_i| sign(dw_ik), sign(A_i) where dw_ik = 0   (SAVPO's STPR)
          'additive'  A_ik = A_i + beta * dw_ik / rms(all dw of the step)
          'outcome'   A_ik = A_i                                           (plain GRPO)
    with A_i = (R_i - mean_G R) / (std_G R + eps), population std within the group (the group is
    the whole population of the persona's rollouts, as in GRPO/TRL). The statistics are computed in
    float64, and a group whose rewards are all equal gets exactly A_i = 0: without that, the rounding
    error of a float32 mean of equal non-dyadic rewards (8 x 3.2), divided by std + eps ~ 1e-6, gives
    every member a spurious advantage of about -0.2.
    Returns (trajectory advantages (N,) float32, [ (K_i,) per-turn advantages ]).

    Worked example, one group of 3 rollouts, R = [1, 0, 0]: mean 1/3, std 0.471, so
    A = [1.414, -0.707, -0.707]. If rollout 2 moved willingness by dw = [+0.5, 0, -0.5], its turn
    advantages are [+0.707, -0.707, -0.707]: the turn that raised willingness is reinforced even in a
    failed call, the others are pushed down. In 'outcome' mode all three would be -0.707.
    """
    rewards = final_rewards.double()
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        if r.max() > r.min():   # equal rewards: no contrast, exactly 0
            adv[sel] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    adv = adv.float()
    # the additive term's unit: the root mean square of the step's willingness shifts (not their std,
    # which is 0 when every turn moved the same way -- e.g. all off-topic -- and would blow dw up)
    all_dw = torch.cat([d.float() for d in delta_w]) if delta_w else torch.zeros(0)
    rms = float(all_dw.pow(2).mean().sqrt()) if all_dw.numel() else 0.0
    dw_scale = rms + eps if rms > 0 else 1.0
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

    logp, old_logp, adv, mask: (B, T).
    loss = -sum_t mask_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) / sum_t mask_t
    Returns (loss, clip_frac, outside_frac) over the masked tokens:
      clip_frac     where the clip removed the gradient: r < 1 - eps_low with A < 0, or
                    r > 1 + eps_high with A > 0 (TRL's `clip_ratio/region_mean`);
      outside_frac  where r is outside [1 - eps_low, 1 + eps_high] whatever the sign of A.
    """
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    n = mask.sum().clamp(min=1)
    loss = -(objective * mask).sum() / n
    low, high = ratio < 1 - eps_low, ratio > 1 + eps_high
    clipped = (low & (adv < 0)) | (high & (adv > 0))
    clip_frac = (clipped.float() * mask).sum() / n
    outside_frac = ((low | high).float() * mask).sum() / n
    return loss, clip_frac.detach(), outside_frac.detach()


def ref_kl(logp, ref_logp, mask):
    """k3 estimate of KL(policy || reference) per token, token-mean: exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return ((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1)


# =============================================================================================
# Batching trajectories for the update
# =============================================================================================

def agent_targets(traj):
    """Positions j whose *next* token j+1 the policy sampled: (positions, target ids, rollout log-probs,
    turn of each target). The logits at position j predict token j+1."""
    pos = [j for j in range(len(traj.ids) - 1) if traj.agent_mask[j + 1]]
    return (pos, [traj.ids[j + 1] for j in pos], [traj.logprobs[j + 1] for j in pos],
            [traj.turn_ids[j + 1] for j in pos])


def policy_logits(model, trajs, targets):
    """(N, V) logits at every agent-target position of a few trajectories, through the model's own head."""
    rows = torch.tensor([b for b, tg in enumerate(targets) for _ in tg[0]], dtype=torch.long)
    cols = torch.tensor([j for tg in targets for j in tg[0]], dtype=torch.long)
    # tokens after a trajectory's last agent token (the callee's closing line) predict nothing we train
    return lm.selected_logits(model, [t.ids[:tg[0][-1] + 1] for t, tg in zip(trajs, targets)], (rows, cols))


# =============================================================================================
# Trainer
# =============================================================================================

class Trainer:
    """Everything one run needs: one base model + LoRA serving all four roles, the simulator, the
    optimizer, persona schedule, logs and checkpoints. `train()` is the loop."""

    def __init__(self, cfg, resume=False, log=print):
        self.cfg, self.log = cfg, log
        self.out = cfg["out_dir"]
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
        if cfg["simulator"]["model"]:
            self.sim_tokenizer, self.sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"]})
        self.simulator = S.CognitiveUserSimulator(cfg["simulator"], self.sim_model, self.sim_tokenizer, seed=cfg["seed"])
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

    def _teacher_ctx(self):
        mode = self.cfg["aopsd"]["teacher"]
        if mode == "fixed":
            return lm.adapter_off(self.model)
        if mode == "ema":
            return _ActiveAdapter(self.model, "ema")
        return contextlib.nullcontext()  # live: the current adapter

    # -- one step ------------------------------------------------------------------------------
    def personas_for(self, step):
        """The training personas of step `step` (0-based): a function of the seed and the step only."""
        pc = self.cfg["personas"]
        return P.schedule(pc["domains"], self.cfg["train"]["personas_per_step"], pc["train_seed"], step)

    def collect(self, step):
        """Rollouts for one step (G per persona), with the model in eval mode and no gradient."""
        self.model.eval()
        t0 = time.perf_counter()
        aopsd, sim_before = self.cfg["aopsd"], self.simulator.stats["generated_tokens"]
        trajs = rollout.run(self.model, self.tokenizer, self.simulator, self.personas_for(step),
                            self.cfg["rollout"], group_size=self.cfg["train"]["group_size"],
                            seed=self.cfg["seed"] * 100_003 + step, progress=f"step {step + 1} rollouts",
                            teacher_placement=aopsd["placement"] if aopsd["coef"] > 0 else None)
        seconds = time.perf_counter() - t0
        # policy tokens + the simulator's own lines
        generated = sum(sum(t.agent_mask) for t in trajs) + self.simulator.stats["generated_tokens"] - sim_before
        return trajs, seconds, generated

    def advantages(self, trajs):
        rewards = torch.tensor([t.reward for t in trajs])
        dws = [torch.tensor([s["delta_willingness"] for s in t.states], dtype=torch.float32) for t in trajs]
        groups = torch.tensor([t.group for t in trajs])
        st = self.cfg["stpr"]
        return stpr_advantages(rewards, dws, groups, st["mode"], st["beta"])

    def _turn_weights(self, traj, turns):
        """AOPSD weight of each agent turn in `turns`: 1 (uniform) or |delta willingness| it caused."""
        if self.cfg["aopsd"]["turn_weighting"] == "uniform":
            return {k: 1.0 for k in turns}
        return {k: abs(traj.states[k]["delta_willingness"]) for k in turns}

    def update(self, trajs, per_turn_adv, step):
        """`train.epochs` passes of micro-batched updates over this step's rollouts, one optimizer step
        per pass. Every normaliser is the whole step's: the PG term is a token mean over the step's
        agent tokens (each micro-batch's token mean scaled by its token share, TRL's `dapo`), the AOPSD
        term a weighted turn mean over the step's turns. So the gradient does not depend on
        `train.micro_batch`. The "old" log-probs of the ratio are the first pass's own, detached (all
        micro-batches of a pass see the same weights): the first ratio is exactly 1 in any dtype.
        Fills `self.turn_divergence` {trajectory index: {turn: AOPSD divergence}} from the first pass."""
        t, a, st = self.cfg["train"], self.cfg["aopsd"], self.cfg["stpr"]
        self.turn_divergence = {}
        trainable = [i for i, tr in enumerate(trajs) if sum(tr.agent_mask) > 0]
        targets = {i: agent_targets(trajs[i]) for i in trainable}
        weights = {i: self._turn_weights(trajs[i], sorted(set(targets[i][3]))) for i in trainable}
        weight_total = sum(w for i in trainable for w in weights[i].values())
        if weight_total <= 0:   # every turn weight of the step is 0 (no willingness moved): uniform
            weights = {i: {k: 1.0 for k in weights[i]} for i in trainable}
            weight_total = sum(len(weights[i]) for i in trainable)
        norm = {"tokens": sum(len(targets[i][0]) for i in trainable), "weight_total": weight_total}
        # a trajectory with no PG signal needs no forward at all when nothing else uses it (grpo/refine)
        pg_signal = lambda i: st["coef"] > 0 and bool((per_turn_adv[i] != 0).any())
        work = [i for i in trainable if a["coef"] > 0 or st["ref_kl"] > 0 or pg_signal(i)]
        keys = ("loss", "pg_loss", "aopsd_kl", "clip_frac", "outside_frac", "ref_kl", "grad_norm", "teacher_s")
        stats = {k: 0.0 for k in keys}
        stats.update(nonfinite=0, logprob_gap_mean=0.0, logprob_gap_max=0.0)
        old, done_epochs = {}, 0
        order_rng = random.Random(f"{self.cfg['seed']}:{step}")
        # micro-batches never mix personas: the rollouts of one persona share its system prompt, which
        # `lm.selected_logits` then runs once for all of them
        chunks = []
        for g in sorted({trajs[i].group for i in work}):
            members = [i for i in work if trajs[i].group == g]
            chunks += [members[k:k + t["micro_batch"]] for k in range(0, len(members), t["micro_batch"])]
        from tqdm import tqdm
        bar = tqdm(total=t["epochs"] * len(chunks), desc=f"step {step + 1} update", unit="micro-batch", leave=False)
        for epoch in range(t["epochs"]):
            order_rng.shuffle(chunks)
            epoch_stats = {k: 0.0 for k in keys}
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            self.model.train()
            for chunk in chunks:
                loss = self._micro_batch_loss(chunk, trajs, targets, per_turn_adv, weights, norm, old, epoch_stats)
                if not torch.isfinite(loss):
                    finite = False
                    break
                if loss.requires_grad:
                    loss.backward()
                epoch_stats["loss"] += float(loss.detach())
                bar.update(1)
            self.model.eval()
            if epoch == 0:
                gaps = torch.cat([(old[i] - torch.tensor(targets[i][2])).abs() for i in old]) if old else torch.zeros(1)
                stats["logprob_gap_mean"], stats["logprob_gap_max"] = float(gaps.mean()), float(gaps.max())
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                stats["nonfinite"] += 1
                warnings.warn(f"step {step + 1}: non-finite loss; update skipped, nothing written from it.")
                continue
            epoch_stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, t["grad_clip"]))
            self.optimizer.step()
            if a["teacher"] == "ema":
                self._copy_adapter("default", "ema", decay=a["ema_decay"])
            done_epochs += 1
            for k in keys:
                stats[k] += epoch_stats[k]
        bar.close()
        for k in keys:   # logged as the mean over the passes that updated, not their sum
            stats[k] /= max(1, done_epochs)
        self.scheduler.step()
        return stats

    def _micro_batch_loss(self, chunk, trajs, targets, per_turn_adv, weights, norm, old, stats):
        """The SAVPO loss of the trajectories `chunk`, on their agent tokens only (flattened to N),
        already scaled by their share of the step (see `update`)."""
        a, st = self.cfg["aopsd"], self.cfg["stpr"]
        batch, tgs = [trajs[i] for i in chunk], [targets[i] for i in chunk]
        pairs = [(b, k) for b, tg in enumerate(tgs) for k in tg[3]]             # (trajectory, turn) of each token
        logits = policy_logits(self.model, batch, tgs)                          # (N, V)
        device = logits.device
        target_ids = torch.tensor([x for tg in tgs for x in tg[1]], device=device)              # (N,)
        logp = lm.token_logprobs(logits, target_ids, self.cfg["rollout"]["temperature"])        # (N,)
        sizes = [len(tg[0]) for tg in tgs]
        first_pass = chunk[0] not in old
        if first_pass:   # first pass: the behaviour policy's log-probs are these, detached
            old.update(zip(chunk, logp.detach().cpu().split(sizes)))
        old_logp = torch.cat([old[i] for i in chunk]).to(device)
        ones = torch.ones(1, len(pairs), device=device)
        token_share = len(pairs) / norm["tokens"]
        loss = logits.new_zeros((), dtype=torch.float32)
        if st["coef"] > 0:
            adv = torch.tensor([float(per_turn_adv[chunk[b]][k]) for b, k in pairs], device=device)   # (N,)
            pg, clip_frac, outside = clipped_pg_loss(logp[None], old_logp[None], adv[None], ones,
                                                     st["eps_low"], st["eps_high"])
            loss = loss + st["coef"] * pg * token_share
            stats["pg_loss"] += float(pg.detach()) * token_share
            stats["clip_frac"] += float(clip_frac) * token_share
            stats["outside_frac"] += float(outside) * token_share
        if a["coef"] > 0:
            t0 = time.perf_counter()
            teacher_logits = self._teacher_logits(batch, tgs)                                  # (N, V)
            stats["teacher_s"] += time.perf_counter() - t0
            keys = sorted(set(pairs))
            segment = torch.tensor([keys.index(p) for p in pairs], device=device)
            turn_w = torch.tensor([[weights[chunk[b]][k] for b, k in keys]], device=device)
            kl_loss, kl_mean = aopsd_loss(logits[None], teacher_logits[None], ones, segment[None], turn_w,
                                          norm["weight_total"], a["divergence"], a["alpha"], a["vocab"],
                                          a["topk"], a["topk_support"], a["chunk"], a["clip"])
            loss = loss + a["coef"] * kl_loss
            stats["aopsd_kl"] += float(kl_mean) * token_share
            if first_pass:   # each turn's mean divergence, as the loss averaged it, for samples.jsonl
                with torch.no_grad():
                    div = token_divergence(logits.detach(), teacher_logits, a["divergence"], a["alpha"], a["vocab"],
                                           a["topk"], a["topk_support"], a["chunk"])
                    turn_div, _ = _segment_mean(div.clamp(max=a["clip"]) if a["clip"] > 0 else div, segment, len(keys))
                for (b, k), value in zip(keys, turn_div.tolist()):
                    self.turn_divergence.setdefault(chunk[b], {})[k] = value
        if st["ref_kl"] > 0:
            with torch.no_grad(), lm.adapter_off(self.model):
                ref_logits = policy_logits(self.model, batch, tgs)
            ref_logp = lm.token_logprobs(ref_logits, target_ids, self.cfg["rollout"]["temperature"])
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
            for j in tg[0]:
                b_idx.append(b)
                c_idx.append(index[j + 1] - 1)     # the teacher position predicting token j + 1
            rows.append(teacher_ids[:c_idx[-1] + 1])
        was_training = self.model.training
        self.model.eval()  # deterministic teacher; the student's mode is restored below
        with self._teacher_ctx():
            logits = lm.selected_logits(self.model, rows, (torch.tensor(b_idx), torch.tensor(c_idx)))
        self.model.train(was_training)
        return logits

    # -- evaluation, logging, checkpoints ------------------------------------------------------
    def evaluate(self):
        return evaluation.quick(self.model, self.tokenizer, self.cfg, self.eval_personas, seed=self.cfg["seed"],
                                sim_model=self.sim_model, sim_tokenizer=self.sim_tokenizer)

    def checkpoint_dir(self):
        return os.path.join(self.out, "checkpoints")

    def save_checkpoint(self):
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return write_checkpoint(self.checkpoint_dir(), self.step, self.model, {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "skipped_steps": self.skipped_steps, "rng": rng})

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
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        # the logs continue from the checkpoint: lines of steps after it (written before a kill) go
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(os.path.join(self.out, name), self.step)
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
        return self.evaluate()

    def _one_step(self, metrics_path, samples_path, bar):
        t = self.cfg["train"]
        step = self.step
        t0 = time.perf_counter()
        trajs, roll_s, generated = self.collect(step)
        _, per_turn = self.advantages(trajs)
        t1 = time.perf_counter()
        stats = self.update(trajs, per_turn, step)
        update_s = time.perf_counter() - t1
        groups = {}
        for tr in trajs:
            groups.setdefault(tr.group, set()).add(tr.reward)
        record = {"step": step + 1, **summarize(trajs),
                  "groups_with_signal": round(sum(len(r) > 1 for r in groups.values()) / max(1, len(groups)), 4),
                  **{k: round(v, 5) for k, v in stats.items()}, "lr": self.scheduler.get_last_lr()[0],
                  "rollout_tok_s": round(generated / roll_s, 1), "rollout_s": round(roll_s, 1),
                  "teacher_s": round(stats["teacher_s"], 1), "update_s": round(update_s, 1)}
        self.skipped_steps += stats["nonfinite"] > 0
        self.step = step + 1
        if t["eval_every"] and self.step % t["eval_every"] == 0 and self.step < t["steps"]:
            t2 = time.perf_counter()
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            record["eval_s"] = round(time.perf_counter() - t2, 1)
        record.update(step_s=round(time.perf_counter() - t0, 1), peak_mem_gb=peak_memory_gb())
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
        if t["save_every"] and self.step % t["save_every"] == 0:
            self.save_checkpoint()
        bar.update(1)
        bar.write(f"step {self.step:3d} | loss {record['loss']:+.4f} pg {record['pg_loss']:+.4f} "
                  f"kl {record['aopsd_kl']:.4f} | success {record['success_rate']:.2f} groups w/ signal "
                  f"{record['groups_with_signal']:.2f} dw {record['willingness_gain']:+.2f} revealed "
                  f"{record['reveal_rate']:.2f} resolved {record['resolve_rate']:.2f} | "
                  f"{record['rollout_tok_s']:.0f} tok/s {record['step_s']:.0f}s")


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


def truncate_jsonl(path, step):
    """Keep the lines of a step log whose "step" is <= `step` (atomic rewrite); no file, no-op."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


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
