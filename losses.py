"""SAVPO's losses and advantages: pure functions of tensors, imported by both trainers (savpo.py, the
native loop, and trl_savpo.py, the same objective on TRL's GRPOTrainer) and by learn_to_ask.py.

Terms, defined once here:

- *Privileged view*: the student's token sequence with a note of the callee's hidden concerns inserted
  (`rollout.teacher_view`). The *teacher* is the same network reading it, without gradient.
- AOPSD (Asymmetric On-Policy Self-Distillation), `aopsd_loss`: per agent token t a divergence between
  the teacher's and the student's next-token distributions (default forward KL):
      KL_t = sum_v p_T(v | privileged prefix) [log p_T(v | ...) - log p_S(v | student prefix)]
  averaged within each agent turn, then over turns (uniform, or weighted by |delta willingness|):
      L_AOPSD = sum_(i,k) w_ik mean_(t in turn k of i) KL_t / sum_(i,k) w_ik
- STPR (State-Transition Policy Refinement), `stpr_advantages` + `clipped_pg_loss`: the trajectory
  advantage A_i = (R_i - mean_G R) / (std_G R + eps) comes from the final decision (R_i = 1 iff the
  callee accepted); the *direction* of each turn's advantage from the willingness shift dw_ik that turn
  caused, A_ik = |A_i| sign(dw_ik) (sign(A_i) where dw_ik = 0); a clipped policy gradient with
  asymmetric clip uses A_ik on every token of turn k:
      L_STPR = -mean_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),  r_t = p / p_old
- `ref_kl`: the optional k3 estimate of KL(policy || reference), the reference being the adapter-free base.

Conventions (docs/savpo.md): the student comes first and the teacher second in every function, options
are keyword-only; divergences in TRL's `alpha` convention; every normaliser is the whole optimisation
step's (the callers pass the step's token count and turn-weight total), so a step split into
micro-batches, or over processes, has the same gradient.
"""

import math

import torch


def _segment_mean(values, segments, n_segments):
    """Mean of `values` (N,) within each segment id (N,) -> (n_segments,), 0 for empty segments."""
    sums = torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add(0, segments, values)
    counts = torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add(
        0, segments, torch.ones_like(values))
    return sums / counts.clamp(min=1), counts


def divergence(student_logp, teacher_logp, *, kind="forward", alpha=0.5):
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


def _token_divergence(student_logits, teacher_logits, kind, alpha, vocab, topk, support):
    s = torch.log_softmax(student_logits.float(), -1)
    t = torch.log_softmax(teacher_logits.float(), -1)
    if vocab == "topk":   # the top-k tokens of one side (`support`), the other projected onto them, + tail
        idx = (t if support == "teacher" else s).topk(topk, -1).indices                    # (n, k)
        t, s = _with_tail(t.gather(-1, idx)), _with_tail(s.gather(-1, idx))
    return divergence(s, t, kind=kind, alpha=alpha)


class _ForwardKL(torch.autograd.Function):
    """Fast path of the default divergence (forward KL over the full vocabulary): KL(p_T || p_S) per
    row of (n, V) logits, and its gradient in the same pass, d KL / d student_logits = p_S - p_T,
    kept (in the logits' dtype, the size of the logits) until the backward pass multiplies it by the
    incoming gradient. The plain path (`_token_divergence` under checkpointing) computes both
    log-softmaxes, then again in the backward pass, and differentiates them with autograd: a chunk of
    560 tokens x 49k vocabulary, bf16 logits, forward + backward 0.61 -> 0.36 s on the 2-core CPU.
    Equal to the plain path up to rounding (tests/test_losses.py); the teacher gets no gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits):
        s = torch.log_softmax(student_logits.float(), -1)                                  # (n, V)
        t = torch.log_softmax(teacher_logits.float(), -1)
        p_t = t.exp()
        kl = (p_t * (t - s)).sum(-1)                                                       # (n,)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(s.exp_().sub_(p_t).to(student_logits.dtype))            # p_S - p_T
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        grad, = ctx.saved_tensors
        return (grad.float() * grad_kl[:, None].float()).to(grad.dtype), None


def token_divergence(student_logits, teacher_logits, *, kind="forward", alpha=0.5, vocab="full", topk=64,
                     support="teacher", chunk=256, fused=True):
    """Per-token divergence of (N, V) logits, over the full vocabulary or a top-k support plus a tail
    bucket (`support`: whose top-k, TRL's `topk_support`), `chunk` rows at a time. Each chunk is
    recomputed in the backward pass (checkpointing), so the softmax temporaries never exceed
    chunk x V whatever N and V are. The forward KL over the full vocabulary (the default) takes the
    fused path `_ForwardKL` instead unless `fused=False`; it keeps one (N, V) gradient, the logits'
    size, for the backward pass. Returns (N,)."""
    from torch.utils.checkpoint import checkpoint
    fn = lambda s, t: _token_divergence(s, t, kind, alpha, vocab, topk, support)
    differentiable = student_logits.requires_grad and torch.is_grad_enabled()
    fast = fused and differentiable and kind == "forward" and vocab == "full"
    pieces = []
    for i in range(0, student_logits.shape[0], chunk):
        s, t = student_logits[i:i + chunk], teacher_logits[i:i + chunk]
        if fast:
            pieces.append(_ForwardKL.apply(s, t))
        elif differentiable:
            pieces.append(checkpoint(fn, s, t, use_reentrant=False))
        else:
            pieces.append(fn(s, t))
    return torch.cat(pieces) if pieces else student_logits.new_zeros(0)


def aopsd_loss(student_logits, teacher_logits, mask, turn_ids, *, turn_weights=None, weight_total=None,
               kind="forward", alpha=0.5, vocab="full", topk=64, support="teacher", chunk=256, clip=0.0,
               per_token=False):
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
    sum_turns w * turn_mean / weight_total. per_token=True adds those (N,) divergences (clipped,
    detached, in the order of the mask's agent tokens), so a caller logging them computes nothing twice.

    Example: one trajectory, two turns with 2 and 1 agent tokens whose divergences are [0.2, 0.4] and
    [0.9]: turn means [0.3, 0.9]; uniform weights give loss 0.6 (a token mean would give 0.5).
    """
    m = mask.bool()
    div = token_divergence(student_logits[m], teacher_logits[m].detach(), kind=kind, alpha=alpha, vocab=vocab,
                           topk=topk, support=support, chunk=chunk)                               # (N,)
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
    mean = div.detach().mean() if div.numel() else div.new_zeros(())
    return (loss, mean, div.detach()) if per_token else (loss, mean)


def stpr_advantages(final_rewards, delta_w, groups, *, mode="direction", beta=0.5, eps=1e-6):
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


def clipped_pg_loss(logp, old_logp, adv, mask, *, eps_low=0.2, eps_high=0.28):
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
