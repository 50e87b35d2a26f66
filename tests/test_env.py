"""env.py: CallEnv passes Gymnasium's checker, keeps the hidden concerns in `info` only, is the trainer's own
simulator (it replays rollout.run's calls exactly), and CallBatch makes one appraiser call per turn."""
import dataclasses
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import config
import env
import personas as P
import rollout
import scripted_agents as SA
import simulator as S

DOMAINS = ["merchant_recruitment", "courier_recruitment", "broadband_switch"]


@pytest.fixture
def lexical_cfg():
    return config.load(None, ["simulator.appraiser=lexical", "simulator.utterance=template"])


def test_callenv_passes_the_gymnasium_env_checker(lexical_cfg):
    """check_env resets with seeds, samples actions from the action space, checks every observation against the
    observation space and that the same seed and actions give the same observations, rewards and infos."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a checker warning (e.g. an observation outside its space) fails
        check_env(gym.make(env.ENV_ID, cfg=lexical_cfg, render_mode="ansi").unwrapped)
    call = env.CallEnv(lexical_cfg)
    assert call.action_space.contains("Hi — is the 15 % commission a worry? “Yes” €5 😀")   # any Unicode text
    assert not call.action_space.contains("a\x00b") and not call.action_space.contains(7)


def text_of(obs):
    return "\n".join(obs.values())


def test_hidden_concerns_are_in_info_never_in_the_observation(lexical_cfg):
    """Played by the privileged prober (it wins calls, so concerns go hidden -> revealed -> resolved): while a
    concern is hidden, neither the callee's words for it nor the privileged note appear in any observation;
    `info` always holds both. Once revealed, the callee says it (so the check is not vacuous)."""
    people = P.sample_many(DOMAINS, 6, seed=3)
    transcripts = []
    SA.play_scripted(SA.privileged_prober, people, lexical_cfg["simulator"], transcripts=transcripts)
    batch = env.CallBatch(lexical_cfg)
    obs, infos = batch.reset(people, seed=0)
    seen_revealed, accepted = 0, 0
    for k in range(1, max(len(t["messages"]) for t in transcripts), 2):
        turns = [t["messages"][k]["content"] if k < len(t["messages"]) else "" for t in transcripts]
        for o, info, p in zip(obs, infos, people):
            if o is None:
                continue
            assert info["hidden_concerns"] == {c.id: c.statement for c in p.concerns}
            assert info["privileged_note"] == P.private_view(p, lexical_cfg["aopsd"]["note"])
            assert info["privileged_note"] not in text_of(o)
            for c in p.concerns:
                if info["state"]["concern_status"][c.id] == "hidden":
                    assert c.statement not in text_of(o), f"{c.id} leaked while hidden"
                else:
                    seen_revealed += c.statement in o["line"] and c.id in info["events"]["revealed"]
        obs, rewards, terminated, truncated, infos = batch.step(turns)
        accepted += sum(r == 1.0 and t for r, t in zip(rewards, terminated))
    assert seen_revealed >= 3 and accepted >= 3


def test_the_observation_depends_on_public_information_only(lexical_cfg):
    """Two callees alike in everything the agent may see but with different hidden concerns: the same
    observation at reset (the card, the system block, the opening line)."""
    a = P.sample("merchant_recruitment", 1, seed=0)[0]
    bank = P.load_bank("merchant_recruitment")
    others = [c for c in bank["concerns"] if c["id"] not in {x.id for x in a.concerns}][:2]
    b = dataclasses.replace(a, concerns=[P.Concern(**{**{k: c[k] for k in P._CONCERN_FIELDS}, "severity": 2}) for c in others])
    call = env.CallEnv(lexical_cfg)
    obs_a, info_a = call.reset(seed=1, options={"persona": a})
    obs_b, info_b = call.reset(seed=1, options={"persona": b})
    assert obs_a == obs_b and info_a["hidden_concerns"] != info_b["hidden_concerns"]
    assert a.name in obs_a["card"] and obs_a["card"] in obs_a["system"]


def test_callbatch_replays_the_native_rollout_exactly(cfg, tokenizer, stopping_model):
    """No second rule set: the agent turns of rollout.run's calls (G = 2 per persona), replayed through
    CallBatch with the rollout's seed, give the same callee lines, states, decisions and rewards."""
    sim_cfg = {**cfg["simulator"], "appraiser": "lexical", "utterance": "template", "max_turns": 3}
    people = P.sample_many(DOMAINS, 3, seed=0)
    sim = S.CognitiveUserSimulator(sim_cfg, seed=0)
    trajs = rollout.run(stopping_model, tokenizer, sim, people, {**cfg["rollout"], "max_new_tokens": 8,
                                                                "temperature": 0.7}, group_size=2, seed=11)
    batch = env.CallBatch({**cfg, "simulator": sim_cfg})
    obs, _ = batch.reset([t.persona for t in trajs], seed=11)
    assert [o["line"] for o in obs] == [t.messages[0]["content"] for t in trajs]
    rewards = [0.0] * len(trajs)
    for k in range(max(t.n_turns for t in trajs)):
        turns = [t.messages[1 + 2 * k]["content"] if k < t.n_turns else "" for t in trajs]
        obs, r, terminated, truncated, infos = batch.step(turns)
        for i, t in enumerate(trajs):
            if k < t.n_turns:
                assert obs[i]["line"] == t.messages[2 + 2 * k]["content"]
                assert infos[i]["state"] == t.states[k]
                rewards[i] += r[i]
                assert (terminated[i] or truncated[i]) == (k == t.n_turns - 1)
            else:
                assert obs[i] is None and infos[i] is None
    assert rewards == [t.reward for t in trajs]
    assert {t.decision for t in trajs} - {"accept", "reject", "hangup", "timeout"} == set()


