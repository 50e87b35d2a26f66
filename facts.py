"""The fact check: is what an agent turn states true of the offer? Read later; appraisal.py calls it.

A statement's checkable content -- its figures and the conditions it says exist or not -- is compared
with the bank's fact of the concern it is about (`check_claims`). What each concern's fact makes
checkable is its `fact_sheet`: the figures of its `resolution` and of the agent's fact lines that hold
one of its resolve cues, and the bank's `truth` lists (`denies`: what the fact rules out, `asserts`:
what it says exists). A claim that contradicts a fact is a *false claim* (the simulator's rule: it
resolves nothing and costs trust); a claim the fact cannot check is neither true nor false.

Figures are read however they are written (`figures`), in one unit per kind: percent, money (currency
units), duration and frequency (hours; a frequency is its period), speed (Mbps), distance (km), data
(GB), age, availability, count (with the words that follow the number: "200 packaging bags"). Number
words are read ("fifteen per cent", "three in every twenty", "a week's notice", "half a year").
"""

import functools
import re

def has_cue(text, cues):
    """Cue phrases matched on word boundaries, plural allowed ('rush' does not match 'brush', 'review'
    matches 'reviews')."""
    return bool(cue_pattern(tuple(cues)).search(text))


@functools.lru_cache(maxsize=None)
def cue_pattern(cues):
    """One compiled alternation per cue list (the appraisers test every sentence against every concern)."""
    if not cues:
        return re.compile(r"(?!x)x")
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(re.escape(c) for c in cues) + r")(?:s|es)?(?![a-z0-9])")


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
_PRICE_BEFORE = re.compile(r"(?:[$£€]\s?\d[\d.]*|\d\s?(?:dollars?|bucks?|cents?|pounds?|euros?))\s*(?:a |per )?$")
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
        for m in pattern.finditer(low):     # '$22 monthly' is a price per month, not how often something happens
            if not _NOT_A_FREQUENCY.match(low[m.end():]) and not _PRICE_BEFORE.search(low[:m.start()]):
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
    for m in re.finditer(rf"\b({_NUM})\b(?=((?:[\s,]+[a-z'-]+){{0,3}}))", low):
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
    """The n of a money figure worked out from the fact: f x n or f1 + f2 x n, n a number said in the same
    sentence ('a 5 km job pays $8.50': 4.50 + 0.80 x 5 -> 5), else None. An honest salesperson's arithmetic
    is not a false claim, and its n is part of the sum, not a claim of its own."""
    money = [f[1] for f in facts if f[0] == "money" and f[1] > 0]
    for n in (n for n in numbers if n != claim[1] and n >= 2):
        targets = {a * n for a in money} | {a + b * n for a in money for b in money if a != b}
        if any(abs(claim[1] - t) <= TRUTH_TOLERANCE * t for t in targets):
            return n
    return None


def _item_pattern(item):
    """'setup fee' -> a pattern matching 'setup fee', 'set-up fee', 'setup or monthly fee', 'fees'; a word
    ending in '*' is a prefix ('deactivat* automatic*' matches 'deactivates you automatically')."""
    words = [re.escape(w[:-1]) + r"\w*" if w.endswith("*") else re.escape(w) + r"(?:s|es)?"
             for w in item.lower().replace("-", " ").split()]
    return re.compile(r"\b" + r"(?:\W+\w+){0,2}?\W+".join(words) + r"\b")


# a condition on who gets something, when or for how long: 'only for', 'once you've', 'as long as', 'you'd have
# to', 'must'. A fact that states one itself ('riders must be 18', 'a licence is only needed for scooters') is
# `conditional`, and a claim may restate its conditions in other words
_RESTRICTION = re.compile(r"\b(only (?:for|if|when|once|after|applies|apply|available|to|on|in|during|until|with|"
                          r"works|covers|counts|kicks in|starts|if you|those|riders|partners|customers|the|be|lasts|"
                          r"valid|up to|at)|can only|(?:is|are) only|"
                          r"(?:is|are|it's|they're) (?:only|just) for|just for|exclusively|provided (?:that|you)|"
                          r"on condition|unless|until you(?:'ve| have)\b|once you(?:'ve| have)|after you(?:'ve| have)|"
                          r"you(?:'d| would| will|'ll)? (?:need|have) to|must|required|requires|have to|has to|"
                          r"not (?:for|available to|everyone)|doesn't apply|does not apply|excluded?|except)\b")
# the restrictions that say something is needed: negated anywhere earlier in their clause ('no card fee is required')
_REQUIREMENT = re.compile(r"\b(required|requires|must|need|have to|has to)\b")


_CONDITIONAL = re.compile(r"\b(only|until|once|if|must|after|unless|provided|when)\b")


