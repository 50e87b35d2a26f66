"""Learn-to-Ask: learn when to ask and when to stop from offline dialogue logs (no simulator in the loop).

    python learn_to_ask.py make-logs     # sample logs: our simulator's customers vs a privileged expert
    python learn_to_ask.py prepare       # logs -> (context, observed future) samples, train/test split
    python learn_to_ask.py calibrate learn_to_ask.grader=llm   # grader prompts vs hand labels
    python learn_to_ask.py train         # GRPO + LoRA on the single-step samples (~5 min on a CPU)
    python learn_to_ask.py eval [--adapter runs/learn_to_ask]  # base (no adapter) or trained
    python learn_to_ask.py play [--adapter runs/learn_to_ask]  # online check against the simulator

Learn-to-Ask ("Grounded in Reality", arXiv 2510.25441) turns expert logs into single-step RL samples.
Each log is cut after every run of user messages; the *context* is the full prefix, the *observed
future* gives the targets: `decision_truth` = stop iff no user message remains in the future, else
continue; `info_truth` = what the expert goes on to ask about. The policy answers with a structured
pair, exactly `<action>ONE QUESTION</action><state>ASSESSMENT</state>`, or with the stop marker as
the action, `<action><stop/></action><state>ASSESSMENT</state>`. The reward is
    R = R_s * (1 + beta * R_a) + P          (beta = 2)
with R_s decision correctness, R_a the judged content of the question (0, 0.5, 1) and P its format
(one question 1, two 0.5, more or none 0). A grader scores R_a and P, only when truth and prediction
both continue; a correct stop gets R_a = P = 1; a wrong decision or a malformed reply gets 0.

Our domains are outbound sales calls, so the *agent* (assistant) is the one asking: a sample is cut
at each customer (user) message, the policy gives the agent's next question (probing a hidden
concern) or stops once the customer has given a decision. `make-logs` produces such logs with the
Cognitive User Simulator and a *scripted privileged expert* that sees the hidden concerns, probes
each one (data/logs/expert_questions.yaml), answers it with the bank's fact, asks for the decision,
and stops; its assistant messages carry exact labels (`probes`: the concern ids asked about).

Simplified or chosen here: no KL to a reference (the paper's example uses 0.001) and one epoch per
batch of samples; the reply is prefilled with `<action>` and decoding stops at `</state>` (a stop
string, as peers' `reply_prefix` / vLLM `stop`), because a 135M model rarely writes the tags unaided;
the LLM grader reads each score as a choice among A/B/C by log-probability instead of parsing free
text; the proxy grader (cue matching) stands in for it on the CPU and in tests.
"""

import argparse
import collections
import hashlib
import json
import os
import random
import re
import time

import torch
import yaml

import config
import lm
import personas as P
import savpo
import simulator as S
import rollout
from rollout import KVBatch

POLICY_SYSTEM = (
    "You are the caller on a sales call. Ask one short question at a time to find out what worries the "
    "customer. Reply with exactly two tags:\n"
    "<action> one short question </action><state> what you know so far </state>\n"
    "The call is over as soon as the customer has decided: they said yes, said no, or said goodbye. Then ask "
    "nothing more and reply exactly:\n"
    "<action> <stop/> </action><state> what you know so far </state>\n"
    "Examples:\n"
    "Customer: Hello?\n"
    "Reply: <action> Is there anything about this that worries you? </action><state> No worry named yet. </state>\n"
    "Customer: Okay, let's do it. Sign me up.\n"
    "Reply: <action> <stop/> </action><state> They agreed. </state>")
STOP_TEXT = "</state>"      # decoding stops here: every well-formed reply ends with it
STOP_REPLY = " <stop/>"     # what a stop looks like right after the prefilled "<action>": ' <' 'stop' '/>'
                            # (without the space, the tokenizer merges "><" and the marker is unreachable)
ROLES = ("system", "user", "assistant")
PUSH_LINES = ["So, shall I get you started today?", "Would you like to sign up today?",
              "Are you ready to get started?"]


class LogError(ValueError):
    """A user's log or label file cannot be used; the message names the file (and line)."""


# =============================================================================================
# 1-2. Logs in, observed-future samples out
# =============================================================================================

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
    """Sessions from a JSONL log, one per line. A malformed line is reported as 'FILE:LINE: reason'
    and skipped (`on_bad_line=skip`) or stops the run (`refuse`). Returns (sessions, problems)."""
    if not os.path.exists(path):
        raise LogError(f"log file '{path}' does not exist; run `python learn_to_ask.py make-logs` or set "
                       f"learn_to_ask.logs to your JSONL logs.")
    sessions, problems, seen = [], [], set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                reason = _check_session(record, seen)
            except json.JSONDecodeError as e:
                reason = f"not valid JSON ({e.msg})"
            if reason:
                problem = f"{path}:{lineno}: {reason}"
                if on_bad_line == "refuse":
                    raise LogError(problem + "; fix the line or set learn_to_ask.on_bad_line=skip.")
                problems.append(problem)
                log(f"skipped {problem}")
                continue
            seen.add(record["session_id"])
            sessions.append(record)
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
    eos = lm.end_of_turn_ids(tokenizer)[0]
    out = []
    for start in range(0, len(futures), batch_size):
        batch = KVBatch(model, tokenizer.pad_token_id, adapter=False)
        for k, fut in enumerate(futures[start:start + batch_size]):
            batch.add(k, lm.encode(tokenizer, extractor_prompt(fut)))
        gen = batch.generate(max_new_tokens, {eos, tokenizer.eos_token_id})
        out += [parse_info_list(tokenizer.decode(gen[k][0], skip_special_tokens=True)) for k in sorted(gen)]
    return out


