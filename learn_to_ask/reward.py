"""Learn-to-Ask, part 2: the reply format, the reward and the graders.

The policy replies with a structured pair, `<action> ONE QUESTION </action><state> ASSESSMENT </state>`,
or with the stop marker as the action, `<action> <stop/> </action><state> ASSESSMENT </state>`. The
reward (`reward`) is
    R = R_s * (1 + beta * R_a) + P          (beta = 2)
with R_s decision correctness, R_a the judged content of the question (0, 0.5, 1) and P its format
(one question 1, two 0.5, more or none 0). As in the published code (Trinity-RFT learn2ask
`reward_fn`), a reply holding the stop marker is a stop -- its format point only if it is exactly the
well-formed stop -- and any other reply is a graded "continue" (`decide`, rule 'published'; 'strict'
scores only well-formed replies). A grader scores R_a and P only when truth and prediction both
continue; a right stop gets R_a = 1; a wrong decision gets 0.

Graders: `proxy` (cue matching, deterministic, the CPU default) and `llm` (the published rubric asked
as a choice among A/B/C, read from the log-probs of the letters; no free text is parsed). `calibrate`
measures both against hand labels (accuracy, Cohen's kappa) and keeps the best LLM prompt variant.
"""

import json
import os
import re

import torch

import lm
import personas as P
import runfiles
from learn_to_ask.data import LogError

STOP_TEXT = "</state>"      # decoding stops here: every well-formed reply ends with it
GRADER_PROMPTS = ("rubric", "rubric+cal", "fewshot", "fewshot+cal", "short", "short+cal")   # calibrate's variants
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
    for line in runfiles.jsonl_lines(path):
        item = line.record
        bad = [line.problem] if line.problem else ["(not a JSON object)"] if not isinstance(item, dict) else \
            [k for k, t in need.items() if not isinstance(item.get(k), t)]
        if bad or item["format"] not in SCORES or item["content"] not in SCORES:
            raise LogError(f"{path}:{line.number}: a label needs domain, question, reference (list) and format/"
                           f"content in 0, 0.5, 1; problem with {', '.join(bad) or 'a score'}.")
        items.append(item)
    if not items:
        raise LogError(f"grader label file '{path}' holds no labels; one JSON object per line (see "
                       f"data/grader_labels.jsonl).")
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
        from tqdm import tqdm
        tokenizer, model = lm.load_model(cfg["model"])
        for base in tqdm(("rubric", "fewshot", "short"), desc="grader prompts", unit="prompt", leave=False):
            raw, bias = llm_scores(model, tokenizer, items, base)
            for variant, lp in ((base, raw), (base + "+cal", raw - bias)):
                rows.append(agreement(f"llm:{variant}", items, [(SCORES[f], SCORES[c]) for f, c in lp.argmax(-1).tolist()]))
    key = lambda r: (r["format_kappa"] + r["content_kappa"], r["format_acc"] + r["content_acc"])
    llm_rows = [r for r in rows if r["grader"].startswith("llm:")]
    best = max(llm_rows, key=key)["grader"][4:] if llm_rows else None
    table = md_table(["grader", "format acc", "format kappa", "content acc", "content kappa"],
                     [[r["grader"], r["format_acc"], r["format_kappa"], r["content_acc"], r["content_kappa"]] for r in rows])
    if best:
        runfiles.write_json(os.path.join(lt["out_dir"], "calibration.json"),
                            {"best": best, "rows": rows, "n_items": len(items)}, indent=1)
    runfiles.write_text(os.path.join(lt["out_dir"], "calibration.md"), table + "\n")
    print(f"grader agreement with {len(items)} hand labels ({lt['grader_labels']}):\n{table}")
    if best:
        print(f"best LLM prompt variant: {best} (used when learn_to_ask.grader_prompt=best)")


def _calibrated(path):
    """The prompt variant `calibrate` kept in `path`; a file that cannot be read is a LogError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            best = json.load(f).get("best")
    except (ValueError, OSError, AttributeError):
        best = None
    if best not in GRADER_PROMPTS:
        raise LogError(f"{path} names no grader prompt; run `python -m learn_to_ask calibrate learn_to_ask.grader=llm` "
                       f"again or set learn_to_ask.grader_prompt to one of {', '.join(GRADER_PROMPTS)}.")
    return best


def make_grader(cfg, model, tokenizer):
    """items [{question, reference, reference_ids, domain, context}] -> [(format, content)]."""
    lt = cfg["learn_to_ask"]
    if lt["grader"] == "proxy":
        return lambda items: [proxy_grade(it["question"], it["reference_ids"], it["reference"], it["domain"]) for it in items]
    variant = lt["grader_prompt"]
    if variant == "best":
        path = os.path.join(lt["out_dir"], "calibration.json")
        variant = _calibrated(path) if os.path.exists(path) else "rubric"
    return lambda items: llm_grade(model, tokenizer, items, variant)


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


def md_table(header, rows):
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