def fact_sheet(concern, agent_facts=()):
    """The checkable form of a concern's fact: the figures of its `resolution` and of the agent's facts that
    hold one of its resolve cues (the full fact: 'no-contract monthly option $5 more' belongs with the exit
    fees), the bank's `truth` lists as patterns, and its resolve cues: {'figures', 'denies' (what the fact
    rules out), 'asserts' (what it says exists), 'cues'}."""
    truth = concern.get("truth") or {}
    linked = [f for f in agent_facts if has_cue(f.lower(), concern["resolve_cues"])]
    return {"figures": [f for text in [concern["resolution"], *linked] for f in figures(text)],
            "denies": [_item_pattern(x) for x in truth.get("denies", [])],
            "asserts": [_item_pattern(x) for x in truth.get("asserts", [])],
            "cues": tuple(concern["resolve_cues"]),
            "conditional": bool(_CONDITIONAL.search(" ".join([concern["resolution"], *linked]).lower()))}


_TRUTH_BOOKS = {}


def truth_book(bank):
    """The checkable facts of a domain bank (personas.load_bank): {concern id: fact_sheet}, built once."""
    key = id(bank)
    if key not in _TRUTH_BOOKS:     # the bank is kept with its book, so its id is never reused
        _TRUTH_BOOKS[key] = (bank, {c["id"]: fact_sheet(c, bank["agent"]["facts"]) for c in bank["concerns"]})
    return _TRUTH_BOOKS[key][1]


def uncheckable(bank):
    """The concerns of a bank whose fact holds nothing to check -- no figure in its resolution or linked
    facts, nothing under `truth` -- so no answer could ever state it (personas.validate_bank refuses them)."""
    return [c["id"] for c in bank["concerns"]
            if not any(fact_sheet(c, bank["agent"]["facts"])[k] for k in ("figures", "denies", "asserts"))]


# a remark about the world at large ('credit checks come up a lot on these calls', 'many apps charge a
# deposit') is not a claim about the offer
_ABOUT_THE_WORLD = re.compile(r"\b((a lot of|many|most|some|lots of|plenty of) (people|owners|restaurants|riders|customers|"
                              r"families|households|providers|companies|apps|platforms)|these days|come up|comes up|"
                              r"on these calls|everyone|other (apps|providers|companies|platforms)|in general|"
                              r"in the industry|elsewhere)\b")


_SCOPED = re.compile(r"\b(during|mid-?(?:contract|term)|within|until|before|for the (?:first|term|contract)|"
                     r"in the (?:first|term)|while|part-?way|along the way|whole term|your term|the term|fixed|locked)\b")


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
    if negated and not cost and _SCOPED.search(low):
        return None     # 'no increases during the term' denies a rise in that period, not the rise after it
    if negated or re.search(r"\b(free of|free from|non-?)\s*$", low[:m.start()]):
        return "negated"
    if cost and re.match(r"[\s-]*(?:is |are )?(?:already |all )?(free|waived|none|nil|zero|included|part of|covered|"
                         r"built in|on us)\b", after):
        return "negated"
    return None if _ABOUT_THE_WORLD.search(low) else "affirmed"


# money said to flow to the callee ('we sent $50 million to restaurants', 'you earn $18'): not the price of
# something the fact says is free
_INCOME = re.compile(r"\b(paid(?! extra| for| separately)|pay you|pays you|earn\w*|sent|send|sends|made|make|makes|"
                     r"receive\w*|bonus\w*|tips?|guarantee\w*|get back|refund\w*)\b")


# where one claim of a sentence ends and the next begins: ';', ': ', ' - ', 'but', 'so', 'while', 'though',
# 'except', 'plus', ', and', and 'and' before a new subject ('15% for six months and there's no setup fee'), not the
# 'and' of a list ('accident and third-party insurance')
_CLAIM_BREAK = re.compile(r"\s*(?:;|:\s|\s[-\u2013\u2014]\s|,?\s+(?:but|so|while|whereas|though|although|except|plus|yet)\s+|"
                          r",\s+and\s+|\s+and\s+(?=(?:there|you|you'?ll|you'?re|we|we'?ll|it|it'?s|they|i|i'?ll|that|"
                          r"this|your|our|the)\b))", re.I)


def claims(sentence):
    """The claims of one sentence: 'The bags are free, but there's a $20 deposit.' -> ['The bags are free',
    "there's a $20 deposit."]. Each is checked on its own (`check_claims`)."""
    return [c for c in _CLAIM_BREAK.split(sentence) if c and c.strip()]


