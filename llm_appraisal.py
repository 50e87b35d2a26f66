"""The model-based appraisers (`simulator.appraiser: llm | generative`): the simulator model reads an
agent turn. Read later; appraisal.py holds the contract (`Appraisal`) and the cue-based appraisers.

  llm        -- yes/no questions to the simulator model ("Does the salesperson ask the customer about
                X?", "Does the salesperson answer the customer's worry about X with a concrete fact?"),
                decided by calibrated log-odds; asked for the persona's own concerns only, so the
                checklist count, the fact check and `too_long` come from the lexical appraiser.
  generative -- the simulator model writes the appraisal in tags with the same distinction, parsed
                strictly; a parse failure falls back to lexical and is counted (`parse_failures`).
"""

import re

import torch

import appraisal as A
import lm
import personas as P
from kvbatch import KVBatch

# Worked examples before the question: a 135M model answers yes/no near chance zero-shot, but follows
# the pattern of a handful of shots. They teach the distinction the rules need: asking is not telling.
YES_NO_SHOTS = [
    ("Do you have any worries about the delivery fees?", "ask the customer about the fees", "Yes"),
    ("Our delivery fees are the lowest in town.", "ask the customer about the fees", "No"),
    ("Our delivery fees are 5% with no monthly charge.", "answer the customer's worry about the fees with a concrete fact", "Yes"),
    ("Is your kitchen busy at lunchtime?", "answer the customer's worry about the kitchen with a concrete fact", "No"),
    ("The weather is lovely today, isn't it?", "ask the customer about the contract", "No"),
]


def yes_no_prompt(agent_text, question):
    """Plain-text few-shot prompt ending in 'Answer:'; the next token is scored Yes vs No."""
    shots = "".join(f'Salesperson: "{t}"\nQuestion: Does the salesperson {q}?\nAnswer: {a}\n\n'
                    for t, q, a in YES_NO_SHOTS)
    return shots + f'Salesperson: "{agent_text}"\nQuestion: Does the salesperson {question}?\nAnswer:'


def yes_no_logodds(model, tokenizer, prompts, batch_size=16):
    """log P(Yes) - log P(No) for the next token of each prompt, with the adapter disabled (the
    simulator role). ' Yes' and 'Yes' (with and without a space) are pooled, likewise No."""
    yes = [lm.encode(tokenizer, " Yes")[0], lm.encode(tokenizer, "Yes")[0]]
    no = [lm.encode(tokenizer, " No")[0], lm.encode(tokenizer, "No")[0]]
    logp = lm.next_token_logprobs(model, tokenizer, prompts, batch_size)                     # (N, V)
    return (torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1)).tolist()


def topic(concern):
    """'commission_fees' -> 'commission fees': how the yes/no questions name a concern."""
    return concern.replace("_", " ")


def llm_questions(domain, concern_ids):
    """(key, question) pairs asked about every agent turn, for the given concerns."""
    bank = P.load_bank(domain)
    qs = [("push", "ask the customer to sign up now"),
          ("open_probe", "ask the customer whether anything worries them"),
          ("on_topic", f"talk about {bank['title'].lower()}")]
    for cid in concern_ids:
        qs.append((f"probed:{cid}", f"ask the customer about {topic(cid)}"))
        qs.append((f"addressed:{cid}", f"answer the customer's worry about {topic(cid)} with a concrete fact"))
    return qs