def is_test(session_id, test_fraction):
    return int(hashlib.sha1(str(session_id).encode()).hexdigest(), 16) % 1000 < test_fraction * 1000


# =============================================================================================
# 3-4. Policy output and reward
# =============================================================================================

ACTION_FORMAT = re.compile(r"^\s*<action>(.*?)</action>\s*<state>(.*?)</state>\s*$", re.S)


def parse_action(text):
    """Strict parse of a reply -> (kind, question, assessment), kind in question | stop | malformed.
    '<action>Is cost a worry?</action><state>nothing yet</state>' -> ('question', 'Is cost a worry?',
    'nothing yet'); '<action><stop/></action><state>all known</state>' -> ('stop', '', 'all known');
    anything else (missing tag, empty part, extra text or tags) -> ('malformed', '', '')."""
    m = ACTION_FORMAT.match(text)
    if not m:
        return "malformed", "", ""
    action, state = m.group(1).strip(), m.group(2).strip()
    if not state or "<" in state or ">" in state:
        return "malformed", "", ""
    if re.fullmatch(r"<stop\s*/>", action):
        return "stop", "", state
    if not action or "<" in action or ">" in action:
        return "malformed", "", ""
    return "question", action, state


STOP_MARKER = re.compile(r"<stop\s*/>")


def decide(text, rule="published"):
    """The decision a reply makes, for the reward -> (kind, question, exact).

    rule 'published' (Trinity-RFT's learn2ask `reward_fn`, the default): a reply holding the stop
    marker anywhere is a stop -- `exact` only if the whole reply is the well-formed stop -- and any
    other reply is a "continue" whose question (the <action> text if well formed, else the reply with
    its tags stripped) goes to the grader, which scores its format.
    rule 'strict': only a well-formed reply counts (`parse_action`); anything else is 'malformed'."""
    kind, question, _ = parse_action(text)
    if rule == "strict" or kind != "malformed":
        return kind, question, kind != "malformed"
    if STOP_MARKER.search(text):
        return "stop", "", False
    return "question", re.sub(r"<[^>]*>", " ", text).split(STOP_TEXT)[0].strip(), False


def reward(decision_truth, kind, format_score=0.0, content_score=0.0, mode="default", beta=2.0, exact=True):
    """-> (R, R_s, R_a, P). R_s = 1 iff the decision is right (a malformed reply has none); a right
    stop has R_a = 1 and P = 1 if it is exactly the well-formed stop, else 0 (`exact`); a right
    question takes P and R_a from the grader; a wrong decision scores 0.
    Modes: default R_s (1 + beta R_a) + P | sum R_s + R_a + P | Ra beta R_a + P | Rs (1 + beta) R_s + P.

    Examples (beta = 2): truth continue, a question with format 1, content 0.5 -> default 1 * (1 + 1)
    + 1 = 3.0, sum 2.5, Ra 2.0, Rs 4.0. Truth stop, reply stop -> default 4.0, sum 3.0, Ra 3.0, Rs 4.0;
    a stop with extra text -> default 3.0 (P = 0). Truth stop, reply a question -> 0 in every mode."""
    if kind == "malformed" or (kind == "stop") != (decision_truth == "stop"):
        r_s = r_a = p = 0.0
    elif kind == "stop":
        r_s, r_a, p = 1.0, 1.0, float(exact)
    else:
        r_s, r_a, p = 1.0, float(content_score), float(format_score)
    total = {"default": r_s * (1 + beta * r_a) + p, "sum": r_s + r_a + p,
             "Ra": beta * r_a + p, "Rs": (1 + beta) * r_s + p}[mode]
    return total, r_s, r_a, p


# =============================================================================================
# 5-6. Graders and their calibration
# =============================================================================================

SCORES = (1.0, 0.5, 0.0)          # what the answers A, B, C mean, for format and for content


def format_from_count(n_questions):
    return {1: 1.0, 2: 0.5}.get(n_questions, 0.0)


def proxy_grade(question, reference_ids=(), reference=(), domain=None):
    """Deterministic lexical grader -> (format, content). Format from the number of '?'. Content 1 if
    the question contains a probe cue of a reference concern (or, for logs without a domain bank, a
    5+ letter word of the reference text), 0.5 if it contains any topic or probe cue of the domain,
    else 0. 'Is the commission a worry?' with reference commission_fees -> (1.0, 1.0)."""
    q = question.lower()
    bank = P.load_bank(domain) if domain in P.list_domains() else None
    by_id = {c["id"]: c for c in bank["concerns"]} if bank else {}
    cues = [cue for i in reference_ids if i in by_id for cue in by_id[i]["probe_cues"]]
    if not cues:
        cues = [w for text in reference for w in re.findall(r"[a-z]{5,}", text.lower())]
    domain_cues = bank["topic_cues"] + [c for x in bank["concerns"] for c in x["probe_cues"]] if bank else []
    content = 1.0 if any(c in q for c in cues) else 0.5 if any(c in q for c in domain_cues) else 0.0
    return format_from_count(question.count("?")), content


RUBRIC = {"format": "A = the agent's last message contains exactly one question; B = it contains two "
                    "questions; C = it contains three or more questions, or none.",
          "content": "A = the question directly asks about an item of the reference information; B = it is "
                     "highly relevant to an item but does not ask about it directly; C = it is irrelevant "
                     "to every item."}
