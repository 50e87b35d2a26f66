"""Learn-to-Ask, part 1: offline logs -> (context, observed future) samples.

    python -m learn_to_ask make-logs     # sample logs: our simulator's customers vs a privileged expert
    python -m learn_to_ask prepare       # logs -> samples with decision_truth / info_truth, train/test split

A log is one call per JSONL line: `session_id` and `messages` (role, content). `split_session` cuts it
after every run of customer (user) messages: the *context* is the full prefix, the *observed future*
gives the targets -- `decision_truth` = stop iff no customer message remains in the future, else
continue; `info_truth` = what the expert goes on to ask about (exact `probes` labels where the logs
carry them, else an LLM extractor prompt). A malformed line is reported as FILE:LINE and skipped.

`make-logs` writes such logs without a model: the Cognitive User Simulator (lexical appraiser, bank
lines) against a *scripted privileged expert* that sees the hidden concerns, asks about each
(data/logs/expert_questions.yaml), answers each once voiced with the bank's fact, asks for the
decision and stops; its messages carry exact labels.
"""

import collections
import hashlib
import os
import random
import re

import torch

import config
import lm
import personas as P
import runfiles
import simulator as S
from kvbatch import KVBatch

ROLES = ("system", "user", "assistant")
PUSH_LINES = ["So, shall I get you started today?", "Would you like to sign up today?",
              "Are you ready to get started?"]


class LogError(ValueError):
    """A user's log or label file cannot be used; the message names the file (and line)."""


def _check_session(record, seen):
    """Why a parsed log line is not a usable session, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("session_id"), (str, int)):
        return "missing 'session_id'"
    if record["session_id"] in seen:
        return f"duplicate session_id {record['session_id']!r}"
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"messages[{k}] needs 'role' (system/user/assistant) and a string 'content'"
        if "probes" in m and not (isinstance(m["probes"], list) and all(isinstance(p, str) for p in m["probes"])):
            return f"messages[{k}].probes must be a list of strings"
    return None


def read_logs(path, on_bad_line="skip", log=print):
    """Sessions from a JSONL log, one per line. A malformed line -- not UTF-8, not JSON, not a session --
    is reported as 'FILE:LINE: reason' and skipped (`on_bad_line=skip`) or stops the run (`refuse`); the
    skipped lines are said in one line (the first few named). Returns (sessions, problems)."""
    if not os.path.isfile(path):
        raise LogError(f"log file '{path}' does not exist; run `python -m learn_to_ask make-logs` or set "
                       f"learn_to_ask.logs to your JSONL logs.")
    sessions, problems, seen = [], [], set()
    try:
        lines = runfiles.jsonl_lines(path)
    except OSError as e:
        raise LogError(f"log file '{path}' cannot be read ({e.strerror or type(e).__name__}).") from None
    for line in lines:
        reason = line.problem or _check_session(line.record, seen)
        if reason:
            problem = f"{path}:{line.number}: {reason}"
            if on_bad_line == "refuse":
                raise LogError(problem + "; fix the line or set learn_to_ask.on_bad_line=skip.")
            problems.append(problem)
            continue
        seen.add(line.record["session_id"])
        sessions.append(line.record)
    if problems:
        log(f"skipped {len(problems)} malformed line{'s' * (len(problems) > 1)} of {path}: "
            + "; ".join(p[len(path) + 1:] for p in problems[:3]) + ("; ..." if len(problems) > 3 else ""))
    return sessions, problems


def split_session(session, labels=True):
    """One sample per run of user messages: context = the *full* prefix up to and including it.
    decision_truth = 'stop' iff no user message remains in the future. With `labels`, info_truth is
    every concern the expert asks about in the future (`probes` of later assistant messages, in order,
    as text from the session's `hidden_concerns`); otherwise it is left None for the LLM extractor.

    Example: [user "Hello?", assistant (probes a), user "worry a", assistant (push), user "yes"] gives
    three samples: after "Hello?" (continue, info [a]), after "worry a" (continue, info [] -> to be
    dropped by `drop_empty`), after "yes" (stop)."""
    msgs, samples, i = session["messages"], [], 0
    texts = session.get("hidden_concerns", {})
    while i < len(msgs):
        while i < len(msgs) and msgs[i]["role"] != "user":
            i += 1
        if i == len(msgs):
            break
        while i < len(msgs) and msgs[i]["role"] == "user":
            i += 1
        future = msgs[i:]
        ids = list(dict.fromkeys(p for m in future if m["role"] == "assistant" for p in m.get("probes", [])))
        samples.append({
            "sample_id": f"{session['session_id']}#{len(samples)}", "session_id": session["session_id"],
            "domain": session.get("domain"),
            "context": [{"role": m["role"], "content": m["content"]} for m in msgs[:i]],
            "future": [{"role": m["role"], "content": m["content"]} for m in future],
            "decision_truth": "continue" if any(m["role"] == "user" for m in future) else "stop",
            "info_ids": ids if labels else [],
            "info_truth": [texts.get(x, x) for x in ids] if labels else None})
    return samples


def drop_empty(samples):
    """Samples that should continue but have nothing to ask about teach nothing: (kept, n_dropped)."""
    kept = [s for s in samples if s["decision_truth"] == "stop" or s["info_truth"]]
    return kept, len(samples) - len(kept)


def extractor_prompt(future):
    lines = "\n".join(f"{'Agent' if m['role'] == 'assistant' else 'Customer'}: {m['content']}"
                      for m in future if m["role"] != "system")
    return (f"Here is the rest of a sales call.\n{lines}\n\nList the customer worries that the agent asks "
            f"about, one per line starting with '- '. If there are none, write '- none'.\nWorries:\n- ")


def parse_info_list(text, limit=5):
    """Robust parse of the extractor's list: bullets or numbers, quotes and 'none' tolerated."""
    items = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:(?:[-*\u2022]|\d+[.)])\s*)+", "", line).strip().strip("'\"").strip()
        if line and line.lower().rstrip(".") not in ("none", "nothing", "n/a") and \
                line.lower() not in (x.lower() for x in items):
            items.append(line[:120])
    return items[:limit]


