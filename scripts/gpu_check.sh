#!/usr/bin/env bash
# Every GPU measurement of docs/scaling.md's "One GPU" section in one command, one JSON at the end.
#
#   bash scripts/gpu_check.sh --wheels            # here, with the package index: the wheels into .whl/ (~57 MB)
#   bash scripts/gpu_check.sh                     # on the GPU machine (no index needed): -> runs/gpu_check.json
#   bash scripts/gpu_check.sh --smoke             # the same steps at toy sizes on the CPU (the test runs this)
#
# Steps, each under its own time limit so that one slow step never loses the others' figures:
#   1. bench.py, qwen2.5-1.5b shape, bf16, 64 dialogues x 6 turns: kv, kv_compiled, generate_batched,
#      generate_static (tok/s, decode MBU, peak memory, identical dialogues)
#   2. bench.py, qwen3-4b shape, 4-bit, 64 dialogues: kv, kv_compiled
#   3. savpo.py, 3 steps on a random qwen3-4b (4-bit, sampling at T=1, the simulator speaking through the
#      model): seconds and peak memory per step
# Random weights of real shapes and the embedded tokenizer: speed and memory depend on the shapes only.
# A machine whose torch lacks bitsandbytes (or has another transformers) gets the pinned wheels from
# .whl/ installed into .whl/site, used only if they import; otherwise the image's own packages run.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  exec pip download --no-deps -d .whl bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 gguf==0.19.0
fi

SMOKE=0; [ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

if ls .whl/*.whl >/dev/null 2>&1 && ! python -c "import bitsandbytes, peft, gguf" 2>/dev/null; then
  pip install --quiet --no-deps --target .whl/site .whl/*.whl >/dev/null 2>&1
  if PYTHONPATH=.whl/site python -c "import transformers, peft, bitsandbytes, gguf" 2>/dev/null; then
    export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "the wheels in .whl/ do not import here; using the image's packages" >&2
  fi
fi

if [ $SMOKE = 1 ]; then
  ARCH_A=tiny-qwen3; ARCH_B=tiny-qwen3; QUANT=none; SIZE="--dialogues 4 --turns 2 --policy-tokens 8 --user-tokens 6 --dtype float32"
  METHODS_A=kv,kv_compiled,generate_batched; LIMIT=300; STEPS=1
  TRAIN="train.personas_per_step=2 train.group_size=2 simulator.max_turns=2 rollout.max_new_tokens=8"
else
  ARCH_A=qwen2.5-1.5b; ARCH_B=qwen3-4b; QUANT=4bit; SIZE="--dialogues 64 --turns 6"
  METHODS_A=kv,kv_compiled,generate_batched,generate_static; LIMIT=200; STEPS=3
  TRAIN="train.personas_per_step=8 train.group_size=8 simulator.max_turns=8 rollout.max_new_tokens=96"
fi

step() {  # step NAME LIMIT_S COMMAND...: the command's output in OUT/NAME.log, its exit status in OUT/NAME.rc
  local name=$1 limit=$2; shift 2
  echo "[$name] $*" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo $? > "$OUT/$name.rc"
}

python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" > "$OUT/device.txt" 2>&1
step bench_a $LIMIT python bench.py --arch $ARCH_A $SIZE --methods $METHODS_A
step bench_b $LIMIT python bench.py --arch $ARCH_B --quantization $QUANT $SIZE --methods kv,kv_compiled
step write_model 120 python bench.py --arch $ARCH_B --write-model "$OUT/model"
step savpo $((LIMIT + 40)) python savpo.py model.name_or_path="$OUT/model" model.warm_start= model.quantization=$QUANT stpr.mode=direction \
  simulator.utterance=llm simulator.appraiser=lexical train.gradient_checkpointing=true $TRAIN \
  rollout.temperature=1.0 train.lr=1e-5 train.steps=$STEPS train.save_every=0 out_dir="$OUT/savpo"

python - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".log")) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
report = {"device": open(os.path.join(out, "device.txt")).read().strip()}
for name in ("bench_a", "bench_b", "write_model", "savpo"):
    rc = open(os.path.join(out, name + ".rc")).read().strip()
    report[name] = {"rc": int(rc), "timed_out": rc in ("124", "137")}
    if name.startswith("bench"):
        report[name]["result"] = last_json(name)
metrics = os.path.join(out, "savpo", "metrics.jsonl")
if os.path.exists(metrics):
    steps = [json.loads(l) for l in open(metrics) if '"step_s"' in l]
    report["savpo"]["steps"] = [{k: s.get(k) for k in ("step", "step_s", "rollout_s", "update_s", "peak_mem_gb",
                                                       "rollout_tok_s")} for s in steps]
for name in report:
    if isinstance(report[name], dict) and report[name].get("rc"):
        report[name]["log_tail"] = open(os.path.join(out, name + ".log")).read()[-1500:]
path = os.path.join(out, "gpu_check.json")
json.dump(report, open(path, "w"), indent=1)
print(json.dumps(report))
EOF