SHOTS = [  # (reference, question, format answer, content answer) for the few-shot variant
    ("commission fees: your commission would eat my margin", "Is the commission something that worries you?", "A", "A"),
    ("bad weather: I won't ride in freezing rain", "Do you have a bike? What about a helmet? And a phone?", "C", "C"),
    ("installation hassle: no drilling, no day off", "Would an evening slot suit you? Do you own the house?", "B", "B"),
]


def grader_prompt(variant, item, aspect):
    """Plain-text prompt ending where the grader's answer letter (A/B/C) comes next."""
    ref = "; ".join(item["reference"]) or "none"
    if variant == "short":
        if aspect == "format":
            return f'Message: "{item["question"]}"\nHow many questions does it ask? A = one, B = two, C = three or more, or none.\nAnswer:'
        return (f'Topics: {ref}\nQuestion: "{item["question"]}"\nDoes the question ask about one of the topics? '
                f'A = directly, B = something closely related, C = unrelated.\nAnswer:')
    head = (f"You grade the last message of a salesperson on a call. {aspect.capitalize()} score: "
            f"{RUBRIC[aspect]}\n\n")
    body = lambda r, ctx, q: (f"Reference information: {r}\nCustomer said: {ctx}\nAgent's last message: "
                              f"\"{q}\"\n{aspect.capitalize()} score (A, B or C):")
    shots = ""
    if variant == "fewshot":
        shots = "".join(body(r, "Hello?", q) + f" {f if aspect == 'format' else c}\n\n" for r, q, f, c in SHOTS)
    return head + shots + body(ref, item.get("context", "") or "-", item["question"])


def choice_logprobs(model, tokenizer, prompts, batch_size=8):
    """log P(A), log P(B), log P(C) of the next token (with and without a leading space pooled),
    renormalised over the three, adapter disabled. (N, 3)."""
    letters = [[lm.encode(tokenizer, " " + x)[0], lm.encode(tokenizer, x)[0]] for x in "ABC"]
    logp = lm.next_token_logprobs(model, tokenizer, prompts, batch_size)                     # (N, V)
    pooled = torch.stack([torch.logsumexp(logp[:, t], -1) for t in letters], -1)          # (N, 3)
    return torch.log_softmax(pooled, -1)


def llm_scores(model, tokenizer, items, variant):
    """-> (raw (N, 2, 3) log-probs for [format, content] x [A, B, C], bias (2, 3) on a content-free
    item, for contextual calibration: a small model's preference for one letter cancels out)."""
    base = variant.split("+")[0]
    prompts = [grader_prompt(base, it, a) for it in items for a in ("format", "content")]
    empty = {"question": "N/A", "reference": ["N/A"], "context": "N/A"}
    prompts += [grader_prompt(base, empty, a) for a in ("format", "content")]
    lp = choice_logprobs(model, tokenizer, prompts)
    return lp[:-2].view(len(items), 2, 3), lp[-2:]


def llm_grade(model, tokenizer, items, variant):
    """The LLM grader -> [(format, content)]: the most probable letter, after subtracting the
    content-free bias for the '+cal' variants."""
    if not items:
        return []
    raw, bias = llm_scores(model, tokenizer, items, variant)
    picks = (raw - bias if variant.endswith("+cal") else raw).argmax(-1)                  # (N, 2)
    return [(SCORES[f], SCORES[c]) for f, c in picks.tolist()]