@torch.no_grad()
def llm_extract(model, tokenizer, futures, max_new_tokens=48, batch_size=8):
    """info_truth for each future by the extractor prompt, greedy, adapter disabled."""
    from tqdm import tqdm
    eos = lm.end_of_turn_ids(tokenizer)[0]
    out = []
    for start in tqdm(range(0, len(futures), batch_size), desc="extract info_truth", unit="batch", leave=False):
        batch = KVBatch(model, tokenizer.pad_token_id, adapter=False)
        for k, fut in enumerate(futures[start:start + batch_size]):
            batch.add(k, lm.encode(tokenizer, extractor_prompt(fut)))
        gen = batch.generate(max_new_tokens, {eos, tokenizer.eos_token_id})
        out += [parse_info_list(tokenizer.decode(gen[k][0], skip_special_tokens=True)) for k in sorted(gen)]
    return out


def is_test(session_id, test_fraction):
    return int(hashlib.sha1(str(session_id).encode()).hexdigest(), 16) % 1000 < test_fraction * 1000


def call_details(persona):
    """The logged system message: the agent's role and goal and the public CRM card (no facts, to keep
    prompts short on a CPU; the policy only asks)."""
    agent = P.load_bank(persona.domain)["agent"]
    return f"You are {agent['role']}, on a phone call. Your goal: {agent['goal']}. {P.public_view(persona)}"


def expert_session(persona, questions, sim_cfg, seed):
    """One logged call. The expert sees the hidden concerns: it probes them one by one (a `guarded`
    concern twice), answers each revealed concern with the bank's fact in its next turn, then asks
    for the decision and stops after the customer's reply. Returns the session record."""
    bank = P.load_bank(persona.domain)
    sim = S.CognitiveUserSimulator(sim_cfg, seed=seed)
    opening = sim.reset([persona])[0]
    rng = random.Random(f"{seed}:{persona.persona_id}")
    messages = [{"role": "system", "content": call_details(persona)}, {"role": "user", "content": opening}]
    pending, asked, answer = list(persona.concerns), {}, ""
    greeting = f"Hi, this is Sam from {bank['agent']['company']}."
    while True:
        if pending:
            concern = pending[0]
            question, probes = questions[persona.domain][concern.id][min(asked.get(concern.id, 0), 1)], [concern.id]
            asked[concern.id] = asked.get(concern.id, 0) + 1
        else:
            question, probes = rng.choice(PUSH_LINES), []
        text = " ".join(x for x in (greeting, answer, question) if x)
        user, states, done = sim.step([text])
        messages += [{"role": "assistant", "content": text, "probes": probes}, {"role": "user", "content": user[0]}]
        state, greeting = states[0], ""
        answer = " ".join(c.resolution for c in persona.concerns if c.id in state.events["revealed"])
        if pending and (state.concern_status[pending[0].id] != "hidden" or asked[pending[0].id] >= 2):
            pending.pop(0)
        if done[0] or not probes:
            break
    return {"session_id": persona.persona_id, "domain": persona.domain, "outcome": state.decision,
            "hidden_concerns": {c.id: f"{c.id.replace('_', ' ')}: {c.statement}" for c in persona.concerns},
            "messages": messages}


def check_questions(questions, domains, path):
    """Each expert question must name a probe cue of its own concern and of no other concern of the
    domain, hold one question mark and no push cue: then the logged `probes` labels are exact."""
    for domain in domains:
        bank = P.load_bank(domain)
        for concern in bank["concerns"]:
            pair = (questions.get(domain) or {}).get(concern["id"])
            if not (isinstance(pair, list) and len(pair) == 2):
                raise LogError(f"{path}: {domain}.{concern['id']} needs a list of two questions.")
            for q in pair:
                low = q.lower()
                hits = [c["id"] for c in bank["concerns"] if any(cue in low for cue in c["probe_cues"])]
                if hits != [concern["id"]] or q.count("?") != 1 or any(cue in low for cue in bank["push_cues"]):
                    raise LogError(f"{path}: {domain}.{concern['id']}: '{q}' must probe this concern only "
                                   f"(it probes {hits or 'nothing'}), ask one question and not push.")


