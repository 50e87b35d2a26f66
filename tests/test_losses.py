"""SAVPO's losses and advantages (losses.py) on hand-computed and closed-form values."""
import math

import pytest
import torch

import losses


# ----------------------------------------------------------------------------- AOPSD

def test_token_kl_hand_computed_and_zero_when_identical():
    teacher = torch.tensor([[0.0, math.log(3.0)]])      # p_T = [0.25, 0.75]
    student = torch.tensor([[0.0, 0.0]])                # p_S = [0.5, 0.5]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert losses.token_divergence(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert losses.token_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_divergence_options_against_closed_forms():
    p_t, p_s = torch.tensor([[0.25, 0.75]]), torch.tensor([[0.5, 0.5]])
    kl = lambda p, q: float((p * (p / q).log()).sum())
    t, s = p_t.log(), p_s.log()
    assert losses.divergence(s, t, kind="forward").item() == pytest.approx(kl(p_t, p_s), abs=1e-6)    # 0.1308
    assert losses.divergence(s, t, kind="reverse").item() == pytest.approx(kl(p_s, p_t), abs=1e-6)    # 0.1438
    for alpha in (0.5, 0.2, 0.9):   # TRL: (1 - a) KL(S || m) + a KL(T || m), m = a p_T + (1 - a) p_S
        m = alpha * p_t + (1 - alpha) * p_s
        expected = (1 - alpha) * kl(p_s, m) + alpha * kl(p_t, m)
        assert losses.divergence(s, t, kind="jsd", alpha=alpha).item() == pytest.approx(expected, abs=1e-6)
    assert losses.divergence(s, t, kind="jsd", alpha=0.5).item() == pytest.approx(0.0338, abs=1e-4)
    for kind in ("forward", "reverse", "jsd"):      # zero iff the distributions agree
        assert losses.divergence(t, t, kind=kind).item() == pytest.approx(0.0, abs=1e-7)
    # top-k over the student's support: the student's top-1 (p 0.6) + tail, teacher projected onto it
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    student = torch.tensor([[0.2, 0.6, 0.2]]).log()
    got = losses.token_divergence(student, teacher, kind="reverse", vocab="topk", topk=1, support="student").item()
    assert got == pytest.approx(0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7), abs=1e-5)
    got = losses.token_divergence(student, teacher, kind="forward", vocab="topk", topk=1, support="teacher").item()
    assert got == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), abs=1e-5)


def test_topk_with_tail_bucket():
    teacher = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    student = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.4)]])
    # k = 1: the teacher's top token (p 0.5 vs 0.2) plus a tail bucket (0.5 vs 0.8)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert losses.token_divergence(student, teacher, vocab="topk", topk=1).item() == pytest.approx(expected, abs=1e-5)
    full = losses.token_divergence(student, teacher).item()
    assert losses.token_divergence(student, teacher, vocab="topk", topk=3).item() == pytest.approx(full, abs=1e-5)


