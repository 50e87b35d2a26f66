"""See a call: samples JSONL -> one self-contained HTML page of calls beside the simulator's hidden state.

    python view.py runs/default                # a training run: samples.jsonl
    python view.py runs/eval                   # an eval folder: one policy per samples_<policy>.jsonl
    python view.py runs/learn_to_ask           # Learn-to-Ask `play` output: play_dialogues.jsonl
    python view.py runs/a runs/b --out ab.html # several sources on one page (each its own policy)

Reads savpo.py's samples.jsonl (step + `Trajectory.to_dict` + per-turn `turn_advantages` and
`turn_divergence`), eval.py's samples_<policy>.jsonl (the policy is in the file name; eval plays every
policy on the same personas with the same seed, so their calls pair up) and learn_to_ask.py's
play_dialogues.jsonl (turns and the final state only). A field an older file lacks or holds with
another type (domain, public card, severity, willingness, advantage, ...) is shown as unknown; a line
that is not a JSON object is skipped, and the skipped lines are counted once per file, on the terminal
and on the page. Two sources whose policies share a name (two eval folders, each with
samples_base.jsonl) are told apart by their folder. Writes one HTML file (default: view.html in the
folder, or FILE.html next to a file; never over an input), whole, then renamed over an older page, and
prints its path; it needs no network to open. A page over ~25 MB is said to be slow to open, with the
remedy (`--max-calls N`: the last N calls of each source).

Per call: the persona's public card and hidden concerns, the transcript turn by turn, beside each
agent turn what the simulator made of it (its `events`: probed, addressed, open probe, push, false
claim, incoherent, ...) and every concern's status after it as chips (hidden -> revealed -> resolved),
the willingness curve, the outcome, and the turn's STPR advantage and AOPSD divergence where logged.
Across calls: filter and sort; "side by side" pairs two policies' calls of the same persona and seed.
A link can open a view: view.html#side,open,find=mer-ddf (side by side, the first pair open, personas
whose id contains mer-ddf).

Every string from a file (model output, ids, file names) is escaped here with `html.escape`; the
page's script only filters, sorts and clones these elements and reads their data- attributes, it
never turns text into HTML.
"""

import argparse
import collections
import glob
import html
import json
import os
import sys

import yaml

import runfiles

EVENTS = {"probed": "probed", "addressed": "addressed", "open_probe": "open probe", "push": "push",
          "false_claims": "false claim", "incoherent": "incoherent", "checklist": "checklist", "pitch": "pitch",
          "off_topic": "off-topic", "too_long": "too long", "probed_other": "asked about another topic"}
BAD = {"false_claims", "incoherent", "checklist", "pitch", "off_topic", "too_long"}
SHOWN_BY_CHIPS = {"revealed", "resolved"}


class ViewError(ValueError):
    pass


def esc(x):
    return html.escape(str(x), quote=True)


def num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def as_dict(x):
    return x if isinstance(x, dict) else {}


def as_list(x):
    return x if isinstance(x, list) else []


BIG_PAGE = 25 * 2 ** 20     # bytes: a page this large takes a browser tens of seconds to open


# --------------------------------------------------------------------------- reading

def sources(path):
    """[(policy label, JSONL file, run config or {})] of a run folder, an eval folder or a file."""
    if os.path.isdir(path):
        # eval's policies in the order it played them (base first): metrics.json keeps that order
        played = [str(k).replace("/", "_") for k in as_dict(_read(os.path.join(path, "metrics.json"), json.load))]
        name = lambda f: os.path.basename(f)[len("samples_"):-len(".jsonl")]
        rank = lambda f: (played.index(name(f)) if name(f) in played else len(played), f)
        files = sorted(glob.glob(os.path.join(path, "samples_*.jsonl")), key=rank)
        files += [os.path.join(path, n) for n in ("samples.jsonl", "play_dialogues.jsonl")
                  if os.path.exists(os.path.join(path, n))]
        if not files:
            raise ViewError(f"{path}: no samples.jsonl, samples_<policy>.jsonl or play_dialogues.jsonl here; "
                            f"pass a run folder, an eval folder, a Learn-to-Ask out_dir or a JSONL file.")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ViewError(f"{path}: no such file or folder.")
    out = []
    for f in files:
        cfg = as_dict(_read(os.path.join(os.path.dirname(os.path.abspath(f)), "config.yaml"), yaml.safe_load))
        name, folder = os.path.basename(f), os.path.basename(os.path.dirname(os.path.abspath(f)))
        if name.startswith("samples_") and name.endswith(".jsonl"):
            policy = name[len("samples_"):-len(".jsonl")]
        elif name == "play_dialogues.jsonl":
            policy = f"learn-to-ask:{folder}"
        elif name == "samples.jsonl":
            policy = f"{cfg['algo']}:{folder}" if isinstance(cfg.get("algo"), str) else folder
        else:
            policy = name.rsplit(".", 1)[0]
        out.append((policy, f, cfg))
    return out