class LLMAppraiser:
    """Yes/no questions scored by calibrated log-odds (the same log-odds on a content-free message are
    subtracted: contextual calibration); one batched forward for all dialogues."""

    CONTENT_FREE = "N/A"
    parse_failures = 0

    def __init__(self, model, tokenizer, rules):
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.baseline = {}  # question -> log-odds on the content-free message

    def calibrated(self, pairs):
        """pairs: [(agent_text, question)] -> calibrated log-odds per pair."""
        fresh = sorted({q for _, q in pairs if q not in self.baseline})
        if fresh:
            base = yes_no_logodds(self.model, self.tokenizer, [yes_no_prompt(self.CONTENT_FREE, q) for q in fresh])
            self.baseline.update(zip(fresh, base))
        raw = yes_no_logodds(self.model, self.tokenizer, [yes_no_prompt(t, q) for t, q in pairs])
        return [r - self.baseline[q] for r, (_, q) in zip(raw, pairs)]

    def __call__(self, agent_texts, domains, voiced=None, concern_ids=None):
        """The common call (appraisal.py); concern_ids[i]: the concerns to ask about for turn i (the persona's
        own; None = every concern of the bank). False claims come from the lexical appraiser's fact check
        (figures and conditions are read by rule, not asked of the model)."""
        voiced = voiced or [()] * len(agent_texts)
        concern_ids = concern_ids or [[c["id"] for c in P.load_bank(d)["concerns"]] for d in domains]
        pairs, owners = [], []
        for i, (text, domain, ids) in enumerate(zip(agent_texts, domains, concern_ids)):
            for key, q in llm_questions(domain, ids):
                pairs.append((text, q))
                owners.append((i, key))
        scores = self.calibrated(pairs)
        results = [{"probed": set(), "addressed": set(), "push": False, "open_probe": False, "on_topic": False}
                   for _ in agent_texts]
        for (i, key), score in zip(owners, scores):
            yes = score > self.rules["llm_margin"]
            kind, _, cid = key.partition(":")
            if cid:
                if yes:
                    results[i][kind].add(cid)
            else:
                results[i][kind] = yes
        out = []
        for r, text, domain, ids, heard in zip(results, agent_texts, domains, concern_ids, voiced):
            out.append(merge_with_lexical(r, text, domain, ids, self.rules, heard, r.pop("on_topic")))
        return out


def merge_with_lexical(model_says, text, domain, concern_ids, rules, voiced=(), on_topic=None):
    """A model appraiser's verdict on the persona's own concerns (a dict of probed, addressed, open_probe,
    push[, off_topic]), completed by the lexical appraiser into an `Appraisal`: the bank's other concerns
    (the checklist and pitch counts need them), the fact check, `too_long`."""
    lexical = A.lexical_appraise(text, domain, rules, voiced)
    probed = model_says["probed"] | (lexical.probed - set(concern_ids))
    r = A.Appraisal(probed=probed, open_probe=model_says["open_probe"], push=model_says["push"],
                    off_topic=model_says.get("off_topic", lexical.off_topic), too_long=lexical.too_long,
                    false_claims=lexical.false_claims, about=lexical.about | model_says["probed"])
    r.addressed = (model_says["addressed"] | (lexical.addressed - set(concern_ids))) - r.false_claims
    if on_topic is not None:
        r.off_topic = not (on_topic or r.probed or r.addressed or r.push or r.false_claims)
    return r


# --------------------------------------------------------------------------- generative

GENERATIVE_FORMAT = re.compile(
    r"^\s*<asked>([a-z0-9_, ]*)</asked>\s*<answered>([a-z0-9_, ]*)</answered>\s*"
    r"<open_question>(yes|no)</open_question>\s*<push>(yes|no)</push>\s*<off_topic>(yes|no)</off_topic>\s*$")


def parse_generative(text, concern_ids):
    """Strict parse of '<asked>a</asked><answered>none</answered><open_question>no</open_question>
    <push>no</push><off_topic>no</off_topic>' -> the appraisal fields, or None if anything is off
    (unknown ids included)."""
    m = GENERATIVE_FORMAT.match(text.strip().lower())
    if not m:
        return None
    sets = []
    for group in m.group(1), m.group(2):
        items = {x.strip() for x in group.split(",") if x.strip() and x.strip() != "none"}
        if not items <= set(concern_ids):
            return None
        sets.append(items)
    return {"probed": sets[0], "addressed": sets[1], "open_probe": m.group(3) == "yes",
            "push": m.group(4) == "yes", "off_topic": m.group(5) == "yes"}


