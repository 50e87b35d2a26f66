import collections
import json
import subprocess
import sys

import pytest
import yaml

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