def _read(path, parse):
    """`parse` of the file at `path`, or None if it is missing or cannot be parsed (the page then shows
    what it would without it: file order, no accept threshold)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def labelled_sources(paths):
    """`sources` of every path, each file once; a policy label that two files share gets the file's folder
    (two eval folders both hold samples_base.jsonl: their calls must not pair up as one policy's)."""
    found = {}
    for path in paths:
        for policy, f, cfg in sources(path):
            found.setdefault(os.path.abspath(f), (policy, f, cfg))
    found = list(found.values())
    shared = {p for p, n in collections.Counter(p for p, _, _ in found).items() if n > 1}
    out = [(f"{p} ({os.path.dirname(f) or '.'})" if p in shared else p, f, cfg) for p, f, cfg in found]
    shared = {p for p, n in collections.Counter(p for p, _, _ in out).items() if n > 1}
    return [(f"{p} ({f})" if p in shared else p, f, cfg) for p, f, cfg in out]


def read_calls(paths, max_calls=0, skipped=None):
    """Every call of every source, normalised (`normalise`), in file order; with `max_calls`, the last
    that many of each source. `skipped` (a list) receives (file, lines skipped, first such line number)
    per file with lines that are not JSON objects."""
    calls = []
    for policy, f, cfg in labelled_sources(paths):
        seen, mine, bad = {}, [], []
        with open(f, encoding="utf-8", errors="replace") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if not isinstance(rec, dict):
                    bad.append(n)
                    continue
                call = normalise(rec, policy, cfg)
                replica = seen[call["persona_id"]] = seen.get(call["persona_id"], -1) + 1
                call.update(pair=f"{call['persona_id']}#{replica}")
                mine.append(call)
        if bad:
            print(f"view: {f}: {len(bad):,} line{'s' * (len(bad) > 1)} skipped, not JSON objects (the first: line "
                  f"{bad[0]})", file=sys.stderr)
            if skipped is not None:
                skipped.append((f, len(bad), bad[0]))
        for call in mine[-max_calls if max_calls else 0:]:
            call["id"] = len(calls)
            calls.append(call)
    return calls


def normalise(rec, policy, cfg):
    """One record of any source -> {policy, persona_id, domain, stratum, step, public, concerns [{id,
    statement, severity, disclosure}], start (willingness), lead (the callee's opening lines), turns
    [{agent, user, state, advantage, divergence}], decision, verdict (Learn-to-Ask), accept (the
    run's accept threshold, from the config.yaml beside the file)}."""
    messages = [m for m in as_list(rec.get("messages")) if isinstance(m, dict)]
    lead, turns, system = [], [], []
    for m in messages:
        text = str(m.get("content", ""))
        if m.get("role") == "assistant":
            turns.append({"agent": text, "user": []})
        elif m.get("role") == "system":
            system.append(text)
        else:
            (turns[-1]["user"] if turns else lead).append(text)
    # a state as the page reads it: a mapping whose concern_status and events are mappings (or None)
    state = lambda s: {**s, "concern_status": as_dict(s.get("concern_status")), "events": as_dict(s.get("events"))} \
        if isinstance(s, dict) else None
    states = [state(s) for s in as_list(rec.get("states"))]
    final = state(rec.get("final_state"))
    if final and not states and turns:      # Learn-to-Ask play keeps only the state after the last turn
        states = [None] * (len(turns) - 1) + [final]
    logged = {key: as_list(rec.get(key)) for key in ("turn_advantages", "turn_divergence")}
    for k, t in enumerate(turns):
        t.update(state=states[k] if k < len(states) else None,
                 advantage=num(logged["turn_advantages"][k]) if k < len(logged["turn_advantages"]) else None,
                 divergence=num(logged["turn_divergence"][k]) if k < len(logged["turn_divergence"]) else None)
    concerns = [{**c, "id": str(c["id"])} for c in as_list(rec.get("concerns")) if isinstance(c, dict) and "id" in c]
    if not concerns:
        concerns = [{"id": str(cid), "statement": text} for cid, text in as_dict(rec.get("hidden_concerns")).items()]
    for s in [s for s in states if s] + ([final] if final else []):    # ids only the states name
        for cid in s["concern_status"]:
            if str(cid) not in {c["id"] for c in concerns}:
                concerns.append({"id": str(cid)})
    rules = as_dict(as_dict(cfg.get("simulator")).get("rules"))
    last = next((s for s in reversed(states) if s), final)
    public = rec.get("public") if isinstance(rec.get("public"), str) else (system[0] if system else None)
    return {"policy": policy, "persona_id": str(rec.get("persona_id", "unknown")),
            "domain": str(rec.get("domain", "unknown")), "stratum": str(rec.get("stratum", "unknown")),
            "step": rec.get("step") if num(rec.get("step")) is not None else None, "public": public,
            "concerns": concerns, "start": num(rec.get("willingness")), "lead": lead, "turns": turns,
            "decision": str(rec.get("decision") or (last or {}).get("decision") or "unknown"),
            "verdict": rec.get("verdict"), "accept": num(rules.get("accept_threshold"))}


# --------------------------------------------------------------------------- rendering

def curve_svg(call, width=300, height=96, small=False):
    """The willingness (0-4) before the call and after every agent turn; the accept threshold dashed."""
    points = [call["start"]] + [num((t["state"] or {}).get("willingness")) for t in call["turns"]]
    n = max(1, len(points) - 1)
    pad = 3 if small else 16
    x = lambda k: pad + k * (width - 2 * pad) / n
    y = lambda w: height - pad - w / 4 * (height - 2 * pad)
    known = [(k, w) for k, w in enumerate(points) if w is not None]
    parts = [f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    if not small:
        parts += [f'<line class="axis" x1="{pad}" x2="{width - pad}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                  f'<text x="2" y="{y(v) + 3:.1f}">{v}</text>' for v in (0, 2, 4)]
        if call["accept"] is not None:
            parts.append(f'<line class="accept" x1="{pad}" x2="{width - pad}" y1="{y(call["accept"]):.1f}" '
                         f'y2="{y(call["accept"]):.1f}"><title>accept threshold {call["accept"]}</title></line>')
    if len(known) > 1:
        parts.append('<polyline points="' + " ".join(f"{x(k):.1f},{y(w):.1f}" for k, w in known) + '"/>')
    for k, w in known:
        delta = w - points[k - 1] if k and points[k - 1] is not None else 0
        kind = "up" if delta > 0 else "down" if delta < 0 else "flat"
        parts.append(f'<circle class="{kind}" cx="{x(k):.1f}" cy="{y(w):.1f}" r="{2 if small else 3.5}">'
                     f'<title>{"start" if k == 0 else f"after turn {k}"}: {w:g} ({delta:+g})</title></circle>')
    return "".join(parts) + "</svg>"


def chips(call, state, before=None):
    """Each concern's status after a turn; where `before` (the statuses before it) is known, a status
    that changed this turn is marked."""
    status = as_dict((state or {}).get("concern_status"))
    out = []
    for c in call["concerns"]:
        s = str(status.get(c["id"], "unknown")) if state else "unknown"
        changed = before is not None and state is not None and s != before.get(c["id"], "hidden")
        out.append(f'<span class="chip s-{esc(s)}{" new" if changed else ""}" title="{esc(c["id"])}: {esc(s)}">'
                   f'{"&#9650; " if changed else ""}{esc(c["id"])}</span>')
    return "".join(out)


def event_tags(events):
    """Every event that is set (a non-empty list, true, a number), the known ones labelled and coloured;
    kinds this file does not know appear under their own name."""
    tags = []
    for key, value in as_dict(events).items():
        if key in SHOWN_BY_CHIPS or not value:
            continue
        label = EVENTS.get(key, str(key).replace("_", " "))
        kind = "bad" if key in BAD else "good" if key in ("probed", "addressed", "open_probe") else ""
        items = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        text = label if value is True else f"{label}: {items}"
        tags.append(f'<span class="tag {kind}">{esc(text)}</span>')
    return "".join(tags) or '<span class="tag quiet">nothing the simulator noticed</span>'


def turn_html(call, k, turn, before):
    s = turn["state"]
    lines = "".join(f'<p class="user">{esc(u)}</p>' for u in turn["user"])
    if s is None:
        reading = '<span class="tag quiet">no state logged for this turn</span>'
    else:
        w, dw = num(s.get("willingness")), num(s.get("delta_willingness"))
        numbers = (f'willingness <b>{w:g}</b>' if w is not None else "willingness ?") + \
                  (f' <span class="{"up" if dw > 0 else "down" if dw < 0 else ""}">({dw:+g})</span>' if dw is not None else "")
        numbers += f' &middot; patience {esc(s.get("patience", "?"))}'
        numbers += f' &middot; <b>{esc(s.get("decision"))}</b>' if s.get("decision", "continue") != "continue" else ""
        reading = f'<div>{event_tags(s.get("events"))}</div><div>{chips(call, s, before)}</div><div class="nums">{numbers}</div>'
    logged = []    # what the trainer used for this turn, if the run logged it
    if turn["advantage"] is not None:
        a = turn["advantage"]
        logged.append(f'<span class="{"up" if a > 0 else "down" if a < 0 else ""}" title="STPR advantage of this '
                      f'turn">A {a:+.3f}</span>')
    if turn["divergence"] is not None:
        logged.append(f'<span title="AOPSD teacher-student divergence, mean over the turn\'s agent tokens">'
                      f'KL {turn["divergence"]:.4f}</span>')
    logged = f'<div class="nums">{" &middot; ".join(logged)}</div>' if logged else ""
    return (f'<div class="turn"><div class="talk"><div class="who">agent, turn {k + 1}</div>'
            f'<p class="agent">{esc(turn["agent"])}</p>{lines}</div><div class="reading">{reading}{logged}</div></div>')


def call_html(call):
    turns, before = [], {}     # every concern starts hidden; after a turn without a state, unknown
    for k, t in enumerate(call["turns"]):
        turns.append(turn_html(call, k, t, before))
        before = (t["state"].get("concern_status") or {}) if t["state"] else None
    last = next((t["state"] for t in reversed(call["turns"]) if t["state"]), None)
    end_w = num((last or {}).get("willingness"))
    gain = end_w - call["start"] if end_w is not None and call["start"] is not None else None   # an old file: unknown
    concerns = "".join(
        f'<li><span class="chip s-hidden">{esc(c["id"])}</span> {esc(c.get("statement", "(statement unknown)"))} '
        f'<span class="muted">severity {esc(c.get("severity", "unknown"))}, disclosure '
        f'{esc(c.get("disclosure", "unknown"))}</span></li>' for c in call["concerns"])
    outcome = call["decision"] + (f", stop {call['verdict']}" if call["verdict"] else "")
    step = f" &middot; step {esc(call['step'])}" if call["step"] is not None else ""
    attrs = {"policy": call["policy"], "domain": call["domain"], "stratum": call["stratum"],
             "outcome": call["decision"], "pair": call["pair"], "persona": call["persona_id"],
             "turns": len(call["turns"]), "gain": "" if gain is None else f"{gain:.4f}", "step": call["step"] or 0,
             "order": call["id"]}
    data = " ".join(f'data-{k}="{esc(v)}"' for k, v in attrs.items())
    return (f'<details class="call" {data}>'
            f'<summary><span class="pol">{esc(call["policy"])}</span> <b>{esc(call["persona_id"])}</b> '
            f'<span class="muted">{esc(call["domain"])} &middot; {esc(call["stratum"])}{step}</span> '
            f'<span class="outcome o-{esc(call["decision"])}">{esc(outcome)}</span> '
            f'<span class="muted">{len(call["turns"])} turns, willingness {"unknown" if gain is None else f"{gain:+g}"}'
            f'</span> '
            f'{curve_svg(call, 70, 18, small=True)} {chips(call, last) if last else ""}</summary>'
            f'<div class="persona"><div><p>{esc(call["public"] or "public card: unknown")}</p>'
            f'<p class="muted">starting willingness {esc(call["start"] if call["start"] is not None else "unknown")}'
            f' (0-4)</p><ul>{concerns or "<li>hidden concerns: unknown</li>"}</ul></div>{curve_svg(call)}</div>'
            + "".join(f'<p class="user lead">{esc(u)}</p>' for u in call["lead"]) + "".join(turns)
            + f'<p class="end">outcome: <span class="outcome o-{esc(call["decision"])}">{esc(outcome)}</span></p></details>')


def summary_rows(calls):
    rows = []
    for policy in dict.fromkeys(c["policy"] for c in calls):
        mine = [c for c in calls if c["policy"] == policy]
        final = [next((t["state"] for t in reversed(c["turns"]) if t["state"]), None) or {} for c in mine]
        status = [v for f in final for v in as_dict(f.get("concern_status")).values()]
        share = lambda pred: f"{sum(map(pred, status)) / len(status):.2f}" if status else "-"
        rows.append(f'<tr><td>{esc(policy)}</td><td>{len(mine)}</td>'
                    f'<td>{sum(c["decision"] == "accept" for c in mine) / len(mine):.2f}</td>'
                    f'<td>{share(lambda s: s != "hidden")}</td><td>{share(lambda s: s == "resolved")}</td>'
                    f'<td>{sum(len(c["turns"]) for c in mine) / len(mine):.1f}</td></tr>')
    return "".join(rows)


def options(calls, key, everything):
    values = sorted(dict.fromkeys(str(c[key]) for c in calls)) if key != "policy" else \
        list(dict.fromkeys(c["policy"] for c in calls))
    return (f'<option value="">{everything}</option>' if everything else "") + \
        "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)


def page(calls, title, notes=()):
    """The HTML page of `calls`; `notes`: sentences shown under the title (lines skipped, calls left out)."""
    policies = list(dict.fromkeys(c["policy"] for c in calls))
    b_default = len(policies) - 1
    select = lambda key, label: f'<label>{label} <select id="f-{label}">{options(calls, key, "all")}</select></label>'
    said = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head><body>
<h1>{esc(title)}</h1>{said}
<div class="wide"><table class="summary"><tr><th>policy</th><th>calls</th><th>accepted</th><th>concerns revealed</th>
<th>resolved</th><th>turns</th></tr>{summary_rows(calls)}</table></div>
<p class="legend">concern chips: <span class="chip s-hidden">hidden</span> <span class="chip s-revealed">revealed</span>
<span class="chip s-resolved">resolved</span> <span class="chip s-revealed new">&#9650; changed this turn</span>
&middot; A = STPR advantage, KL = AOPSD divergence of the turn (where the run logged them)</p>
<div class="controls">{select("policy", "policy")} {select("domain", "domain")} {select("stratum", "stratum")}
{select("decision", "outcome")} <label>persona <input id="f-find" size="12" placeholder="id contains"></label>
<label>sort <select id="sort"><option value="order">file order</option>
<option value="persona">persona</option><option value="outcome">outcome</option><option value="turns">turns</option>
<option value="gain">willingness gain</option><option value="step">step</option></select></label>
<button id="expand">expand all</button>
<span><button id="side"{" disabled" if len(policies) < 2 else ""}>side by side</button>
<select id="pa">{options(calls, "policy", "")}</select> vs <select id="pb">{options(calls, "policy", "")}</select>
<button id="list-mode">list</button></span> <span id="count" class="muted"></span></div>
<div id="list">{"".join(call_html(c) for c in calls)}</div><div id="pairs"></div>
<script>const B_DEFAULT = {b_default};{JS}</script></body></html>
"""


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 8px}.muted{color:#777;font-size:12px}.legend{font-size:12px;color:#555}
table.summary{border-collapse:collapse;font-size:13px}table.summary td,table.summary th{border:1px solid #ddd;padding:2px 8px}
.controls{display:flex;flex-wrap:wrap;gap:4px 12px;align-items:center;position:sticky;top:0;background:#fafafa;padding:6px 0;z-index:2;border-bottom:1px solid #ddd;margin-bottom:8px}
.controls select,.controls button,.controls input{font-size:12px;max-width:12em}
details.call{background:#fff;border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:4px 8px}
summary{cursor:pointer}summary svg{vertical-align:middle}.pol{background:#eef;border-radius:3px;padding:0 4px;font-size:12px}
.outcome{border-radius:3px;padding:0 5px;color:#fff;background:#888;font-size:12px}.o-accept{background:#2a8a3a}
.o-reject{background:#b3261e}.o-hangup{background:#d9730d}
.persona{display:flex;gap:16px;justify-content:space-between;border-bottom:1px solid #eee;margin:6px 0}
.persona ul{padding-left:18px;margin:4px 0;font-size:13px}.persona p{margin:4px 0}
.turn{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:12px;border-top:1px solid #f0f0f0;padding:4px 0}
.who{font-size:11px;color:#888}p.agent,p.user{margin:2px 0;padding:4px 8px;border-radius:8px;white-space:pre-wrap;overflow-wrap:anywhere}
p.agent{background:#e8f0fe}p.user{background:#f1f1f1;margin-left:24px}p.lead{margin-left:0}
.reading{font-size:12px}.nums{color:#444;margin-top:2px}.end{font-weight:bold}
.tag{display:inline-block;border:1px solid #ccc;border-radius:10px;padding:0 6px;margin:1px;font-size:11px}
.tag.good{border-color:#2a8a3a;color:#2a8a3a}.tag.bad{border-color:#b3261e;color:#b3261e;background:#fdecea}
.tag.quiet{color:#999;border-style:dashed}
.chip{display:inline-block;border-radius:3px;padding:0 5px;margin:1px;font-size:11px;border:1px solid #bbb}
.s-hidden{background:#eee;color:#666}.s-revealed{background:#ffd666;border-color:#d9a400}
.s-resolved{background:#7cc68a;border-color:#2a8a3a}.s-unknown{background:#fff;color:#aaa;border-style:dashed}
.chip.new{outline:2px solid #333;font-weight:bold}.up{color:#2a8a3a}.down{color:#b3261e}
.persona svg{flex-shrink:0}svg.curve polyline{fill:none;stroke:#3366cc;stroke-width:1.5}svg.curve .axis{stroke:#eee}
svg.curve .accept{stroke:#2a8a3a;stroke-dasharray:4 3}svg.curve text{font-size:9px;fill:#999}
svg.curve circle{fill:#3366cc}svg.curve circle.up{fill:#2a8a3a}svg.curve circle.down{fill:#b3261e}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px;align-items:start}.missing{color:#999;padding:8px}
.note{font-size:12px;color:#8a5a00;background:#fff7e0;padding:2px 6px;margin:2px 0}.wide{overflow-x:auto;max-width:100%}
@media (max-width:700px){body{margin:8px}.turn,.pair{grid-template-columns:minmax(0,1fr)}.persona{flex-wrap:wrap}
summary svg{display:none}}
"""

JS = """
const $ = (s) => document.querySelector(s);
const cards = Array.from(document.querySelectorAll('#list > details.call'));
let side = false;
function kept(card, anyPolicy) {
  if (!card.dataset.persona.includes($('#f-find').value.trim())) return false;
  return ['domain', 'stratum', 'outcome', 'policy'].every((f) => {
    const want = $('#f-' + f).value;
    return !want || (f === 'policy' && anyPolicy) || card.dataset[f] === want;
  });
}
function ordered(list) {
  const key = $('#sort').value, numeric = ['turns', 'gain', 'step', 'order'].includes(key);
  return list.sort((a, b) => {
    const x = a.dataset[key], y = b.dataset[key];
    const u = parseFloat(x), v = parseFloat(y);   // an unknown number ('') sorts last
    const c = numeric ? (isNaN(u) - isNaN(v)) || (u - v) : x.localeCompare(y);
    return c || parseFloat(a.dataset.order) - parseFloat(b.dataset.order);
  });
}
function render() {
  const list = $('#list'), pairs = $('#pairs');
  list.hidden = side; pairs.hidden = !side;
  pairs.replaceChildren();
  if (!side) {
    const shown = ordered(cards.filter((c) => kept(c, false)));
    cards.forEach((c) => { c.hidden = true; });
    shown.forEach((c) => { c.hidden = false; list.appendChild(c); });
    $('#count').textContent = shown.length + ' of ' + cards.length + ' calls';
    return;
  }
  const a = $('#pa').value, b = $('#pb').value;
  const left = ordered(cards.filter((c) => c.dataset.policy === a && kept(c, true)));
  const right = new Map(cards.filter((c) => c.dataset.policy === b).map((c) => [c.dataset.pair, c]));
  let matched = 0;
  for (const card of left) {
    const row = document.createElement('div'), mate = right.get(card.dataset.pair);
    row.className = 'pair';
    const one = card.cloneNode(true), two = mate ? mate.cloneNode(true) : document.createElement('div');
    one.hidden = false;
    if (mate) { two.hidden = false; matched += 1; } else { two.className = 'missing'; two.textContent = 'not played by ' + b; }
    row.append(one, two);
    if (mate) [one, two].forEach((d, i) => d.addEventListener('toggle', () => { [one, two][1 - i].open = d.open; }));
    pairs.appendChild(row);
  }
  $('#count').textContent = matched + ' of ' + left.length + ' calls paired';
}
document.querySelectorAll('.controls select').forEach((s) => s.addEventListener('change', render));
$('#f-find').addEventListener('input', render);
$('#pb').selectedIndex = B_DEFAULT;
$('#side').addEventListener('click', () => { side = true; render(); });
$('#list-mode').addEventListener('click', () => { side = false; render(); });
$('#expand').addEventListener('click', () => {
  const open = !document.querySelector('details.call[open]');
  document.querySelectorAll('details.call').forEach((d) => { d.open = open; });
});
// view.html#side,open,find=ID: side by side, the first call (or pair) open, personas whose id has ID
const hash = decodeURIComponent(location.hash.slice(1)).split(',');
side = hash.includes('side') && !$('#side').disabled;
$('#f-find').value = (hash.find((h) => h.startsWith('find=')) || 'find=').slice(5);
render();
if (hash.includes('open')) { const first = document.querySelector(side ? '#pairs details.call' : '#list details.call:not([hidden])'); if (first) first.open = true; }
"""


def default_out(paths):
    """view.html in a single folder, FILE.html beside a single file, else view.html here -- never one of
    the inputs (a file named x.html gives x.view.html)."""
    first = paths[0]
    if len(paths) == 1 and os.path.isdir(first):
        return os.path.join(first, "view.html")
    out = os.path.splitext(first)[0] + ".html" if len(paths) == 1 else "view.html"
    inputs = {os.path.abspath(p) for p in paths}
    return os.path.splitext(out)[0] + ".view.html" if os.path.abspath(out) in inputs else out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write one offline HTML page of calls with the simulator's "
                                                 "hidden state (see the module docstring).")
    parser.add_argument("paths", nargs="+", help="run folder, eval folder, Learn-to-Ask out_dir or JSONL file")
    parser.add_argument("--out", help="the HTML file (default: view.html in the folder, FILE.html for a file)")
    parser.add_argument("--max-calls", type=int, default=0, metavar="N",
                        help="keep the last N calls of each source (0 = all): a smaller page for a long run")
    args = parser.parse_args(argv)
    if args.max_calls < 0:
        raise SystemExit(f"view: --max-calls must be 0 (all) or more, got {args.max_calls}.")
    skipped = []
    try:
        files = {os.path.abspath(f) for _, f, _ in labelled_sources(args.paths)}
        out = args.out or default_out(args.paths)
        if os.path.abspath(out) in files or os.path.abspath(out) in {os.path.abspath(p) for p in args.paths}:
            raise ViewError(f"--out {out} is one of the inputs; name another file for the page.")
        if os.path.isdir(out):
            raise ViewError(f"--out {out} is a folder; name the HTML file, e.g. {os.path.join(out, 'view.html')}.")
        calls = read_calls(args.paths, args.max_calls, skipped)
    except (ViewError, OSError) as e:
        raise SystemExit(f"view: {e}")
    if not calls:
        raise SystemExit(f"view: no calls in {', '.join(args.paths)}" + (" (every line skipped)." if skipped else "."))
    notes = [f"{f}: {n:,} line{'s' * (n > 1)} skipped, not JSON objects (the first: line {first})."
             for f, n, first in skipped]
    if args.max_calls:
        notes.append(f"--max-calls {args.max_calls}: the last {args.max_calls} calls of each source are shown.")
    title = f"{len(calls)} calls from {', '.join(args.paths)}"
    text = page(calls, title, notes)        # built whole before the file is touched: a failure leaves the old page
    try:
        runfiles.write_text(out, text)
    except OSError as e:
        raise SystemExit(f"view: cannot write {out} ({e.strerror or type(e).__name__}); pass --out elsewhere.")
    size = len(text.encode("utf-8"))
    if size > BIG_PAGE:
        print(f"view: the page is {size / 2 ** 20:.0f} MB ({len(calls):,} calls) and may take a minute to open; "
              f"--max-calls N keeps the last N calls of each source.", file=sys.stderr)
    print(os.path.abspath(out))
    return out


if __name__ == "__main__":
    main()
