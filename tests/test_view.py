"""view.py: the page holds every turn and state of a run, references nothing outside itself, escapes
hostile text, pairs two policies' calls of the same persona, and reads old files and Learn-to-Ask play."""
import json
import re
from html import escape
from html.parser import HTMLParser

import pytest

import config
import personas as P
import rollout
import scripted_agents as SA
import view


def scripted_run(agent, personas, sim_cfg):
    """Real calls without a model: a scripted agent of simulator.py against the simulator (bank lines,
    lexical appraiser), recorded as Trajectory.to_dict() records."""
    calls = []
    SA.play_scripted(agent, personas, {**sim_cfg, "appraiser": "lexical"}, transcripts=calls)
    return [rollout.Trajectory(persona=p, group=g, ids=[], agent_mask=[], turn_ids=[], logprobs=[], note_slots=[],
                               messages=c["messages"], states=c["states"], decision=c["decision"]).to_dict()
            for g, (p, c) in enumerate(zip(personas, calls))]


class Calls(HTMLParser):
    """Per call card: its data- attributes and, per turn, the agent line, the user lines and the chips."""

    def __init__(self, text):
        super().__init__()
        self.calls, self.turn, self.field, self.in_summary = [], None, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "details":
            self.calls.append({"data": {k[5:]: v for k, v in a.items() if k.startswith("data-")}, "turns": []})
            self.turn = None
        elif tag == "summary":
            self.in_summary = True
        elif tag == "div" and "turn" in classes:
            self.turn = {"agent": "", "user": [], "chips": {}}
            self.calls[-1]["turns"].append(self.turn)
        elif self.turn is not None and not self.in_summary:
            if tag == "p" and "agent" in classes:
                self.field = "agent"
            elif tag == "p" and "user" in classes:
                self.turn["user"].append("")
                self.field = "user"
            elif tag == "span" and "chip" in classes:
                self.field = ("chip", next(c[2:] for c in classes if c.startswith("s-")))

    def handle_endtag(self, tag):
        if tag == "summary":
            self.in_summary = False
        if tag in ("p", "span"):
            self.field = None

    def handle_data(self, data):
        if self.field == "agent":
            self.turn["agent"] += data
        elif self.field == "user":
            self.turn["user"][-1] += data
        elif isinstance(self.field, tuple):
            self.turn["chips"][data.replace("\u25b2", "").strip()] = self.field[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as savpo.py writes it: config.yaml and samples.jsonl with per-turn advantages and
    divergences, from a prober that knows the concerns (reveals, resolves, accepts) on 6 personas."""
    cfg = config.load()
    people = P.sample_many(P.list_domains(), 6, 5)
    records = scripted_run(SA.privileged_prober, people, cfg["simulator"])
    out = tmp_path_factory.mktemp("run")
    config.save({**cfg, "algo": "savpo"}, str(out))
    with open(out / "samples.jsonl", "w") as f:
        for step, r in enumerate(records):
            n = len(r["states"])
            f.write(json.dumps({"step": step // 3 + 1, **r, "turn_advantages": [0.125 * (k + 1) for k in range(n)],
                                "turn_divergence": [0.0123 * (k + 1) for k in range(n)]}) + "\n")
    return out


def test_every_turn_and_state_of_a_run_is_on_the_page(run_dir):
    view.main([str(run_dir)])
    text = (run_dir / "view.html").read_text()
    records = [json.loads(l) for l in open(run_dir / "samples.jsonl")]
    assert any(r["decision"] == "accept" for r in records) and any(
        v == "resolved" for r in records for s in r["states"] for v in s["concern_status"].values())
    cards = Calls(text).calls
    assert len(cards) == len(records)
    for card, r in zip(cards, records):
        assert card["data"]["policy"] == f"savpo:{run_dir.name}" and card["data"]["outcome"] == r["decision"]
        assert card["data"]["domain"] == r["domain"] and card["data"]["stratum"] == r["stratum"]
        agent = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        user = [m["content"] for m in r["messages"][1:] if m["role"] == "user"]   # [0]: the opening
        assert [t["agent"] for t in card["turns"]] == agent
        assert [u for t in card["turns"] for u in t["user"]] == user
        assert [t["chips"] for t in card["turns"]] == [s["concern_status"] for s in r["states"]]
        for k, s in enumerate(r["states"]):
            assert f"willingness <b>{s['willingness']:g}</b>" in text
            assert f"A {0.125 * (k + 1):+.3f}" in text and f"KL {0.0123 * (k + 1):.4f}" in text
        assert escape(r["public"]) in text and all(escape(c["statement"]) in text for c in r["concerns"])
    assert text.count('class="turn"') == sum(len(r["states"]) for r in records)


def test_the_page_references_nothing_outside_itself(run_dir):
    text = open(view.main([str(run_dir), "--out", str(run_dir / "again.html")])).read()
    assert not re.search(r"<[a-z]+[^>]*\s(src|href|action|srcset|poster)\s*=", text, re.I)
    assert not re.search(r"https?:|url\(|@import|<link|<iframe|<object|<embed|<img", text, re.I)
    assert text.count("<script>") == 1 and text.count("<style>") == 1


PAGE_TAGS = ("html", "head", "meta", "title", "style", "body", "h1", "table", "tr", "th", "td", "p", "span", "b",
             "div", "label", "select", "option", "button", "input", "details", "summary", "ul", "li", "svg", "line", "text",
             "polyline", "circle", "script")


class Tags(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.found, self.script, self.in_script = [], "", False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, attrs))
        self.in_script = tag == "script"

    def handle_data(self, data):
        self.script += data if self.in_script else ""

    def handle_endtag(self, tag):
        self.in_script = False


HOSTILE = ['<script>alert(1)</script>', '</script><script>alert(2)</script>', '<img src=x onerror=alert(1)>',
           '<!-- x', '" onmouseover="alert(3)', "' autofocus onfocus='alert(4)"]


def test_hostile_text_is_shown_as_text(tmp_path):
    bad = " ".join(HOSTILE)
    record = {"persona_id": bad, "domain": bad, "stratum": bad, "public": bad, "decision": bad,
              "concerns": [{"id": bad, "statement": bad, "severity": bad, "disclosure": bad}],
              "messages": [{"role": "user", "content": bad}, {"role": "assistant", "content": bad},
                           {"role": "user", "content": bad}],
              "states": [{"concern_status": {bad: bad}, "willingness": bad, "patience": bad, "decision": bad,
                          "events": {"incoherent": [bad], bad: True, "false_claims": [bad]}}]}
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / f"samples_{HOSTILE[2]}.jsonl").write_text(json.dumps(record) + "\n" + "not json\n")
    out = view.main([str(folder)])
    text = open(out).read()
    assert text.lower().count("<script") == 1 and text.lower().count("</script") == 1    # the page's own
    assert "<img" not in text.lower() and "<!--" not in text
    tags = Tags(text)     # as a browser parses it: only the page's own elements, no handler attribute
    assert {t for t, _ in tags.found} <= set(PAGE_TAGS)
    assert not [a for _, attrs in tags.found for a, _ in attrs if a.startswith("on") or a in ("src", "href", "autofocus")]
    assert "alert" not in tags.script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "&quot; onmouseover=&quot;alert(3)" in text and "incoherent: " in text and "false claim: " in text


def test_side_by_side_pairs_policies_on_the_same_personas_and_reads_old_files(tmp_path):
    cfg = config.load()
    people = P.sample_many(P.list_domains(), 3, 9)
    base = scripted_run(SA.generic_prober, people, cfg["simulator"])
    trained = scripted_run(SA.privileged_prober, people, cfg["simulator"])
    folder = tmp_path / "eval"
    folder.mkdir()
    json.dump({"base": {}, "savpo:run": {}}, open(folder / "metrics.json", "w"))   # eval's order: base first
    old = [{k: v for k, v in r.items() if k not in ("domain", "public", "concerns", "willingness")} for r in base]
    (folder / "samples_savpo:run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trained))
    (folder / "samples_base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    text = open(view.main([str(folder)])).read()
    cards = Calls(text).calls
    assert [c["data"]["policy"] for c in cards] == ["base"] * 3 + ["savpo:run"] * 3
    assert [c["data"]["pair"] for c in cards[:3]] == [c["data"]["pair"] for c in cards[3:]] == \
        [f"{p.persona_id}#0" for p in people]
    assert all(c["data"]["domain"] == "unknown" for c in cards[:3])          # an old file: shown as unknown
    assert all(c["data"]["domain"] == p.domain for c, p in zip(cards[3:], people))
    assert "public card: unknown" in text and "severity unknown" in text
    assert '<select id="pa"><option value="base">' in text and "const B_DEFAULT = 1;" in text


def test_learn_to_ask_play_output(tmp_path):
    cfg = config.load()
    (p,) = P.sample_many(["courier_recruitment"], 1, 3)
    (r,) = scripted_run(SA.privileged_prober, [p], cfg["simulator"])
    record = {"persona_id": r["persona_id"], "hidden_concerns": r["hidden_concerns"], "verdict": "late",
              "final_state": r["states"][-1], "messages": [{"role": "system", "content": "Call details: card"}, *r["messages"]]}
    (tmp_path / "play_dialogues.jsonl").write_text(json.dumps(record) + "\n")
    text = open(view.main([str(tmp_path)])).read()
    (card,) = Calls(text).calls
    assert card["data"]["policy"] == f"learn-to-ask:{tmp_path.name}" and card["data"]["outcome"] == r["decision"]
    assert len(card["turns"]) == len(r["states"]) and card["turns"][-1]["chips"] == r["states"][-1]["concern_status"]
    assert text.count("no state logged for this turn") == len(r["states"]) - 1
    assert f"{r['decision']}, stop late" in text and "Call details: card" in text


def test_a_wrong_path_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no samples.jsonl"):
        view.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        view.main([str(tmp_path / "nope.jsonl")])


# ----------------------------------------------------------------------------- issue 32: what a user can feed it

def eval_folder(folder, records, name="base"):
    folder.mkdir(parents=True)
    (folder / f"samples_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture(scope="module")
def calls():
    """Three scripted calls as eval writes them."""
    return scripted_run(SA.privileged_prober, P.sample_many(P.list_domains(), 3, 9), config.load()["simulator"])


def test_two_folders_whose_policies_share_a_name_stay_two_policies(tmp_path, calls):
    """Two eval folders, each with samples_base.jsonl, used to merge into one 'base' and pair the wrong calls."""
    a, b = eval_folder(tmp_path / "a", calls), eval_folder(tmp_path / "b", calls)
    text = open(view.main([str(a), str(b), "--out", str(tmp_path / "ab.html")])).read()
    cards = Calls(text).calls
    assert [c["data"]["policy"] for c in cards] == [f"base ({a})"] * 3 + [f"base ({b})"] * 3
    assert [c["data"]["pair"] for c in cards[:3]] == [c["data"]["pair"] for c in cards[3:]]   # 1 to 1, not #0/#1


def test_a_file_from_before_the_state_fields_shows_unknown_not_zero(tmp_path, calls):
    old = [{**r, "states": [{k: v for k, v in s.items() if k not in ("willingness", "delta_willingness")}
                            for s in r["states"]]} for r in calls]
    text = open(view.main([str(eval_folder(tmp_path / "old", [{k: v for k, v in r.items() if k != "willingness"}
                                                                for r in old]))])).read()
    assert text.count("turns, willingness unknown") == 3 and "willingness +0" not in text
    assert all(c["data"]["gain"] == "" for c in Calls(text).calls)


def test_a_crash_while_building_keeps_the_old_page_and_an_html_input_is_never_overwritten(tmp_path, calls,
                                                                                         monkeypatch):
    folder = eval_folder(tmp_path / "ev", calls)
    (folder / "view.html").write_text("the old page")
    monkeypatch.setattr(view, "page", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        view.main([str(folder)])
    assert (folder / "view.html").read_text() == "the old page"     # it used to be emptied
    monkeypatch.undo()
    named = tmp_path / "calls.html"                                  # samples saved under an .html name
    named.write_text((folder / "samples_base.jsonl").read_text())
    out = view.main([str(named)])
    assert out == str(tmp_path / "calls.view.html") and named.read_text() == (folder / "samples_base.jsonl").read_text()
    with pytest.raises(SystemExit, match="is one of the inputs; name another file"):
        view.main([str(named), "--out", str(named)])


def test_skipped_lines_are_counted_once_and_shown_on_the_page(tmp_path, calls, capsys):
    folder = eval_folder(tmp_path / "ev", calls)
    with open(folder / "samples_base.jsonl", "ab") as f:
        f.write(b"\x00\xff binary\n" * 500 + b"[1, 2]\n{cut")
    text = open(view.main([str(folder)])).read()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"view: {folder / 'samples_base.jsonl'}: 502 lines skipped, not JSON objects (the first: line 4)"]
    assert "502 lines skipped, not JSON objects (the first: line 4)." in text and len(Calls(text).calls) == 3


def test_a_huge_page_is_said_with_its_remedy_and_the_page_fits_a_phone(tmp_path, calls, capsys, monkeypatch):
    folder = eval_folder(tmp_path / "ev", calls)
    monkeypatch.setattr(view, "BIG_PAGE", 1000)
    text = open(view.main([str(folder)])).read()
    assert "may take a minute to open; --max-calls N keeps the last N calls" in capsys.readouterr().err
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text and "@media (max-width" in text
    text = open(view.main([str(folder), "--max-calls", "1", "--out", str(tmp_path / "one.html")])).read()
    assert len(Calls(text).calls) == 1 and "the last 1 calls of each source are shown" in text


# the fuzz: any JSON in a samples file -> a page (what cannot be read shows as unknown), never a traceback
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                              st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3)), max_leaves=8)
FIELDS = ["persona_id", "domain", "stratum", "step", "public", "willingness", "decision", "verdict", "messages",
          "states", "final_state", "concerns", "hidden_concerns", "turn_advantages", "turn_divergence"]


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
                          st.builds(lambda m, s: {"messages": m, "states": s},
                                    st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                             st.one_of(st.sampled_from(["assistant", "user", "system"]), JSON))),
                                    st.lists(st.dictionaries(st.sampled_from(["concern_status", "events", "willingness",
                                                                              "delta_willingness", "patience", "decision"]),
                                                             JSON)))), min_size=1, max_size=3))
def test_fuzz_wrong_typed_fields_make_a_page_not_a_traceback(tmp_path, records):
    path = tmp_path / "samples_fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = view.page(view.read_calls([str(path)]), "fuzz")
    assert text.count('<details class="call"') == len(records)
