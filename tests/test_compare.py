"""compare.py: every preset trained over seeds, evaluated on the same held-out personas, paired intervals."""
import json

import pytest

import compare as C
from conftest import make_tiny_model


def test_compare_trains_every_preset_and_reports_intervals(tmp_path, tokenizer):
    tiny = tmp_path / "tiny"
    make_tiny_model(tokenizer).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    overrides = [f"model.name_or_path={tiny}", "model.warm_start=", "train.steps=1", "train.personas_per_step=2", "train.group_size=2",
                 "rollout.max_new_tokens=4", "simulator.max_turns=1", "personas.eval_n=2", "aopsd.placement=system"]
    out = tmp_path / "cmp"
    result = C.compare(None, overrides, [0, 1], 3, 2, str(out), algos=("grpo", "savpo"))
    assert set(result) == {"base", "base+privileged(system)", "grpo", "savpo"}
    assert (out / "grpo_seed1" / "checkpoints" / "step_000001" / "adapter").exists()
    for r in result.values():
        for m in C.METRICS:
            mean, lo, hi = r["intervals"][m]
            assert lo <= mean <= hi
    assert result["savpo"]["per_seed_means"].keys() == {0, 1}
    text = (out / "compare.md").read_text()
    assert "| savpo |" in text and "reveal minus base" in text and (out / "compare.png").stat().st_size > 1000
    saved = json.loads((out / "compare.json").read_text())
    tables = saved["per_persona"]      # savpo - grpo: the seeds' tables averaged per persona, then paired
    mean = lambda algo, p: sum(tables[f"{algo}_seed{s}"][p]["success"] for s in (0, 1)) / 2
    expected = sum(mean("savpo", p) - mean("grpo", p) for p in tables["base"]) / len(tables["base"])
    assert saved["pairs"]["savpo - grpo"]["success"][0] == pytest.approx(expected, abs=1e-4)
    assert "| savpo - grpo |" in text
    again = C.compare(None, overrides, [0, 1], 3, 2, str(out), algos=("grpo", "savpo"))   # reuses the runs
    assert again["savpo"]["intervals"] == result["savpo"]["intervals"]