def cohen_kappa(a, b):
    """Cohen's kappa of two label lists: (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e
    the agreement expected from the two raters' label frequencies. 1 = perfect, 0 = chance."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum(a.count(v) * b.count(v) for v in set(a) | set(b)) / n ** 2
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def read_labels(path):
    need = {"domain": str, "question": str, "reference": list, "format": (int, float), "content": (int, float)}
    if not os.path.exists(path):
        raise LogError(f"grader label file '{path}' does not exist; set learn_to_ask.grader_labels.")
    items = []
    for lineno, line in enumerate(open(path), 1):
        if line.strip():
            try:
                item = json.loads(line)
                bad = [k for k, t in need.items() if not isinstance(item.get(k), t)]
            except json.JSONDecodeError:
                bad = ["(not JSON)"]
            if bad or item["format"] not in SCORES or item["content"] not in SCORES:
                raise LogError(f"{path}:{lineno}: a label needs domain, question, reference (list) and format/"
                               f"content in 0, 0.5, 1; problem with {', '.join(bad) or 'a score'}.")
            items.append(item)
    return items


def agreement(name, items, preds):
    fmt, con = [it["format"] for it in items], [it["content"] for it in items]
    pf, pc = [p[0] for p in preds], [p[1] for p in preds]
    acc = lambda x, y: sum(u == v for u, v in zip(x, y)) / len(x)
    return {"grader": name, "format_acc": round(acc(fmt, pf), 3), "format_kappa": round(cohen_kappa(fmt, pf), 3),
            "content_acc": round(acc(con, pc), 3), "content_kappa": round(cohen_kappa(con, pc), 3)}


def calibrate(cfg):
    """Agreement of the proxy and (grader=llm) each LLM prompt variant with the hand labels; the LLM
    variant with the best mean kappa is kept in OUT_DIR/calibration.json for `grader_prompt: best`."""
    lt = cfg["learn_to_ask"]
    items = read_labels(lt["grader_labels"])
    rows = [agreement("proxy", items, [proxy_grade(it["question"], it.get("reference_ids", []), it["reference"],
                                                   it["domain"]) for it in items])]
    if lt["grader"] == "llm":
        tokenizer, model = lm.load_model(cfg["model"])
        for base in ("rubric", "fewshot", "short"):
            raw, bias = llm_scores(model, tokenizer, items, base)
            for variant, lp in ((base, raw), (base + "+cal", raw - bias)):
                rows.append(agreement(f"llm:{variant}", items, [(SCORES[f], SCORES[c]) for f, c in lp.argmax(-1).tolist()]))
    key = lambda r: (r["format_kappa"] + r["content_kappa"], r["format_acc"] + r["content_acc"])
    llm_rows = [r for r in rows if r["grader"].startswith("llm:")]
    best = max(llm_rows, key=key)["grader"][4:] if llm_rows else None
    table = md_table(["grader", "format acc", "format kappa", "content acc", "content kappa"],
                     [[r["grader"], r["format_acc"], r["format_kappa"], r["content_acc"], r["content_kappa"]] for r in rows])
    os.makedirs(lt["out_dir"], exist_ok=True)
    if best:
        json.dump({"best": best, "rows": rows, "n_items": len(items)}, open(os.path.join(lt["out_dir"], "calibration.json"), "w"), indent=1)
    open(os.path.join(lt["out_dir"], "calibration.md"), "w").write(table + "\n")
    print(f"grader agreement with {len(items)} hand labels ({lt['grader_labels']}):\n{table}")
    if best:
        print(f"best LLM prompt variant: {best} (used when learn_to_ask.grader_prompt=best)")


def make_grader(cfg, model, tokenizer):
    """items [{question, reference, reference_ids, domain, context}] -> [(format, content)]."""
    lt = cfg["learn_to_ask"]
    if lt["grader"] == "proxy":
        return lambda items: [proxy_grade(it["question"], it["reference_ids"], it["reference"], it["domain"]) for it in items]
    variant = lt["grader_prompt"]
    if variant == "best":
        path = os.path.join(lt["out_dir"], "calibration.json")
        variant = json.load(open(path))["best"] if os.path.exists(path) else "rubric"
    return lambda items: llm_grade(model, tokenizer, items, variant)


# =============================================================================================
# Sample logs: the Cognitive User Simulator vs a scripted privileged expert
# =============================================================================================

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
    questions = yaml.safe_load(open(lt["expert_questions"]))
    check_questions(questions, lt["domains"], lt["expert_questions"])
    sim_cfg = {**cfg["simulator"], "appraiser": "lexical", "utterance": "template", "max_turns": 10}
    personas = P.sample_many(lt["domains"], lt["log_sessions"], lt["log_seed"])
    sessions = [expert_session(p, questions, sim_cfg, lt["log_seed"]) for p in personas]
    os.makedirs(os.path.dirname(lt["logs"]) or ".", exist_ok=True)
    with open(lt["logs"], "w") as f:
        for s in sessions:
            f.write(json.dumps(s) + "\n")
    n_c = sum(len(s["hidden_concerns"]) for s in sessions)
    probed = sum(len({p for m in s["messages"] for p in m.get("probes", [])}) for s in sessions)
    print(f"wrote {len(sessions)} sessions ({', '.join(lt['domains'])}) to {lt['logs']} "
          f"({os.path.getsize(lt['logs']) / 1024:.0f} KiB); the expert probed {probed}/{n_c} hidden concerns; "
          f"outcomes: {dict(collections.Counter(s['outcome'] for s in sessions))}")


def prepare(cfg):
    lt = cfg["learn_to_ask"]
    sessions, problems = read_logs(lt["logs"], lt["on_bad_line"])
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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for s in kept:
            s["split"] = "test" if is_test(s["session_id"], lt["test_fraction"]) else "train"
            f.write(json.dumps({k: v for k, v in s.items() if k != "future"}) + "\n")
    count = lambda split, d: sum(s["split"] == split and s["decision_truth"] == d for s in kept)
    print(f"{len(sessions)} sessions ({len(problems)} malformed lines skipped) -> {len(kept)} samples "
          f"(train: {count('train', 'continue')} continue / {count('train', 'stop')} stop, test: "
          f"{count('test', 'continue')} / {count('test', 'stop')}); dropped {dropped} continue samples with "
          f"empty info_truth; extractor {lt['extractor']}; wrote {path}")


def samples_path(cfg):
    return cfg["learn_to_ask"]["samples"] or os.path.join(cfg["learn_to_ask"]["out_dir"], "samples.jsonl")


def load_samples(cfg, split):
    path = samples_path(cfg)
    if not os.path.exists(path):
        raise LogError(f"samples file '{path}' does not exist; run `python learn_to_ask.py prepare` first.")
    return [s for s in map(json.loads, open(path)) if s["split"] == split]


# =============================================================================================
# Policy sampling and scoring (shared by train, eval and play)
# =============================================================================================

def prompt_ids(tokenizer, context, prefix=""):
    """The policy's prompt: our system block (format rules + the log's own system message, if any),
    every message of the context, the assistant header and the reply prefix. List of ids."""
    system, rest = POLICY_SYSTEM, context
    if context and context[0]["role"] == "system":
        system, rest = f"{POLICY_SYSTEM}\n\nCall details: {context[0]['content']}", context[1:]
    ids = lm.flat_message_ids(tokenizer, "system", system)
    for m in rest:
        ids += lm.flat_message_ids(tokenizer, m["role"], m["content"])
    return ids + lm.encode(tokenizer, lm.generation_header(tokenizer)) + lm.encode(tokenizer, prefix)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, n, max_new_tokens, temperature, generator, prefix="", chunk=8):
    """n completions per prompt, all in one KVBatch, decoded `chunk` tokens at a time so that a row
    leaves at its end-of-turn token or at the token that completes `</state>` (a stop string: the
    text is cut right after it, the tokens after that token). Returns, per prompt, n tuples
    (sampled tokens, their rollout log-probs, text = prefix + decoded tokens)."""
    eos = lm.end_of_turn_ids(tokenizer)[0]
    batch = KVBatch(model, tokenizer.pad_token_id, adapter=True)
    keys = [(p, j) for p in range(len(prompts)) for j in range(n)]
    for k in keys:
        batch.add(k, prompts[k[0]])
    tokens, logprobs, done = {k: [] for k in keys}, {k: [] for k in keys}, set()
    decode = lambda ts: prefix + tokenizer.decode(ts[:-1] if ts and ts[-1] == eos else ts)
    text = lambda ts: decode(ts).split(STOP_TEXT)[0] + STOP_TEXT if STOP_TEXT in decode(ts) else decode(ts)
    while len(done) < len(keys):
        live = [k for k in keys if k not in done]         # every live row has generated the same count
        out = batch.generate(min(chunk, max_new_tokens - len(tokens[live[0]])), {eos}, temperature, 1.0, generator)
        for k in live:
            start = len(tokens[k])
            tokens[k] += out[k][0]
            logprobs[k] += out[k][1]
            if STOP_TEXT in decode(tokens[k]):
                cut = next(i for i in range(start + 1, len(tokens[k]) + 1) if STOP_TEXT in decode(tokens[k][:i]))
                tokens[k], logprobs[k] = tokens[k][:cut], logprobs[k][:cut]
                done.add(k)
            elif tokens[k][-1] == eos or len(tokens[k]) >= max_new_tokens:
                done.add(k)
        batch.drop([k for k in live if k in done])
    return [[(tokens[(p, j)], logprobs[(p, j)], text(tokens[(p, j)])) for j in range(n)] for p in range(len(prompts))]


def score(samples, texts, grade, lt):
    """Reward records for texts[i] answering samples[i] (`lt['reward_parse']` rule, see `decide`); the
    grader sees only the pairs where truth and prediction both continue."""
    decided = [decide(t, lt["reward_parse"]) for t in texts]
    ask = [i for i, (s, (kind, _, _)) in enumerate(zip(samples, decided))
           if kind == "question" and s["decision_truth"] == "continue"]
    last_user = lambda s: next((m["content"] for m in reversed(s["context"]) if m["role"] == "user"), "")
    grades = dict(zip(ask, grade([{"question": decided[i][1], "reference": samples[i]["info_truth"],
                                   "reference_ids": samples[i]["info_ids"], "domain": samples[i]["domain"],
                                   "context": last_user(samples[i])} for i in ask])))
    records = []
    for i, (s, (kind, question, exact)) in enumerate(zip(samples, decided)):
        r, r_s, r_a, p = reward(s["decision_truth"], kind, *grades.get(i, (0.0, 0.0)), lt["reward"], lt["beta"],
                                exact)
        records.append({"truth": s["decision_truth"], "kind": kind, "well_formed": exact, "R": r, "R_s": r_s,
                        "R_a": r_a, "P": p})
    return records


def summarize(records):
    """The paper's metric set over reward records (content metrics on continue-truth samples)."""
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else 0.0
    cont = [r for r in records if r["truth"] == "continue"]
    stop = [r for r in records if r["truth"] == "stop"]
    return {"continue_acc": mean([r["kind"] == "question" for r in cont]),
            "stop_acc": mean([r["kind"] == "stop" for r in stop]),
            "decision_acc": mean([r["R_s"] for r in records]),
            "content_mean": mean([r["R_a"] for r in cont]), "win_rate": mean([r["R_a"] == 1.0 for r in cont]),
            "format_mean": mean([r["P"] for r in records]), "reward": mean([r["R"] for r in records]),
            "malformed": mean([not r["well_formed"] for r in records]), "n": len(records)}


