"""The files of a run folder: written whole, then published; JSONL logs read back line by line.

Every file a command writes for a user (metrics.json, report.md, samples_*.jsonl, config.yaml, view.html,
an adapter folder, ...) is written to a temporary name beside it and renamed over the old one only when
it is complete (`atomic`, `atomic_dir`): a crash or a kill while writing leaves the previous file as it
was, never an empty or half-written one. Step logs (metrics.jsonl, samples.jsonl) are appended one line
at a time (`append_jsonl`), so a kill can cut only the last line; `jsonl_lines` reads such a file back,
one entry per line with the reason a line is unusable (not UTF-8, not JSON), and `cut_off` tells a last
line cut short by a kill or a full disk from a damaged line in the middle.
"""

import contextlib
import json
import os
import shutil
import typing


@contextlib.contextmanager
def atomic(path, mode="w"):
    """`with atomic(path) as f:` -- f writes PATH.tmp-PID, renamed to `path` when the block ends; if the
    block raises, the temporary file is removed and `path` keeps what it held."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic(path) as f:
        f.write(text)


def write_json(path, obj, **kwargs):
    write_text(path, json.dumps(obj, **kwargs) + "\n")


def write_jsonl(path, records):
    with atomic(path) as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def atomic_dir(path):
    """`with atomic_dir(path) as tmp:` -- fill the folder `tmp`; it replaces `path` when the block ends
    (a PEFT adapter: `model.save_pretrained(tmp)`). If the block raises, `path` keeps what it held."""
    tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path, record):
    """One line, written by one call: a kill can cut it short but never interleave two records."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class Line(typing.NamedTuple):
    """One non-blank line of a JSONL file."""
    number: int         # 1-based
    record: object      # the parsed JSON value, or None when `problem` is set
    problem: str        # why the line is unusable ('not valid JSON (...)', 'not UTF-8 text ...'), or None
    raw: bytes          # the line as stored, newline included


def jsonl_lines(path):
    """Every non-blank line of a JSONL file as a `Line`, decoded and parsed one line at a time: a byte
    that is not UTF-8 or a line that is not JSON spoils its own line only. Raises only OSError."""
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")     # an editor's BOM is no damage
            except UnicodeDecodeError as e:
                out.append(Line(number, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                raw))
                continue
            if not text.strip():
                continue
            try:
                out.append(Line(number, json.loads(text), None, raw))
            except ValueError as e:
                out.append(Line(number, None, f"not valid JSON ({getattr(e, 'msg', str(e))})", raw))
    return out


def cut_off(lines):
    """Is the last of `lines` (jsonl_lines) a line that a kill or a full disk cut short: unusable, and
    without the newline that ends every complete line?"""
    return bool(lines) and lines[-1].problem is not None and not lines[-1].raw.endswith(b"\n")