def generative_messages(agent_text, domain, concern_ids):
    """The generative appraiser's request as chat messages [system, user]."""
    by_id = {c["id"]: c for c in P.load_bank(domain)["concerns"]}
    concerns = "; ".join(f"{cid}: {by_id[cid]['statement']}" for cid in concern_ids)
    system = ("You annotate sales calls. Reply with exactly: <asked>ids</asked><answered>ids</answered>"
              "<open_question>yes|no</open_question><push>yes|no</push><off_topic>yes|no</off_topic>. "
              "asked: the concerns the salesperson asks the customer about (a question, not a statement); "
              "answered: the concerns the salesperson answers with a concrete fact; ids are comma-separated "
              "concern ids or none. open_question: the salesperson asks what worries the customer without "
              "naming a topic.")
    user = f"Customer concerns: {concerns}\nSalesperson said: \"{agent_text}\""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def generative_prompt(tokenizer, agent_text, domain, concern_ids):
    """`generative_messages` as the in-process model's token ids, up to the generation header."""
    system, user = generative_messages(agent_text, domain, concern_ids)
    return (lm.flat_message_ids(tokenizer, "system", system["content"])
            + lm.flat_message_ids(tokenizer, "user", user["content"]) + lm.encode(tokenizer, lm.generation_header(tokenizer)))


class GenerativeAppraiser:
    """The simulator model writes each appraisal in tags (`generative_prompt`), one batched greedy decode
    for all turns, with the adapter disabled; a reply that does not parse strictly falls back to the lexical
    appraiser and is counted in `parse_failures`. With an `endpoint` (endpoint.Endpoint, `simulator.model` a
    URL) the served model writes the tags, all turns' requests at once; a failed request falls back to the
    lexical appraiser too (counted by the endpoint, not as a parse failure)."""

    def __init__(self, model, tokenizer, rules, max_tokens, endpoint=None):
        self.model, self.tokenizer, self.rules, self.max_tokens = model, tokenizer, rules, max_tokens
        self.endpoint = endpoint
        self.parse_failures = 0

    def _replies(self, agent_texts, domains, concern_ids):
        """The model's tags for each turn, or None where the endpoint gave none."""
        if self.endpoint is not None:
            replies = self.endpoint.chat_many([{"messages": generative_messages(t, d, ids), "max_tokens": self.max_tokens}
                                               for t, d, ids in zip(agent_texts, domains, concern_ids)])
            return [None if isinstance(r, Exception) else r.text for r in replies]
        tok = self.tokenizer
        batch = KVBatch(self.model, tok.pad_token_id, adapter=False)
        for i, (text, domain, ids) in enumerate(zip(agent_texts, domains, concern_ids)):
            batch.add(i, generative_prompt(tok, text, domain, ids))
        outs = batch.generate(self.max_tokens, lm.stop_ids(tok, self.model))
        return [tok.decode(outs[i][0], skip_special_tokens=True) for i in range(len(agent_texts))]

    def __call__(self, agent_texts, domains, voiced=None, concern_ids=None):
        voiced = voiced or [()] * len(agent_texts)
        concern_ids = concern_ids or [[c["id"] for c in P.load_bank(d)["concerns"]] for d in domains]
        replies = self._replies(agent_texts, domains, concern_ids)
        results = []
        for reply, text, domain, ids, heard in zip(replies, agent_texts, domains, concern_ids, voiced):
            if reply is None:
                results.append(A.lexical_appraise(text, domain, self.rules, heard))
                continue
            parsed = parse_generative(reply, set(ids))
            if parsed is None:
                self.parse_failures += 1
                results.append(A.lexical_appraise(text, domain, self.rules, heard))
            else:
                results.append(merge_with_lexical(parsed, text, domain, set(ids), self.rules, heard))
        return results
