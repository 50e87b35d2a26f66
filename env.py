"""The Cognitive User Simulator behind the Gymnasium API: `CallEnv` (one call) and `CallBatch` (many calls).

    import env
    call = env.CallEnv(config.load(None, ["simulator.appraiser=lexical"]))
    obs, info = call.reset(seed=0, options={"domain": "merchant_recruitment", "persona": 3})
    obs, reward, terminated, truncated, info = call.step("Hi, this is Sam. Is anything worrying you?")

docs/env.md has a full call driven by `model.generate`. Multi-turn RL frameworks (Gymnasium in UserRL,
skyrl-gym, tau2-bench; OpenEnv in TRL) expect `reset` / `step` with what the policy must not see kept in
`info`; this is that, as a thin layer over the very simulator the trainer uses (`simulator.step`: the same
appraisal, `transition` and user lines, no second rule set; a test replays rollout.run's calls through it).

What the agent sees (the observation, a Dict of three texts) is what the deployed policy sees in
rollout.py, and nothing else:
  card    the CRM card (personas.public_view): the callee's name, role and observable traits;
  system  the agent's system block (personas.agent_system_prompt: the card, the company's facts, how a
          call goes) -- the same for every persona with the same card;
  line    the callee's latest line (the opening at reset).
What it must not see is in `info` only: `hidden_concerns` (id -> the callee's words), `privileged_note`
(the teacher's note, personas.private_view), and the simulator's `state` after the turn (each concern's
status, willingness, patience, decision) with the turn's `events` (what the rule read in it: probed,
addressed, false claims, ...), `delta_willingness` (STPR's direction) and the simulator's `health` counts
since the reset.

Choices where Gymnasium leaves room:
  - reward: 1.0 on the turn the callee accepts, else 0.0 (the trainer's binary outcome); the willingness
    shift of each turn rides in `info["delta_willingness"]`, not in the reward, so a trainer picks its own
    shaping (STPR uses it as a direction only).
  - terminated: the callee decided (accept, reject, hang-up); truncated: the turn budget
    (`simulator.max_turns`) ran out ('timeout') -- a time limit, in Gymnasium's sense.
  - text spaces: `gymnasium.spaces.Text` checks every character against a finite charset; a model may write
    any Unicode character (a curly quote, a euro sign, an emoji), and a BMP-wide charset costs 0.6 s to
    build and still misses emoji. So `Utterance` is a Text of up to `MAX_CHARS` characters that samples from
    printable ASCII (what the environment checker feeds it) and contains any string without control
    characters other than newline and tab. The env never rewrites a text to fit a space.
  - seeding: reset(seed=s) fixes the persona drawn (when none is given) and the simulator's seed (openings,
    fallback lines, sampled lines) -- the seed `rollout.run(seed=s)` gives the simulator, so a call replays
    the same; reset() without a seed continues from the env's `np_random`.

`CallBatch` steps many calls together, the way rollout.py does: one `simulator.step` per turn, so one
appraiser call (one encoder batch, one batched LLM forward, or one round of endpoint requests) for all live
calls. It returns lists; a call that had already ended gets None as its observation and info.
"""

import gymnasium as gym
from gymnasium import spaces

import config
import personas as P
import simulator as S

MAX_CHARS = 8192        # per text: the system block is ~1,700 characters, a callee line a few hundred
CONTROL = frozenset(chr(c) for c in range(32) if chr(c) not in "\n\t") | {chr(127)}
PRINTABLE = "".join(chr(c) for c in range(32, 127)) + "\n"


class Utterance(spaces.Text):
    """A text of 0..MAX_CHARS characters: any Unicode without control characters (see the module docstring);
    `sample()` draws printable ASCII."""

    def __init__(self, max_length=MAX_CHARS, seed=None):
        super().__init__(max_length, min_length=0, charset=PRINTABLE, seed=seed)

    def contains(self, x):
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length and not CONTROL & set(x)

    def __repr__(self):
        return f"Utterance(0, {self.max_length}, any text without control characters)"


def observation_space():
    return spaces.Dict({"card": Utterance(), "system": Utterance(), "line": Utterance()})


def outcome(decision):
    """(reward, terminated, truncated) of a call whose simulator decision is `decision`."""
    return float(decision == "accept"), decision in ("accept", "reject", "hangup"), decision == "timeout"


