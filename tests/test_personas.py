import collections
import json
import subprocess
import sys

import pytest
import yaml

import config
import personas as P


@pytest.mark.parametrize("domain", P.list_domains())
def test_domain_banks_are_rich_enough(domain):
    bank = P.load_bank(domain)
    assert len(bank["concerns"]) >= 10
    assert len({c["category"] for c in bank["concerns"]}) >= 6


def test_three_domains_ship():
    assert {"merchant_recruitment", "courier_recruitment"} <= set(P.list_domains())
    assert len(P.list_domains()) >= 3


def test_strata_filled_evenly_and_reproducible():
    bank = P.load_bank("merchant_recruitment")
    n_cells = len(P.strata_cells(bank))
    people = P.sample("merchant_recruitment", 2 * n_cells + 5, seed=3)
    counts = collections.Counter(p.stratum for p in people)
    assert len(counts) == n_cells
    assert max(counts.values()) - min(counts.values()) <= 1
    again = P.sample("merchant_recruitment", 2 * n_cells + 5, seed=3)
    assert [p.to_dict() for p in people] == [p.to_dict() for p in again]
    other = P.sample("merchant_recruitment", 2 * n_cells + 5, seed=4)
    assert [p.persona_id for p in people] != [p.persona_id for p in other]
    for p in people:  # each persona matches its stratum
        n, band, style = p.stratum[1:].split("-")
        lo, hi = bank["strata"]["willingness"][band]
        assert len(p.concerns) == int(n) and p.style == style and lo <= p.willingness <= hi
        assert len({c.id for c in p.concerns}) == len(p.concerns)


@pytest.mark.parametrize("domain", P.list_domains())
def test_public_view_and_agent_prompt_leak_nothing_private(domain):
    for p in P.sample(domain, 30, seed=0):
        public = P.public_view(p) + P.agent_system_prompt(p)
        for c in p.concerns:
            assert c.statement not in public
            assert c.id not in public
        private = P.private_view(p)
        assert all(c.statement in private for c in p.concerns)
        assert P.simulator_view(p)["concerns"][0]["id"] == p.concerns[0].id


def test_train_and_eval_sets_are_disjoint_and_overlap_is_refused():
    train = P.sample("courier_recruitment", 40, seed=0)
    evaluation = P.sample("courier_recruitment", 40, seed=1000, exclude_ids={p.persona_id for p in train})
    P.check_disjoint(train, evaluation)
    with pytest.raises(ValueError, match="also appear in training"):
        P.check_disjoint(train, train[:3])
    # excluding ids really redraws: sampling the training seed again while excluding it gives new people
    fresh = P.sample("courier_recruitment", 10, seed=0, exclude_ids={p.persona_id for p in train})
    assert not {p.persona_id for p in fresh} & {p.persona_id for p in train}


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    people = P.sample_many(["merchant_recruitment", "broadband_switch"], 5, seed=1)
    assert [p.domain for p in people].count("merchant_recruitment") == 3
    path = tmp_path / "p.jsonl"
    P.save_jsonl(people, path)
    assert [p.to_dict() for p in P.load_jsonl(path)] == [p.to_dict() for p in people]
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:6"):
        P.load_jsonl(path)


def test_malformed_domain_file_names_file_and_field(tmp_path):
    bank = yaml.safe_load(open(P.os.path.join(P.DOMAIN_DIR, "merchant_recruitment.yaml")))
    bank["concerns"][2]["disclosure"] = "sometimes"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(bank))
    with pytest.raises(P.DomainError) as err:
        P.load_bank(str(path))
    assert "broken.yaml" in str(err.value) and "concerns[2].disclosure" in str(err.value)
    del bank["push_cues"]
    path2 = tmp_path / "broken2.yaml"
    path2.write_text(yaml.safe_dump(bank))
    with pytest.raises(P.DomainError, match="'push_cues' is missing"):
        P.load_bank(str(path2))


def test_cli_prints_json_lines():
    out = subprocess.run([sys.executable, "personas.py", "--domain", "merchant_recruitment", "--n", "6", "--seed", "0"],
                         capture_output=True, text=True, check=True, cwd=P.os.path.dirname(P.DOMAIN_DIR) + "/..")
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    assert len(lines) == 6 and len({l["persona_id"] for l in lines}) == 6