def make_logs(cfg):
    lt = cfg["learn_to_ask"]
    try:
        questions = config.read_yaml(lt["expert_questions"], "expert question file")
    except config.ConfigError as e:
        raise LogError(str(e)) from None
    if not isinstance(questions, dict):
        raise LogError(f"{lt['expert_questions']}: must map each domain to {{concern id: [two questions]}}.")
    check_questions(questions, lt["domains"], lt["expert_questions"])
    sim_cfg = {**cfg["simulator"], "appraiser": "lexical", "utterance": "template", "max_turns": 10}
    personas = P.sample_many(lt["domains"], lt["log_sessions"], lt["log_seed"])
    sessions = [expert_session(p, questions, sim_cfg, lt["log_seed"]) for p in personas]
    runfiles.write_jsonl(lt["logs"], sessions)
    n_c = sum(len(s["hidden_concerns"]) for s in sessions)
    probed = sum(len({p for m in s["messages"] for p in m.get("probes", [])}) for s in sessions)
    print(f"wrote {len(sessions)} sessions ({', '.join(lt['domains'])}) to {lt['logs']} "
          f"({os.path.getsize(lt['logs']) / 1024:.0f} KiB); the expert probed {probed}/{n_c} hidden concerns; "
          f"outcomes: {dict(collections.Counter(s['outcome'] for s in sessions))}")


def prepare(cfg):
    lt = cfg["learn_to_ask"]
    sessions, problems = read_logs(lt["logs"], lt["on_bad_line"])
    if not sessions:
        raise LogError(f"{lt['logs']}: no usable session ({len(problems)} malformed lines skipped); a log holds one "
                       f"JSON object per line with session_id and messages (role, content).")
    if lt["max_sessions"]:
        sessions = sessions[:lt["max_sessions"]]
    labels = lt["extractor"] == "labels"
    if labels and not any("probes" in m for s in sessions for m in s["messages"]):
        raise LogError(f"{lt['logs']}: no assistant message carries 'probes' labels; use learn_to_ask.extractor=llm.")
    samples = [x for s in sessions for x in split_session(s, labels)]
    if not labels:                              # a stop sample needs no info_truth
        tokenizer, model = lm.load_model(cfg["model"])
        todo = [s for s in samples if s["decision_truth"] == "continue"]
        for s, info in zip(todo, llm_extract(model, tokenizer, [s["future"] for s in todo], lt["extractor_max_tokens"])):
            s["info_truth"] = info
    kept, dropped = drop_empty(samples)
    path = samples_path(cfg)
    for s in kept:
        s["split"] = "test" if is_test(s["session_id"], lt["test_fraction"]) else "train"
    runfiles.write_jsonl(path, ({k: v for k, v in s.items() if k != "future"} for s in kept))
    count = lambda split, d: sum(s["split"] == split and s["decision_truth"] == d for s in kept)
    print(f"{len(sessions)} sessions ({len(problems)} malformed lines skipped) -> {len(kept)} samples "
          f"(train: {count('train', 'continue')} continue / {count('train', 'stop')} stop, test: "
          f"{count('test', 'continue')} / {count('test', 'stop')}); dropped {dropped} continue samples with "
          f"empty info_truth; extractor {lt['extractor']}; wrote {path}")


def samples_path(cfg):
    return cfg["learn_to_ask"]["samples"] or os.path.join(cfg["learn_to_ask"]["out_dir"], "samples.jsonl")


SAMPLE_FIELDS = {"sample_id": str, "session_id": (str, int), "context": list, "decision_truth": str, "info_ids": list,
                 "split": str}


def load_samples(cfg, split):
    """The samples of one split ('train' or 'test') of the samples file `prepare` wrote; a line that is
    not such a sample is a LogError naming FILE:LINE."""
    path = samples_path(cfg)
    if not os.path.isfile(path):
        raise LogError(f"samples file '{path}' does not exist; run `python -m learn_to_ask prepare` first.")
    out = []
    for line in runfiles.jsonl_lines(path):
        record = line.record
        bad = line.problem or ("not a JSON object" if not isinstance(record, dict) else next(
            (f"'{k}' is missing or not a {getattr(t, '__name__', 'text')}" for k, t in SAMPLE_FIELDS.items()
             if not isinstance(record.get(k), t)), None))
        if not bad and _check_session({"session_id": 0, "messages": record["context"] or [{}]}, set()):
            bad = "'context' must be a list of messages with 'role' and a string 'content'"
        if bad:
            raise LogError(f"{path}:{line.number}: {bad}; write the samples with `python -m learn_to_ask prepare`.")
        if record["split"] == split:
            out.append(record)
    if not out:
        raise LogError(f"samples file '{path}' holds no {split} samples; run `python -m learn_to_ask prepare` "
                       f"(learn_to_ask.test_fraction sets the split).")
    return out