# =============================================================================================
# 7. GRPO training
# =============================================================================================

def grpo_update(model, optimizer, prompts, completions, advantages, lt, temperature):
    """`epochs` passes of clipped policy-gradient updates over completion tokens (token mean over the
    step; completions with zero advantage carry no gradient and are skipped). The log-probs are
    recomputed on prompt + completion ids exactly as sampled, through the model's own head; the "old"
    log-probs of the ratio are the first pass's own, detached (savpo.Trainer.update's convention), so
    the first ratio is exactly 1. Returns stats, averaged over the passes."""
    total = sum(len(c[0]) for c in completions) or 1
    active = [i for i, c in enumerate(completions) if advantages[i] != 0 and c[0]]
    params = [p for p in model.parameters() if p.requires_grad]
    keys = ("pg_loss", "clip_frac", "grad_norm")
    stats, old = {k: 0.0 for k in keys}, {}
    for _ in range(lt["epochs"]):
        optimizer.zero_grad(set_to_none=True)
        model.train()
        for start in range(0, len(active), lt["micro_batch"]):
            idx = active[start:start + lt["micro_batch"]]
            rows = [prompts[i] + completions[i][0] for i in idx]
            b = torch.tensor([r for r, i in enumerate(idx) for _ in completions[i][0]])
            c = torch.tensor([len(prompts[i]) - 1 + t for i in idx for t in range(len(completions[i][0]))])
            logits = lm.selected_logits(model, rows, (b, c))                                     # (N, V)
            target = torch.tensor([t for i in idx for t in completions[i][0]], device=logits.device)
            logp = lm.token_logprobs(logits, target, temperature)
            if idx[0] not in old:
                old.update(zip(idx, logp.detach().split([len(completions[i][0]) for i in idx])))
            old_logp = torch.cat([old[i] for i in idx])
            adv = torch.tensor([float(advantages[i]) for i in idx for _ in completions[i][0]], device=logits.device)
            pg, clip, _ = savpo.clipped_pg_loss(logp[None], old_logp[None], adv[None], torch.ones_like(adv)[None],
                                                lt["eps_low"], lt["eps_high"])
            (pg * len(target) / total).backward()
            stats["pg_loss"] += pg.item() * len(target) / total / lt["epochs"]
            stats["clip_frac"] += clip.item() * len(target) / total / lt["epochs"]
        model.eval()
        if active:
            stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, lt["grad_clip"])) / lt["epochs"]
            optimizer.step()
    return stats


