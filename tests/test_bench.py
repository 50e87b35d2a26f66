"""bench.py and scripts/gpu_check.sh: the baselines play the same dialogues as the KV engine, and the GPU
command's steps run at toy size on the CPU."""
import pytest

import rollout
from test_rollout import setup


@pytest.mark.parametrize("batched", [True, False])
def test_bench_baselines_play_the_same_dialogues(cfg, tokenizer, stopping_model, batched):
    """bench.py compares decoders on identical work: its re-prefilling `generate` baselines must
    reproduce the KV engine's greedy dialogues."""
    import bench
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model)
    kv = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg)
    made = []

    def decoder(model, pad_id, adapter=True):
        made.append(bench.GenerateBatch(model, pad_id, adapter, batched=batched))
        return made[-1]

    sim2, _, _ = setup(cfg, tokenizer, stopping_model)
    sim2.decoder = decoder
    base = rollout.run(stopping_model, tokenizer, sim2, people, roll_cfg, decoder=decoder)
    assert [t.ids for t in base] == [t.ids for t in kv]
    assert sum(d.prefill_tokens for d in made) > 0 and sum(d.generated_tokens for d in made) > 0


def test_the_gpu_check_runs_every_step_and_writes_one_json(tmp_path):
    """`bash scripts/gpu_check.sh --smoke`: the GPU command's steps (both benches with the compiled
    engine, a random model written, savpo.py on it) at toy sizes on the CPU, gathered into one JSON."""
    import json
    import os
    import subprocess
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "check"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], capture_output=True, text=True, env=env,
                          timeout=900)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.load(open(tmp_path / "check" / "gpu_check.json")) == report
    assert {k: report[k]["rc"] for k in ("bench_a", "bench_b", "write_model", "savpo")} == dict.fromkeys(
        ("bench_a", "bench_b", "write_model", "savpo"), 0), done.stderr[-2000:]
    bench = report["bench_a"]["result"]
    assert bench["identical_dialogues"] is True and bench["kv_compiled_tok_s"] > 0
    assert report["savpo"]["steps"][0]["step_s"] > 0 and report["savpo"]["steps"][0]["peak_mem_gb"] > 0


def test_bench_step_times_the_old_and_the_new_default_step(tiny_dir):
    """`bench.py --step`: the step as it was (float32, 2 personas x G 4) beside config.yaml's (4 x G 8), each a real
    savpo.Trainer step in its own process, one JSON line last with the split and the ratio."""
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "bench.py", "--step", "--steps", "1", "--step-common",
                           f"model.name_or_path={tiny_dir}", "model.warm_start=", "simulator.appraiser=lexical",
                           "rollout.max_new_tokens=4", "simulator.max_turns=2", "personas.curriculum_steps=0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before_dialogues"] == 8 and result["now_dialogues"] == 32
    assert result["before_dtype"] == "float32"
    for name in ("before", "now"):
        assert result[f"{name}_privileged_tokens"] > result[f"{name}_student_tokens"] > result[f"{name}_agent_tokens"] > 0
        assert result[f"{name}_step_s"] >= result[f"{name}_rollout_s"] + result[f"{name}_teacher_s"] > 0
    assert result["speedup_dialogues_per_min"] == round(result["now_dialogues_per_min"] / result["before_dialogues_per_min"], 2)