def test_aopsd_is_a_turn_mean_then_weighted_over_turns():
    torch.manual_seed(0)
    V = 11
    student = torch.randn(1, 5, V)
    teacher = torch.randn(1, 5, V)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    turns = torch.tensor([[0, 0, 0, 1, 2]])
    kl = losses.token_divergence(student[0], teacher[0])
    loss, mean_kl = losses.aopsd_loss(student, teacher, mask, turns)
    turn_means = [(kl[0] + kl[1]) / 2, kl[3], kl[4]]
    assert loss.item() == pytest.approx(float(sum(turn_means) / 3), abs=1e-6)
    assert mean_kl.item() == pytest.approx(float((kl[0] + kl[1] + kl[3] + kl[4]) / 4), abs=1e-6)
    weights = torch.tensor([[1.0, 0.0, 3.0]])
    loss_w, _ = losses.aopsd_loss(student, teacher, mask, turns, turn_weights=weights)
    assert loss_w.item() == pytest.approx(float((turn_means[0] + 3 * turn_means[2]) / 4), abs=1e-6)
    # normalised by the whole step's weight (here 10), not by this batch's (4)
    loss_step, _ = losses.aopsd_loss(student, teacher, mask, turns, turn_weights=weights, weight_total=10.0)
    assert loss_step.item() == pytest.approx(float((turn_means[0] + 3 * turn_means[2]) / 10), abs=1e-6)
    clipped, _ = losses.aopsd_loss(student, teacher, mask, turns, clip=1e-3)
    assert clipped.item() == pytest.approx(1e-3, abs=1e-7)
    assert losses.aopsd_loss(teacher, teacher, mask, turns)[0].item() == pytest.approx(0.0, abs=1e-6)
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
        loss, _ = losses.aopsd_loss(student, teacher, mask, turns, chunk=chunk)
        loss.backward()
        grads.append(student.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert teacher.grad is None                  # the teacher is a stop-gradient target
    assert grads[0].abs().sum() > 0


def test_fused_forward_kl_equals_the_plain_path_in_value_and_gradient():
    """The default divergence's fast path (`losses._ForwardKL`: the gradient p_S - p_T computed with the
    value) against the checkpointed autograd path, per token and through a weighted backward pass."""
    torch.manual_seed(2)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-3)):
        student = (3 * torch.randn(9, 301)).to(dtype).requires_grad_(True)
        teacher = (3 * torch.randn(9, 301)).to(dtype)
        upstream = torch.rand(9)                       # a different weight per token, as the turn means give
        values, grads = [], []
        for fused in (True, False):
            student.grad = None
            div = losses.token_divergence(student, teacher, chunk=4, fused=fused)
            (div * upstream).sum().backward()
            values.append(div.detach())
            grads.append(student.grad.float())
        torch.testing.assert_close(values[0], values[1], atol=tol, rtol=0)
        torch.testing.assert_close(grads[0], grads[1], atol=tol, rtol=0)
        assert grads[0].abs().max() > 10 * tol
        assert grads[0].dtype == torch.float32 and student.grad.dtype == dtype
    # d KL / d student = p_S - p_T, by hand: one token, two words
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    losses.token_divergence(student, teacher).sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[0.5 - 0.25, 0.5 - 0.75]]))
    # without gradient (the per-turn log, evaluation) the plain values
    with torch.no_grad():
        expected = torch.tensor([0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)])
        torch.testing.assert_close(losses.token_divergence(student, teacher), expected, atol=1e-6, rtol=0)


def test_aopsd_per_token_divergences_are_the_ones_the_loss_averaged():
    torch.manual_seed(3)
    student, teacher = torch.randn(1, 6, 20, requires_grad=True), torch.randn(1, 6, 20)
    mask, turns = torch.tensor([[1, 1, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1, 1, 2]])
    loss, mean, div = losses.aopsd_loss(student, teacher, mask, turns, per_token=True, clip=0.05)
    expected = losses.token_divergence(student[0, mask[0].bool()].detach(), teacher[0, mask[0].bool()]).clamp(max=0.05)
    torch.testing.assert_close(div, expected)
    assert not div.requires_grad and loss.requires_grad
    assert mean.item() == pytest.approx(float(expected.mean()), abs=1e-7)
    torch.testing.assert_close(loss, losses.aopsd_loss(student, teacher, mask, turns, clip=0.05)[0])


# ----------------------------------------------------------------------------- STPR