def save_checkpoint(model, optimizer, step, root):
    """The savpo.py checkpoint layout and atomic `latest` pointer."""
    return savpo.write_checkpoint(root, step, model, {"optimizer": optimizer.state_dict(), "step": step,
                                                      "rng": {"torch": torch.get_rng_state(),
                                                              "python": random.getstate()}})


def step_batches(samples, k, stop_fraction, seed):
    """step -> the k training samples of that step: fixed seeded walks over the stop and the continue
    samples, round(k * stop_fraction) from the first (0 = no balancing: one walk over all samples, the
    data's own share of stops). A function of the seed and the step only, so a resumed run sees the
    same batches."""
    rng = random.Random(seed)
    if stop_fraction <= 0:
        order = rng.sample(samples, len(samples))
        return lambda step: [order[(step * k + i) % len(order)] for i in range(k)]
    stops = rng.sample([s for s in samples if s["decision_truth"] == "stop"], sum(s["decision_truth"] == "stop" for s in samples))
    conts = rng.sample([s for s in samples if s["decision_truth"] != "stop"], len(samples) - len(stops))
    n_stop = round(k * stop_fraction)
    return lambda step: ([stops[(step * n_stop + i) % len(stops)] for i in range(n_stop)] +
                         [conts[(step * (k - n_stop) + i) % len(conts)] for i in range(k - n_stop)])


def train(cfg, resume=False):
    """GRPO over single-step samples: each step, `samples_per_step` samples x `group_size` sampled
    replies -> rewards -> advantages normalised within each sample's group (savpo.stpr_advantages in
    'outcome' mode) -> clipped policy gradient on the LoRA policy. Logs and checkpoints as savpo.py."""
    lt = cfg["learn_to_ask"]
    out, seed = lt["out_dir"], cfg["seed"]
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path) and not resume:
        raise LogError(f"{out} already holds a training run; continue it with --resume or set learn_to_ask.out_dir.")
    samples = load_samples(cfg, "train")
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer, base = lm.load_model(cfg["model"])
    model = lm.add_lora(base, cfg["lora"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lt["lr"], weight_decay=0.0)
    grade, step = make_grader(cfg, model, tokenizer), 0
    if resume:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights
        latest = os.path.join(out, "checkpoints", "latest")
        if not os.path.exists(latest):
            raise LogError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume.")
        path = os.path.join(out, "checkpoints", open(latest).read().strip())
        set_peft_model_state_dict(model, load_peft_weights(os.path.join(path, "adapter")))
        state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        step = state["step"]
    config.save(cfg, out)
    k, G, T = lt["samples_per_step"], lt["group_size"], lt["temperature"]
    batches = step_batches(samples, k, lt["stop_fraction"], seed)
    print(f"GRPO on {len(samples)} training samples: {lt['steps']} steps x {k} samples x {G} completions, "
          f"reward {lt['reward']}, grader {lt['grader']}; writing to {out}")
    from tqdm import tqdm
    for step in tqdm(range(step, lt["steps"]), initial=step, total=lt["steps"], desc="learn-to-ask", unit="step"):
        t0 = time.perf_counter()
        batch = batches(step)
        prompts = [prompt_ids(tokenizer, s["context"], lt["response_prefix"]) for s in batch]
        generator = rollout.device_generator(seed * 100_003 + step, model)
        groups = sample_completions(model, tokenizer, prompts, G, lt["max_new_tokens"], T, generator, lt["response_prefix"])
        gen_s = time.perf_counter() - t0
        flat = [c for g in groups for c in g]                                    # (k * G) completions
        records = score([s for s in batch for _ in range(G)], [c[2] for c in flat], grade, lt)
        rewards = torch.tensor([r["R"] for r in records])
        adv, _ = savpo.stpr_advantages(rewards, [torch.zeros(1)] * len(flat), torch.arange(k).repeat_interleave(G), "outcome")
        stats = grpo_update(model, optimizer, [p for p in prompts for _ in range(G)], flat, adv, lt, T)
        n_tok = sum(len(c[0]) for c in flat)
        record = {"step": step + 1, **summarize(records), "reward_std": round(float(rewards.std(unbiased=False)), 4),
                  **{k_: round(v, 5) for k_, v in stats.items()}, "gen_tok_s": round(n_tok / gen_s, 1),
                  "step_s": round(time.perf_counter() - t0, 1)}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if (step + 1) % lt["save_every"] == 0 or step + 1 == lt["steps"]:
            save_checkpoint(model, optimizer, step + 1, os.path.join(out, "checkpoints"))
        tqdm.write(f"step {step + 1:3d} | reward {record['reward']:.2f} (std {record['reward_std']:.2f}) decision "
                   f"{record['decision_acc']:.2f} format {record['format_mean']:.2f} content {record['content_mean']:.2f} "
                   f"malformed {record['malformed']:.2f} | pg {record['pg_loss']:+.4f} | {record['step_s']:.0f}s")
    print(f"outputs: {metrics_path}, {out}/config.yaml, {out}/checkpoints/ (evaluate: "
          f"python learn_to_ask.py eval --adapter {out})")
    return model


# =============================================================================================
# 8. Evaluation and the online check
# =============================================================================================

def load_policy(cfg, adapter):
    """The base model, with a trained adapter if `adapter` names one: an adapter folder, a
    checkpoint folder, or a run folder (its latest checkpoint)."""
    tokenizer, model = lm.load_model(cfg["model"])
    if not adapter:
        return tokenizer, model
    for candidate in (adapter, os.path.join(adapter, "adapter")):
        if os.path.exists(os.path.join(candidate, "adapter_config.json")):
            break
    else:
        latest = os.path.join(adapter, "checkpoints", "latest")
        if not os.path.exists(latest):
            raise LogError(f"--adapter '{adapter}' holds no adapter, checkpoint or run with checkpoints/latest.")
        candidate = os.path.join(adapter, "checkpoints", open(latest).read().strip(), "adapter")
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, candidate)
    model.eval()
    return tokenizer, model