def test_a_curriculum_starts_with_one_concern_personas_then_runs_the_usual_schedule():
    domains = ["merchant_recruitment", "courier_recruitment", "broadband_switch"]
    early = [p for k in range(3) for p in P.schedule(domains, 3, 0, k, curriculum_steps=3)]
    assert all(len(p.concerns) == 1 for p in early) and len({p.persona_id for p in early}) == 9
    assert {p.domain for p in early} == set(domains)
    for k in range(3):      # after the curriculum, step 3 + k is the plain schedule's step k
        assert P.schedule(domains, 3, 0, 3 + k, curriculum_steps=3) == P.schedule(domains, 3, 0, k)
    assert any(len(p.concerns) > 1 for k in range(3) for p in P.schedule(domains, 3, 0, k))


def test_a_concern_with_nothing_to_check_is_refused_when_the_bank_loads(tmp_path):
    """Answering a worry means stating its fact (issue 29), so a fact with no figure and no `truth` list could
    never be answered: the bank is refused as it loads, naming the concern, not at the first appraisal."""
    bank = yaml.safe_load(open(P.os.path.join(P.DOMAIN_DIR, "merchant_recruitment.yaml")))
    lock = next(c for c in bank["concerns"] if c["id"] == "contract_lockin")
    lock.update(resolution="You can leave whenever you like.", truth={})
    bank["agent"]["facts"] = [f for f in bank["agent"]["facts"] if "notice" not in f.lower()]
    path = tmp_path / "nothing_checkable.yaml"
    path.write_text(yaml.safe_dump(bank))
    with pytest.raises(P.DomainError, match="concerns.contract_lockin.*nothing checkable"):
        P.load_bank(str(path))
# ----------------------------------------------------------------------------- issue 32: banks a user writes

def write_bank(tmp_path, name="my_shop", change=None):
    """A copy of the merchant bank under another name at a path, with `change(bank)` applied."""
    bank = yaml.safe_load(open(P.os.path.join(P.DOMAIN_DIR, "merchant_recruitment.yaml")))
    bank["name"] = name
    if change:
        change(bank)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bank, allow_unicode=True))
    return str(path)


@pytest.mark.parametrize("change, words", [
    (lambda b: b["agent"].update(facts="Commission is 15% for six months."), "'agent.facts' must be a non-empty list of texts"),
    (lambda b: b["traits"].update(size=[]), "'traits.size' must be a non-empty list of texts"),
    (lambda b: b.update(names=[]), "'names' must be a non-empty list"),
    (lambda b: b["concerns"][1].update(probe_cues="commission"), "'concerns[1].probe_cues' must be a list"),
    (lambda b: b["strata"].update(style=["grumpy"]), "'strata.style' must list styles of terse, chatty, skeptical"),
    (lambda b: b["templates"].update(neutral=[None]), "'templates.neutral' must be a non-empty list of texts"),
    (lambda b: b.update(name="merchant_recruitment"), "the name of another bank"),
])
def test_a_bank_that_would_break_later_is_refused_when_it_loads(tmp_path, change, words):
    """agent.facts as a string used to load, and the agent's prompt then listed one character per line; an
    empty trait list loaded, then sampling a persona was an IndexError."""
    with pytest.raises(P.DomainError) as err:
        P.load_bank(write_bank(tmp_path, change=change))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_key_twice_in_a_bank_is_refused_with_its_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(open(write_bank(tmp_path, "twice_src")).read() + "names: [Ann]\n")
    with pytest.raises(P.DomainError, match=r"twice.yaml: not valid YAML at line \d+, column 1 \(key 'names' appears twice"):
        P.load_bank(str(path))


def test_a_bank_given_as_a_path_serves_a_whole_call(tmp_path):
    """A bank can be given by its path (personas.domains=[path]): its personas find it by name afterwards,
    in the views, the agent's prompt and the simulator (before, only sampling read the path, and the
    simulator's lookup by name was a DomainError inside a traceback)."""
    import simulator as S
    path = write_bank(tmp_path, "path_bank", lambda b: (b["agent"].update(company="PathCo"), b.update(expert_questions={
        c["id"]: ["What worries you most here?", "Is anything else on your mind?"] for c in b["concerns"]})))
    people = P.sample_many([path], 3, seed=0)
    assert {p.domain for p in people} == {"path_bank"} and people[0].persona_id.startswith("pat-")
    for p in people:
        assert "Sam from PathCo" in P.agent_system_prompt(p) and "What worries you most here?" in P.private_view(p, "guide")
    sim = S.CognitiveUserSimulator({**config.load()["simulator"], "appraiser": "lexical", "utterance": "template"})
    assert len(sim.reset(people)) == 3
    users, states, done = sim.step(["Can I ask, is the commission on each order something that worries you?"] * 3)
    assert len(users) == 3 and all(users)
    assert P.check_domains([path], "guide") == ["path_bank"]
    out = subprocess.run([sys.executable, "personas.py", "--domain", path, "--n", "2"], capture_output=True, text=True,
                         cwd=P.os.path.dirname(P.DOMAIN_DIR) + "/..")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2


