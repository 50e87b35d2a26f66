"""checkpoint.py and runfiles.py: what a resume reads back after a kill, a full disk or a hand edit -- a cut-off
last log line, a `latest` naming a missing step, no complete checkpoint -- and that a file is never left
half-written."""
import json
import os

import pytest
import torch

import checkpoint
import lm
import runfiles
from conftest import make_tiny_model


@pytest.fixture
def run(tmp_path, tokenizer):
    """A run folder with complete checkpoints of steps 1 and 2 of a tiny LoRA model, and its model."""
    model = lm.add_lora(make_tiny_model(tokenizer), {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.write(str(root), step, model, {"step": step})
    return tmp_path, model


def test_latest_naming_a_missing_step_says_so_and_uses_the_one_before(run):
    """It used to say the missing folder 'was moved to step_000003.damaged'."""
    folder, model = run
    (folder / "checkpoints" / "latest").write_text("step_000003")
    said = []
    path, state = checkpoint.load(str(folder / "checkpoints"), model, said.append)
    assert state["step"] == 2 and path.endswith("step_000002")
    assert said == [f"{folder / 'checkpoints' / 'latest'} names step_000003, which does not exist; the run resumes "
                    f"from step_000002, the newest complete checkpoint before it."]
    assert not (folder / "checkpoints" / "step_000003.damaged").exists()


def test_a_latest_that_names_nothing_is_said_and_never_moves_the_folder(run):
    """An empty `latest` used to make the checkpoints folder itself 'damaged' and rename it."""
    folder, model = run
    (folder / "checkpoints" / "latest").write_bytes(b"\xff\x00")
    said = []
    _, state = checkpoint.load(str(folder / "checkpoints"), model, said.append)
    assert state["step"] == 2 and (folder / "checkpoints").is_dir() and "names no checkpoint" in said[0]


def test_the_only_checkpoint_damaged_resumes_from_step_zero_not_in_a_circle(run):
    folder, model = run
    (folder / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    for step in ("step_000001", "step_000002"):
        (folder / "checkpoints" / step / "trainer.pt").write_bytes(b"cut")
    said = []
    path, state = checkpoint.resume(str(folder), model, log=said.append)
    assert (path, state) == (None, None) and (folder / "metrics.jsonl").read_text() == ""
    assert "resumes from step_000001" in said[0] and "resumes from step 0" in said[1] and "starts again" in said[2]
    with pytest.raises(checkpoint.CheckpointError, match="nothing to resume in .*start without --resume"):
        checkpoint.resume(str(folder / "typo"), model)


def test_a_checkpoint_of_another_lora_shape_is_one_sentence(run, tokenizer):
    folder, _ = run
    other = lm.add_lora(make_tiny_model(tokenizer), {"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model .*drop those overrides"):
        checkpoint.load(str(folder / "checkpoints"), other)


def test_a_cut_off_last_line_is_dropped_with_a_sentence(tmp_path):
    """A kill or a full disk mid-write leaves the last line cut short: resume used to stop with a
    JSONDecodeError until the file was edited by hand."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    said = []
    checkpoint.truncate_jsonl(str(path), 2, said.append)
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2]
    assert said == [f"{path}: its last line (line 3) was cut off by a kill or a full disk while it was written; it "
                    f"is dropped, and that step is logged again."]
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')     # damage in the middle is no kill: named, not guessed at
    with pytest.raises(checkpoint.CheckpointError, match=r"metrics.jsonl:2 is not valid JSON .*delete or fix that line"):
        checkpoint.truncate_jsonl(str(path), 2)
    path.write_bytes(b'{"step": 1}\n{"step": 2, "text": "caf\xe9"}\n')
    with pytest.raises(checkpoint.CheckpointError, match=r"metrics.jsonl:2 is not UTF-8 text \(byte 0xe9 at column 25\)"):
        checkpoint.truncate_jsonl(str(path), 2)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("the old report\n")
    with pytest.raises(RuntimeError):
        with runfiles.atomic(str(path)) as f:
            f.write("half a new rep")
            raise RuntimeError("killed")
    assert path.read_text() == "the old report\n" and os.listdir(tmp_path) == ["report.md"]
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with runfiles.atomic_dir(str(folder)) as tmp:
            torch.save({}, os.path.join(tmp, "weights.pt"))
            raise RuntimeError("killed")
    assert os.listdir(folder) == ["adapter_config.json"] and sorted(os.listdir(tmp_path)) == ["adapter", "report.md"]