def test_stpr_worked_example():
    rewards = torch.tensor([1.0, 0.0, 0.0])
    dw = [torch.tensor([0.5]), torch.tensor([0.5, 0.0, -0.5]), torch.tensor([0.0])]
    groups = torch.tensor([0, 0, 0])
    adv, per_turn = losses.stpr_advantages(rewards, dw, groups, mode="direction")
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([2 * s, -s, -s]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_turn[1], torch.tensor([s, -s, -s]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_turn[0], torch.tensor([2 * s]), atol=1e-4, rtol=0)
    _, outcome = losses.stpr_advantages(rewards, dw, groups, mode="outcome")
    torch.testing.assert_close(outcome[1], torch.tensor([-s, -s, -s]), atol=1e-4, rtol=0)
    _, additive = losses.stpr_advantages(rewards, dw, groups, mode="additive", beta=1.0)
    dw_rms = torch.cat(dw).pow(2).mean().sqrt()
    torch.testing.assert_close(additive[1], -s + torch.tensor([0.5, 0.0, -0.5]) / dw_rms, atol=1e-4, rtol=0)
    # every turn moved the same way (std 0): the unit is the rms, so the advantages stay finite
    _, same = losses.stpr_advantages(torch.zeros(2), [torch.tensor([-0.25, -0.25])] * 2, torch.zeros(2), mode="additive",
                                     beta=0.5)
    torch.testing.assert_close(same[0], torch.tensor([-0.5, -0.5]))


def test_equal_non_dyadic_rewards_give_exactly_zero():
    # 8 x 3.2: a float32 mean is one ulp off, and (r - mean) / (std + eps) was about -0.19 for everyone
    rewards = torch.full((8,), 3.2)
    dw = [torch.tensor([0.5, -0.5])] * 8
    for mode in ("direction", "outcome"):
        adv, per_turn = losses.stpr_advantages(rewards, dw, torch.zeros(8, dtype=torch.long), mode=mode)
        assert torch.equal(adv, torch.zeros(8)) and all(torch.equal(p, torch.zeros(2)) for p in per_turn)
    # a continuous reward with a real contrast still gets it
    adv, _ = losses.stpr_advantages(torch.tensor([3.2, 3.2, 1.2, 3.2]), dw[:4], torch.zeros(4, dtype=torch.long))
    assert adv[2] < 0 < adv[0] and adv[0] == adv[1] == adv[3]


def test_stpr_groups_are_normalised_separately_and_equal_rewards_give_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    dw = [torch.tensor([1.0])] * 4
    adv, per_turn = losses.stpr_advantages(rewards, dw, torch.tensor([0, 0, 1, 1]), mode="direction")
    assert adv[0] == 0 and adv[1] == 0 and per_turn[0].item() == 0     # no outcome contrast, no signal
    assert adv[2] > 0 > adv[3]
    assert per_turn[3].item() > 0    # failed call, but the turn raised willingness: reinforced


# ----------------------------------------------------------------------------- clipped PG

def test_clipped_pg_hand_computed():
    logp = torch.tensor([[0.5, -0.7, 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, frac, outside = losses.clipped_pg_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # token 1: ratio e^0.5 = 1.65 > 1.28, A > 0 -> 1.28 (clipped: no gradient); token 2: ratio e^-0.7 =
    # 0.50, A < 0 -> min(-0.50, -0.8) = -0.8 (clipped); token 3 masked out
    assert loss.item() == pytest.approx(-(1.28 - 0.8) / 2, abs=1e-5)
    assert frac.item() == pytest.approx(1.0) and outside.item() == pytest.approx(1.0)
    # the same ratios with the advantages' signs flipped: outside the range, but the min keeps the
    # unclipped term, so the gradient is not removed (TRL's region definition counts neither)
    _, frac_flip, outside_flip = losses.clipped_pg_loss(logp, old, -adv, mask)
    assert frac_flip.item() == 0.0 and outside_flip.item() == pytest.approx(1.0)
    unclipped, frac0, outside0 = losses.clipped_pg_loss(old, old, adv, mask)
    assert unclipped.item() == pytest.approx(0.0) and frac0.item() == 0.0 and outside0.item() == 0.0
    assert losses.ref_kl(logp, logp, mask).item() == pytest.approx(0.0)
    assert losses.ref_kl(logp, old, mask).item() > 0