def test_a_bank_error_is_one_sentence_before_the_model_loads(tmp_path, monkeypatch):
    """savpo.py with a bank whose concerns lack the guide note's questions: one sentence, no traceback,
    before any model is loaded (it used to fail mid-run inside a traceback)."""
    import lm
    import savpo
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = write_bank(tmp_path, "no_questions")
    with pytest.raises(SystemExit) as leave:
        savpo.main([f"out_dir={tmp_path / 'run'}", f"personas.domains=[{path}]"])
    message = str(leave.value)
    assert message.startswith("domain bank no_questions: concern 'commission_fees' has no two expert questions")
    assert "aopsd.note=concerns" in message and "\n" not in message
    path = write_bank(tmp_path, "no_facts", lambda b: (    # facts the simulator cannot check: also before the model
        b["agent"].update(facts=["We are friendly."]), b["concerns"][0].update(resolution="We listen."),
        b["concerns"][0].pop("truth", None), b.update(expert_questions={c["id"]: ["Is it a worry?", "And this?"]
                                                                         for c in b["concerns"]})))
    with pytest.raises(SystemExit, match=r"no_facts.yaml: field 'concerns.commission_fees' has nothing checkable"):
        savpo.main([f"out_dir={tmp_path / 'run'}", f"personas.domains=[{path}]"])
    assert not (tmp_path / "run").exists()


# the fuzz: a shipped bank with random damage -> the bank, or one DomainError sentence; an accepted bank serves
# personas, their views and a simulated turn without an exception
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

BASE = yaml.safe_load(open(P.os.path.join(P.DOMAIN_DIR, "courier_recruitment.yaml")))
BASE["concerns"] = [{k: v[:2] if k.endswith("_examples") else v for k, v in c.items()} for c in BASE["concerns"][:4]]
BASE.update({k: v[:2] for k, v in BASE.items() if k.endswith("_examples")})       # a small bank: a quick example
SIM_CFG = {**config.load()["simulator"], "appraiser": "lexical", "utterance": "template"}


def _places(node, path=(), depth=0):
    """Paths into the bank to damage: every mapping key and the first two items of every list, 3 deep."""
    out = [path] if path else []
    if depth < 3:
        items = node.items() if isinstance(node, dict) else enumerate(node[:2]) if isinstance(node, list) else ()
        for k, v in items:
            out += _places(v, path + (k,), depth + 1)
    return out


PLACES = _places(BASE)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=False), st.text(max_size=8),
                   st.just([]), st.just({}), st.lists(st.text(max_size=5), max_size=2), st.just(["", " "]),
                   st.lists(st.integers(0, 4), min_size=2, max_size=2), st.just("ünïcødé ✓"))
DAMAGE = st.tuples(st.sampled_from(PLACES), st.sampled_from(["delete", "set", "empty", "duplicate"]), VALUES)
_count = iter(range(10 ** 9))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(DAMAGE, min_size=1, max_size=3), st.booleans())
def test_fuzz_banks_load_or_give_one_sentence(tmp_path, damage, key_twice):
    import copy
    import simulator as S
    bank = copy.deepcopy(BASE)
    bank["name"] = f"fuzz_{next(_count)}"
    for where, action, value in damage:
        parent = bank
        try:
            for k in where[:-1]:
                parent = parent[k]
            leaf = parent[where[-1]]
        except (KeyError, IndexError, TypeError):
            continue                                          # an earlier damage removed the place
        if action == "delete":
            del parent[where[-1]]
        elif action == "set":
            parent[where[-1]] = value
        elif action == "empty" and isinstance(leaf, (list, dict, str)):
            parent[where[-1]] = type(leaf)()
        elif action == "duplicate" and isinstance(leaf, list) and leaf:
            leaf.append(copy.deepcopy(leaf[0]))
    text = yaml.safe_dump(bank, allow_unicode=True) + (f"name: {bank.get('name')}_again\n" if key_twice else "")
    path = tmp_path / f"bank{next(_count)}.yaml"
    path.write_text(text)
    try:
        P.load_bank(str(path))
        people = P.sample(str(path), 3, seed=0)
        for p in people:
            assert P.public_view(p) and P.agent_system_prompt(p) and P.private_view(p, "concerns")
        sim = S.CognitiveUserSimulator(SIM_CFG)
        sim.reset(people)
        sim.step(["Hi! Is the pay per delivery something that worries you? It is $4.50 base plus $0.80 per km."] * 3)
    except P.DomainError as e:
        assert str(e) and "\n" not in str(e)