def check_claims(sentence, primary, book, support=()):
    """(false, verified): the concerns in `primary` whose fact the statement contradicts, and the concerns
    (of `primary` and `support`) whose fact it states truly. `book`: the bank's `truth_book`.

    The sentence is checked claim by claim (`claims`): one false claim makes it false, as a lie beside a
    true fact ('a full weekday at home, but installation is free') is still a lie. A claim verifies a
    concern only if it holds no other concern's resolve cue: 'Thermal bag, rain jacket and phone mount
    provided free' is about the kit and the weather at once, so its 'free' answers neither.

    A figure is checked against a concern's fact only where the fact has a figure of the same kind: a rate
    against rates, a duration against durations ('payouts every month' vs 'every week' is false; '2 million
    customers' said about the commission is unverifiable: neither false nor a fact of that concern). It is
    true if it matches the fact of any concern the sentence is about (`primary` or `support`: 'the plan is
    $30 and streaming is $8' names two), or is a sum worked out from one (`_derived`). A figure of money
    against a fact whose only money is 'free' is false only as a price, not as money paid to the callee
    (`_INCOME`). A condition the fact rules out, said to exist ('a small refundable fee'), is false; said not
    to exist ('there's no deposit'), it is a true fact; a condition the fact says exists, denied, is false.
    'Commission is a flat thirty percent.' about commission_fees (15%, then 22%) -> ({'commission_fees'}, set())."""
    numbers = [c[1] for c in _figures_at(_normalise(sentence)) if c[1] > 0]   # a worked sum may span claims
    false, verified = set(), set()
    for claim in claims(sentence):
        cued = {cid for cid in book if has_cue(claim.lower(), book[cid]["cues"])}
        f, evidence = _check_claim(claim, set(primary), set(primary) | set(support) | cued, book, numbers)
        false |= f
        for fits in evidence:     # a piece of evidence that fits another concern the claim names is no answer
            verified |= {cid for cid in fits if not (fits & cued) - {cid}}
    return false, verified - false


def _check_claim(claim, primary, concerns, book, numbers):
    """`check_claims` for one claim: (false, evidence), evidence a list of the concerns each true figure or
    condition of the claim fits."""
    low = _normalise(claim)
    items = low.replace("set-up", "setup")      # item words may be joined by a hyphen ('cash-out fee')
    false, evidence, unchecked = set(), [], False
    said = [c for c in _figures_at(low) if not c[5]]
    worked = {_derived(f, book[cid]["figures"], numbers) for f in said if f[0] == "money" for cid in concerns}
    for figure in said:
        true_for = {cid for cid in concerns if any(_matches(figure, f) for f in book[cid]["figures"]) or
                    (figure[0] == "money" and _derived(figure, book[cid]["figures"], numbers) is not None)}
        if true_for:
            evidence.append(true_for)
            continue
        unchecked |= figure[1] not in worked
        clause = _CLAUSE_BREAK.split(low[:figure[4]])[-1] + low[figure[4]:]
        clause = _CLAUSE_BREAK.split(clause)[0] if _CLAUSE_BREAK.search(clause) else clause
        for cid in primary:
            same_kind = [f for f in book[cid]["figures"] if f[0] == figure[0] and
                         (figure[0] != "count" or not figure[3] or set(figure[3]) & set(f[3]))]
            free_only = figure[0] == "money" and all(f[1] == 0 for f in same_kind)
            if same_kind and not (free_only and _INCOME.search(clause)):
                false.add(cid)
    conditions = {}           # each condition the claim says, as the text it matched -> the concerns it fits
    for cid in concerns:
        for pattern in book[cid]["denies"]:
            said = _said(pattern, items, cost=True)
            if said == "affirmed" and cid in primary:
                false.add(cid)
            elif said == "negated":
                conditions.setdefault(pattern.search(items).group(0), set()).add(cid)
        for pattern in book[cid]["asserts"]:
            said = _said(pattern, items, cost=False)
            if said == "negated" and cid in primary:
                false.add(cid)
            elif said == "affirmed":
                conditions.setdefault(pattern.search(items).group(0), set()).add(cid)
        # a condition the fact does not have, added to it ('the guarantee is only for full-time riders', 'you
        # get an account manager once you've been with us a year'): false, unless what follows the condition
        # is itself true ('only for your first four weeks'); "you don't have to claim it" restricts nothing
        twist = _RESTRICTION.search(low)
        # a requirement is negated anywhere earlier in its clause ('no separate card fee is required'), any
        # other condition only close before it ("you don't have to claim it", not 'no fee, only for partners')
        window = None if twist and _REQUIREMENT.search(twist.group(0)) else 3
        if twist and cid in primary and not book[cid]["conditional"] and not _ABOUT_THE_WORLD.search(low) \
                and not _negated(low, twist.start(), window=window):
            after = [f for f in _figures_at(low) if f[4] >= twist.start() and not f[5]]
            if not any(_matches(f, g) for f in after for g in book[cid]["figures"]):
                false.add(cid)
    # a figure no fact of the claim can check ('no lock-in, just a $99 admin charge when you leave') makes the
    # claim more than the fact: it states nothing, however true its other words
    return false, [] if unchecked else evidence + list(conditions.values())