def stop_probability(model, tokenizer, samples, lt):
    """The exact chance, per sample, that the policy's reply starts with the stop marker right after
    the prefilled `<action>` (teacher-forced log-probs at the sampling temperature): whether GRPO can
    ever sample a stop to reinforce. With G replies the chance of at least one is 1 - (1 - p)^G."""
    marker = lm.encode(tokenizer, STOP_REPLY)
    out = []
    with torch.no_grad():
        for s in samples:
            prompt = prompt_ids(tokenizer, s["context"], lt["response_prefix"])
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(marker))
            logits = lm.selected_logits(model, [prompt + marker], (torch.zeros_like(pos), pos))
            out.append(float(lm.token_logprobs(logits, torch.tensor(marker, device=logits.device), lt["temperature"]).sum().exp()))
    return out


def _load_report(cfg, name):
    path = os.path.join(cfg["learn_to_ask"]["out_dir"], name + ".json")
    return json.load(open(path)) if os.path.exists(path) else {}


def _report(cfg, name, label, result, columns):
    """Merge `result` under `label` into OUT_DIR/NAME.json and rewrite NAME.md as a table."""
    out = cfg["learn_to_ask"]["out_dir"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name + ".json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    results[label] = result
    json.dump(results, open(path, "w"), indent=1)
    table = md_table(["metric", *results], [[c, *(r.get(c, "-") for r in results.values())] for c in columns])
    open(os.path.join(out, name + ".md"), "w").write(table + "\n")
    return table


def md_table(header, rows):
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def evaluate(cfg, adapter=None):
    """`eval_rollouts` sampled replies to each of `n_eval_samples` test samples (a fixed hash order),
    by the base model or with `adapter`; the metric set is merged into OUT_DIR/eval.json and eval.md."""
    lt = cfg["learn_to_ask"]
    samples = load_samples(cfg, "test")
    samples = sorted(samples, key=lambda s: hashlib.sha1(s["sample_id"].encode()).hexdigest())[:lt["n_eval_samples"]]
    tokenizer, model = load_policy(cfg, adapter)
    grade, n = make_grader(cfg, model, tokenizer), lt["eval_rollouts"]
    generator = rollout.device_generator(cfg["seed"] + 7, model)
    from tqdm import tqdm
    texts = []
    for start in tqdm(range(0, len(samples), 8), desc="eval", unit="batch"):
        prompts = [prompt_ids(tokenizer, s["context"], lt["response_prefix"]) for s in samples[start:start + 8]]
        texts += [c[2] for g in sample_completions(model, tokenizer, prompts, n, lt["max_new_tokens"], lt["temperature"],
                                                   generator, lt["response_prefix"]) for c in g]
    records = score([s for s in samples for _ in range(n)], texts, grade, lt)
    result = summarize(records)
    # the stop diagnosis: how often the stop marker is sampled, and its exact probability after the prefix
    p_stop = stop_probability(model, tokenizer, samples, lt)
    for truth in ("stop", "continue"):
        picked = [r for r in records if r["truth"] == truth]
        result[f"stops_per_100_on_{truth}"] = round(100 * sum(r["kind"] == "stop" for r in picked) / max(1, len(picked)), 1)
        probs = [p for s, p in zip(samples, p_stop) if s["decision_truth"] == truth]
        result[f"p_stop_on_{truth}"] = round(sum(probs) / max(1, len(probs)), 4)
    per_sample = {s["sample_id"]: sum(r["R"] for r in records[i * n:(i + 1) * n]) / n for i, s in enumerate(samples)}
    label = f"trained ({adapter})" if adapter else "base"
    base = _load_report(cfg, "eval").get("base", {}).get("per_sample_reward")
    if adapter and base:   # paired over the same test samples: a trained policy minus the base
        import eval as evaluation
        common = sorted(set(base) & set(per_sample))
        result["reward_minus_base"] = evaluation.bootstrap([per_sample[k] - base[k] for k in common])
    table = _report(cfg, "eval", label, {**result, "per_sample_reward": per_sample}, list(result))
    print(f"{len(samples)} test samples x {n} rollouts, grader {lt['grader']}, reward {lt['reward']}; "
          f"examples: {texts[:2]}\n{table}")
    return result


def play(cfg, adapter=None):
    """The question-asker against the Cognitive User Simulator (`simulator` config, turn budget
    `play_turns`): each reply's question is the agent's turn; it ends at the policy's stop, the
    customer's decision or the budget. Right time: let t* be the agent turn whose reply revealed the
    last hidden concern; the policy stops at the right time iff it stops at turn t* + 1 (its first
    chance after that); 'early' = it stops with a concern still hidden, 'late' = after t* + 1,
    'no stop' = it never stops. A malformed reply is spoken with its tags removed, and counted."""
    lt = cfg["learn_to_ask"]
    os.makedirs(lt["out_dir"], exist_ok=True)
    tokenizer, model = load_policy(cfg, adapter)
    persona_list = P.sample_many(lt["domains"], lt["play_n"], lt["play_seed"])
    sim_tokenizer, sim_model = tokenizer, model      # the base with the adapter disabled, or simulator.model
    if cfg["simulator"]["model"]:
        sim_tokenizer, sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"]})
    sim = S.CognitiveUserSimulator({**cfg["simulator"], "max_turns": lt["play_turns"]}, sim_model, sim_tokenizer,
                                   seed=cfg["seed"])
    dialogues = [[{"role": "system", "content": call_details(p)}, {"role": "user", "content": o}]
                 for p, o in zip(persona_list, sim.reset(persona_list))]
    n = len(persona_list)
    stop_turn, all_revealed, malformed = [None] * n, [None] * n, 0
    generator = rollout.device_generator(cfg["seed"] + 11, model)
    for turn in range(1, lt["play_turns"] + 1):
        live = [i for i in range(n) if not sim.done[i]]
        if not live:
            break
        prompts = [prompt_ids(tokenizer, dialogues[i], lt["response_prefix"]) for i in live]
        replies = sample_completions(model, tokenizer, prompts, 1, lt["max_new_tokens"], lt["temperature"],
                                     generator, lt["response_prefix"])
        agent_msgs = [None] * n
        for i, ((_, _, text),) in zip(live, replies):
            kind, question, _ = parse_action(text)
            if kind == "stop":
                stop_turn[i] = turn
                sim.abort(i, "stopped")
                continue
            if kind == "malformed":
                malformed += 1
                question = re.sub(r"<[^>]*>", " ", text).strip() or "..."
            agent_msgs[i] = question
            dialogues[i].append({"role": "assistant", "content": question})
        if all(sim.done):
            break
        user_msgs, states, _ = sim.step(agent_msgs)
        for i in range(n):
            if user_msgs[i] is not None:
                dialogues[i].append({"role": "user", "content": user_msgs[i]})
                if all_revealed[i] is None and all(v != "hidden" for v in states[i].concern_status.values()):
                    all_revealed[i] = turn
    verdicts = []
    for i in range(n):
        hidden = any(v == "hidden" for v in sim.states[i].concern_status.values())
        verdicts.append("no stop" if stop_turn[i] is None else "early" if hidden else
                        "right" if stop_turn[i] == all_revealed[i] + 1 else "late")
        print(f"{persona_list[i].persona_id} [{persona_list[i].domain}] revealed "
              f"{sum(v != 'hidden' for v in sim.states[i].concern_status.values())}/{len(persona_list[i].concerns)}, "
              f"stop at turn {stop_turn[i]}, all revealed after turn {all_revealed[i]}: {verdicts[-1]}")
    with open(os.path.join(lt["out_dir"], "play_dialogues.jsonl"), "w") as f:    # why each call went as it did
        for p, d, v, st in zip(persona_list, dialogues, verdicts, sim.states):
            f.write(json.dumps({"persona_id": p.persona_id, "hidden_concerns": {c.id: c.statement for c in p.concerns},
                                "verdict": v, "final_state": st.to_dict(), "messages": d}) + "\n")
    total = sum(len(p.concerns) for p in persona_list)
    revealed = sum(v != "hidden" for s in sim.states for v in s.concern_status.values())
    result = {"dialogues": n, "concerns_revealed": f"{revealed}/{total}", "reveal_rate": round(revealed / total, 3),
              **{f"stop_{v.replace(' ', '_')}": round(verdicts.count(v) / n, 3) for v in ("right", "early", "late", "no stop")},
              "agent_turns": round(sum(len([m for m in d if m["role"] == "assistant"]) for d in dialogues) / n, 2),
              "malformed_turns": malformed}
    print(_report(cfg, "play", f"trained ({adapter})" if adapter else "base", result, list(result)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Learn-to-Ask: offline logs -> a question-asking policy.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("make-logs", "write sample logs (simulator customers vs a privileged expert)"),
                       ("prepare", "cut logs into (context, observed future) samples"),
                       ("calibrate", "grader agreement with the hand labels"), ("train", "GRPO + LoRA"),
                       ("eval", "metrics on the test samples"), ("play", "online check against the simulator")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. learn_to_ask.steps=3")
        p.add_argument("--config", default=None, help="a YAML file overriding config.yaml")
        if name in ("eval", "play"):
            p.add_argument("--adapter", default=None, help="adapter, checkpoint or run folder (default: base model)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    args, extra = parser.parse_known_args(argv)
    if any(x.startswith("-") or "=" not in x for x in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra                     # key=value overrides given after a --flag
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    torch.manual_seed(cfg["seed"])
    try:
        if args.command == "make-logs":
            make_logs(cfg)
        elif args.command == "prepare":
            prepare(cfg)
        elif args.command == "calibrate":
            calibrate(cfg)
        elif args.command == "train":
            train(cfg, resume=args.resume)
        elif args.command == "eval":
            evaluate(cfg, args.adapter)
        else:
            play(cfg, args.adapter)
    except (LogError, lm.ModelError, P.DomainError) as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