class CallBatch:
    """Many calls at once over one CognitiveUserSimulator. `reset(personas, seed) -> (observations, infos)`;
    `step(agent_turns) -> (observations, rewards, terminated, truncated, infos)`, lists over the calls of the
    last reset. `cfg`: a full config (config.load()); `model` / `tokenizer`: the in-process simulator model
    where the configuration needs one (llm lines or a model appraiser without an endpoint); `note`: the style
    of `info["privileged_note"]` (aopsd.note)."""

    def __init__(self, cfg=None, model=None, tokenizer=None, seed=0, simulator=None, note=None):
        self.cfg = cfg or config.load()
        self.simulator = simulator or S.CognitiveUserSimulator(self.cfg["simulator"], model, tokenizer, seed=seed)
        self.note = note or self.cfg["aopsd"]["note"]
        self.personas = []

    def reset(self, persona_list, seed=None):
        self.personas = list(persona_list)
        openings = self.simulator.reset(self.personas, seed=seed)
        self.stats_at_reset = dict(self.simulator.stats)
        self.over = [False] * len(self.personas)
        return ([observation(p, line) for p, line in zip(self.personas, openings)],
                [self.info(i) for i in range(len(self.personas))])

    def step(self, agent_turns):
        """One agent turn for every call (ignored for calls that have ended): one simulator step."""
        agent_turns = list(agent_turns)
        if len(agent_turns) != len(self.personas):
            raise ValueError(f"step got {len(agent_turns)} agent turns for {len(self.personas)} calls; give one per call.")
        bad = [i for i, (t, over) in enumerate(zip(agent_turns, self.over)) if not over and not isinstance(t, str)]
        if bad:
            raise TypeError(f"an agent turn must be a text (str); call {bad[0]} got {type(agent_turns[bad[0]]).__name__}.")
        live = [not over for over in self.over]
        user_lines, states, done = self.simulator.step(agent_turns)
        obs, rewards, terminated, truncated, infos = [], [], [], [], []
        for i, (p, line, state) in enumerate(zip(self.personas, user_lines, states)):
            reward, term, trunc = outcome(state.decision)
            if not live[i]:          # ended before this step: nothing new
                obs.append(None), infos.append(None), rewards.append(0.0)
            else:
                obs.append(observation(p, line)), infos.append(self.info(i)), rewards.append(reward)
            terminated.append(term), truncated.append(trunc)
        self.over = list(done)
        return obs, rewards, terminated, truncated, infos

    def info(self, i):
        """Everything about call i the agent must not see: the persona's hidden side and the simulator's state."""
        p, state = self.personas[i], self.simulator.states[i]
        return {"persona_id": p.persona_id, "domain": p.domain, "stratum": p.stratum,
                "hidden_concerns": {c.id: c.statement for c in p.concerns},
                "privileged_note": P.private_view(p, self.note),
                "state": state.to_dict(), "events": dict(state.events), "decision": state.decision,
                "willingness": state.willingness, "delta_willingness": state.delta_willingness,
                "turn": state.turn, "health": self.health()}

    def health(self):
        """The simulator's health counts (simulator.stats: fallback lines, parse failures, endpoint failures...)
        since the last reset, over every call of the batch."""
        return {k: v - self.stats_at_reset.get(k, 0) for k, v in self.simulator.stats.items()}


def observation(persona, line):
    """What the agent sees: public information and the callee's latest line, never a hidden concern."""
    return {"card": P.public_view(persona), "system": P.agent_system_prompt(persona), "line": line}


ENV_ID = "savpo/CallEnv-v0"     # gymnasium.make(ENV_ID, cfg=..., render_mode="ansi") after `import env`


class CallEnv(gym.Env):
    """One outbound call as a Gymnasium environment (a `CallBatch` of one). reset(seed=, options=) with
    options {"domain": a bank name, "persona": a personas.Persona, its dict (personas.jsonl), or an int k --
    the k-th persona of the domain's stratified stream at `personas.train_seed`}; without a persona one is
    drawn from the env's RNG (and without a domain, one of `personas.domains`)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}   # a call has no frame rate; the checker wants one

    def __init__(self, cfg=None, model=None, tokenizer=None, render_mode=None, simulator=None):
        self.batch = CallBatch(cfg, model, tokenizer, simulator=simulator)
        self.cfg = self.batch.cfg
        self.observation_space = observation_space()
        self.action_space = Utterance()
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r} is not offered; use 'ansi' (the transcript) or None.")
        self.render_mode = render_mode
        self.transcript = []
        self.over = True

    def _persona(self, options):
        domains = self.cfg["personas"]["domains"]
        domain = options.get("domain") or domains[int(self.np_random.integers(len(domains)))]
        persona = options.get("persona")
        if isinstance(persona, P.Persona):
            return persona
        if isinstance(persona, dict):
            return P.Persona.from_dict(persona)
        P.check_domains([domain])
        if persona is None:
            return P.sample(domain, 1, seed=int(self.np_random.integers(2 ** 31)))[0]
        if isinstance(persona, int) and not isinstance(persona, bool) and persona >= 0:
            return P.sample(domain, persona + 1, self.cfg["personas"]["train_seed"])[persona]
        raise ValueError(f"options['persona'] is {persona!r}; give a personas.Persona, its dict, or an index >= 0.")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        persona = self._persona(dict(options or {}))
        sim_seed = seed if seed is not None else int(self.np_random.integers(2 ** 31))
        obs, infos = self.batch.reset([persona], seed=sim_seed)
        self.over = False
        self.transcript = [("callee", obs[0]["line"])]
        return obs[0], infos[0]

    def step(self, action):
        if self.over:
            raise RuntimeError("this call has ended (or never started); call reset() to start the next one.")
        obs, rewards, terminated, truncated, infos = self.batch.step([action])
        self.over = terminated[0] or truncated[0]
        self.transcript += [("agent", action), ("callee", obs[0]["line"])]
        return obs[0], rewards[0], terminated[0], truncated[0], infos[0]

    def render(self):
        if self.render_mode == "ansi":
            return "\n".join(f"{who:>6}: {text}" for who, text in self.transcript) + "\n"
        return None


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=CallEnv)
