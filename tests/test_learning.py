"""The policy-gradient path moves the policy toward reward: a tiny model against a rigged simulator
that accepts a call iff the agent's first word is one of a few, chosen so the initial policy wins
some calls and loses others. GRPO and SAVPO must raise the probability of those words within a few
steps; flipping the advantages' sign must lower it. No real run at CPU scale exercises this path
(the embedded model never wins a call), so this test is what guards it."""
import pytest
import torch

import config
import lm
import losses
import personas as P
import savpo
import simulator as S
from conftest import make_tiny_model


class RiggedSimulator:
    """The CognitiveUserSimulator API with a trivial rule: the first agent turn decides -- accept if
    it starts with one of `winning` words, reject otherwise (willingness +1 / -1)."""

    def __init__(self, winning, max_turns=1):
        self.winning, self.cfg, self.stats = tuple(winning), {"max_turns": max_turns}, {"generated_tokens": 0}

    def reset(self, persona_list, seed=None):
        self.personas = list(persona_list)
        self.states = [S.initial_state(p, {"patience": 3}) for p in self.personas]
        self.done = [False] * len(self.personas)
        return ["Hello?"] * len(self.personas)

    def abort(self, i, reason):
        self.states[i].decision, self.done[i] = reason, True

    def step(self, agent_msgs):
        users = [None] * len(self.personas)
        for i, text in enumerate(agent_msgs):
            if self.done[i]:
                continue
            win = text.startswith(self.winning)
            s = self.states[i]
            s.turn += 1
            s.delta_willingness = 1.0 if win else -1.0
            s.willingness += s.delta_willingness
            s.decision = "accept" if win else "reject"
            s.events = {"probed": [], "addressed": [], "open_probe": False, "push": True, "off_topic": False,
                        "too_long": False, "checklist": False, "pitch": False, "probed_other": False,
                        "revealed": [], "resolved": []}
            self.done[i] = True
            users[i] = "Yes." if win else "No."
        return users, list(self.states), list(self.done)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_pg")
    make_tiny_model(tokenizer, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def first_token_distribution(trainer, personas):
    """p(first agent token) for each persona's opening prompt, as the policy would sample it. (N, V)"""
    import rollout
    rows, cols = [], []
    sim = RiggedSimulator(("",))
    for p in personas:
        t = rollout.run(trainer.model, trainer.tokenizer, sim, [p], {**trainer.cfg["rollout"], "max_new_tokens": 1})[0]
        first = t.agent_mask.index(1)
        rows.append(t.ids[:first])
        cols.append(first - 1)
    logits = lm.selected_logits(trainer.model, rows, (torch.arange(len(rows)), torch.tensor(cols)))
    return torch.softmax(logits.float() / trainer.cfg["rollout"]["temperature"], -1)


def make_trainer(tiny_dir, out, algo):
    cfg = config.load(None, [f"model.name_or_path={tiny_dir}", "model.warm_start=", f"out_dir={out}", f"algo={algo}", "train.steps=6",
                             "train.personas_per_step=4", "train.group_size=8", "train.micro_batch=16",
                             "rollout.max_new_tokens=3", "rollout.temperature=0.5", "simulator.max_turns=1",
                             "simulator.appraiser=lexical", "simulator.utterance=template", "train.lr=3e-2",
                             "train.warmup_steps=0", "train.minibatches=1",   # lr 3e-2 is tuned for one step a step
                             "personas.eval_n=2", "personas.curriculum_steps=0", "stpr.mode=" +
                             ("outcome" if algo == "grpo" else "direction"), "seed=1"])
    return savpo.Trainer(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def winning(tiny_dir, tmp_path_factory, tokenizer):
    """Words whose first tokens hold ~30% of the initial policy's first-token mass, and the ids of every
    token that starts such a word (the exact win probability is their mass)."""
    trainer = make_trainer(tiny_dir, tmp_path_factory.mktemp("probe"), "grpo")
    probs = first_token_distribution(trainer, P.sample("merchant_recruitment", 8, seed=7)).mean(0)
    words, mass = [], 0.0
    for tok_id in probs.argsort(descending=True).tolist():
        word = tokenizer.decode([tok_id]).strip()
        if len(word) >= 2 and word.isalpha() and not any(w.startswith(word) or word.startswith(w) for w in words):
            words.append(word)
            mass += float(probs[tok_id])
        if mass >= 0.3:
            break
    words = tuple(words)
    decoded = tokenizer.batch_decode([[i] for i in range(probs.shape[-1])])
    win_ids = [i for i, w in enumerate(decoded) if w.strip().isalpha() and w.strip().startswith(words)]
    assert 0.3 <= float(probs[win_ids].sum()) < 0.7
    return words, win_ids


def win_probability(trainer, win_ids, personas):
    """The exact chance (no sampling noise) that the first token starts a winning word."""
    return float(first_token_distribution(trainer, personas)[:, win_ids].sum(-1).mean())


@pytest.mark.parametrize("algo", ["grpo", "savpo"])
def test_policy_gradient_raises_success_and_a_sign_flip_lowers_it(tiny_dir, tmp_path, winning, algo, monkeypatch):
    held_out = P.sample("merchant_recruitment", 8, seed=11)
    results = {}
    for sign in (+1, -1):
        trainer = make_trainer(tiny_dir, tmp_path / f"{algo}{sign}", algo)
        trainer.simulator = RiggedSimulator(winning[0])
        before = win_probability(trainer, winning[1], held_out)
        if sign < 0:
            real = losses.stpr_advantages
            monkeypatch.setattr(losses, "stpr_advantages", lambda *a, **k: tuple(
                [-x for x in out] if isinstance(out, list) else -out for out in real(*a, **k)))
        successes = []
        for step in range(5):
            trajs, _, _ = trainer.collect(step)
            successes.append(sum(t.reward for t in trajs) / len(trajs))
            _, per_turn = trainer.advantages(trajs)
            trainer.update(trajs, per_turn, step)
        monkeypatch.undo()
        results[sign] = (before, win_probability(trainer, winning[1], held_out), successes)
    (before, after, successes), (before_flip, after_flip, _) = results[+1], results[-1]
    assert 0.05 < successes[0] < 0.95                 # the initial policy wins some calls and loses others
    assert after > before + 0.15                       # held-out chance of a winning opening rises ...
    assert after_flip < before_flip - 0.1              # ... and falls when the advantage's sign is flipped