def test_callbatch_makes_one_appraiser_call_per_turn_and_matches_single_calls(lexical_cfg):
    """Batched as the native rollout is: every step appraises all live calls in one call; and each call plays
    the same in the batch as alone in a CallEnv (its randomness is keyed by persona, not batch position)."""
    people = P.sample_many(DOMAINS, 4, seed=5)
    batch = env.CallBatch(lexical_cfg)
    inner, calls = batch.simulator.appraiser, []

    def counting(texts, *args, **kwargs):
        calls.append(len(texts))
        return inner(texts, *args, **kwargs)

    counting.parse_failures = 0
    batch.simulator.appraiser = counting
    turns = ["Hi, is anything about this worrying you?", "How do you feel about the costs?",
             "Shall I get you started today?", "Shall I get you started today?"]
    obs, _ = batch.reset(people, seed=2)
    lines, live = [[o["line"]] for o in obs], []
    for turn in turns:
        live.append(sum(not over for over in batch.over))
        obs, *_ = batch.step([turn] * len(people))
        for i, o in enumerate(obs):
            if o is not None:
                lines[i].append(o["line"])
    assert calls == live and calls[0] == len(people) and live[-1] < len(people)
    for p, expected in zip(people, lines):
        call = env.CallEnv(lexical_cfg)
        o, _ = call.reset(seed=2, options={"persona": p})
        alone = [o["line"]]
        for turn in turns:
            o, _, terminated, truncated, _ = call.step(turn)
            alone.append(o["line"])
            if terminated or truncated:
                break
        assert alone == expected


def test_callenv_reset_options_seeding_and_misuse(lexical_cfg):
    call = env.CallEnv(lexical_cfg)
    first = call.reset(seed=7)
    assert call.reset(seed=7) == first                       # a seed fixes the persona drawn and the opening
    obs, info = call.reset(seed=0, options={"domain": "courier_recruitment", "persona": 2})
    assert info["persona_id"] == P.sample("courier_recruitment", 3, lexical_cfg["personas"]["train_seed"])[2].persona_id
    with pytest.raises(ValueError, match="options\\['persona'\\]"):
        call.reset(options={"persona": "someone"})
    with pytest.raises(TypeError, match="must be a text"):
        call.step(42)
    while True:
        _, reward, terminated, truncated, info = call.step("Shall I get you started today?")
        if terminated or truncated:
            break
    assert reward == 0.0 and info["decision"] in ("reject", "hangup", "timeout")
    assert truncated == (info["decision"] == "timeout")
    with pytest.raises(RuntimeError, match="call reset"):
        call.step("hello?")
