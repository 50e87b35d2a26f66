"""The simulator model behind an OpenAI-compatible endpoint (`simulator.model: http://HOST:PORT/v1`).

A GPU user can put a strong user model beside the policy: vLLM, `transformers serve` or any server that
speaks OpenAI's `POST {base}/chat/completions`. The simulator sends it the callee's lines
(`simulator.utterance: llm`) and the generative appraiser's tags (`simulator.appraiser: generative`); the
rule, the checks on every line and the template fallback stay in simulator.py, so a served model changes
the words, never the rules.

    transformers serve MODEL --port 8000          # or vLLM: vllm serve MODEL --port 8000
    python savpo.py simulator.model=http://127.0.0.1:8000/v1 simulator.endpoint_model=MODEL \\
                    simulator.utterance=llm simulator.appraiser=generative

Choices:
  - Only the standard library (urllib): no client package to pin. The requests of one turn go out together
    from a thread pool (`chat_many`), so a server that batches (vLLM, continuous batching) sees them at once.
  - Mid-run, a timeout, an HTTP error or a reply without text is *counted* (`failures`: timeout / error /
    unusable) and the caller falls back to its template line or the lexical appraiser: never fatal. At the
    start, `check()` sends one tiny request, so a wrong URL or a server that is not running stops the run
    with one sentence naming `simulator.model` -- before hours of template-only calls.
  - The `llm` appraiser is refused with an endpoint (config.py): it reads next-token log-probabilities of
    " Yes" / " No", and `transformers serve` refuses `logprobs` (vLLM gives at most the top 20, which may
    miss both), so it would silently read noise. The `generative` appraiser asks for text and works.
  - Loopback hosts are reached without the environment's proxy settings; `OPENAI_API_KEY`, if set, is
    sent as a bearer token (vLLM's `--api-key`).
"""

import concurrent.futures
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def is_url(name):
    """Does `simulator.model` name an endpoint (http:// or https://) rather than a model?"""
    return isinstance(name, str) and name.strip().lower().startswith(("http://", "https://"))


def url_problem(url):
    """Why `url` is no usable base URL (a sentence fragment), or None."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        return "does not start with http:// or https://"
    if not parts.hostname:
        return "names no host"
    try:
        parts.port
    except ValueError:
        return "has a port that is not a number in 0-65535"
    if parts.query or parts.fragment:
        return "has a query or fragment; give the base URL only"
    return None


class EndpointError(RuntimeError):
    """The endpoint did not give a usable reply; `kind` is timeout | error | unusable."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class Reply:
    text: str
    finish_reason: str      # "stop" | "length" | ...
    tokens: int             # completion tokens the server reports (0 if it does not)


class Endpoint:
    """One OpenAI-compatible chat endpoint and one model name; counts what went wrong.

    >>> ep = Endpoint("http://127.0.0.1:8000/v1", "my-model", timeout=30)
    >>> ep.chat_many([{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}])
    [Reply(text='Hello! How can I help?', finish_reason='stop', tokens=7)]       # or an EndpointError
    """

    def __init__(self, base_url, model, timeout=30.0):
        self.base_url = base_url.strip().rstrip("/")
        self.model, self.timeout = model, timeout
        host = urllib.parse.urlsplit(self.base_url).hostname
        handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK else []
        self.opener = urllib.request.build_opener(*handlers)
        self.requests = 0
        self.failures = {"timeout": 0, "error": 0, "unusable": 0}

    def _post(self, path, body, timeout):
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with self.opener.open(request, timeout=timeout) as response:
                raw = response.read()
        except (socket.timeout, TimeoutError) as e:
            raise EndpointError("timeout", f"no reply within {timeout:g} s ({e})") from None
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace").strip()
            raise EndpointError("error", f"HTTP {e.code} {e.reason}: {detail}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            kind = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else "error"
            raise EndpointError(kind, f"{reason}") from None
        except (OSError, ValueError) as e:         # a connection reset mid-read, a bad status line
            raise EndpointError("error", f"{type(e).__name__}: {e}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise EndpointError("unusable", f"the reply is not JSON: {raw[:120]!r}") from None

    def chat(self, messages, max_tokens, temperature=0.0, top_p=1.0, seed=None, timeout=None):
        """One chat completion -> Reply; raises EndpointError. Not counted (`chat_many` counts)."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "stream": False}
        if seed is not None:
            body["seed"] = seed
        data = self._post("/chat/completions", body, timeout or self.timeout)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not text")
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError("unusable", f"the reply holds no message text ({e}): {str(data)[:160]}") from None
        tokens = (data.get("usage") or {}).get("completion_tokens") or 0
        return Reply(text=text, finish_reason=choice.get("finish_reason") or "", tokens=int(tokens))

    def chat_many(self, requests):
        """Many chat completions at once (a thread pool; the server sees them together). requests: dicts of
        `chat`'s keyword arguments. Returns one Reply or EndpointError per request, in order, and counts the
        failures by kind."""
        if not requests:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(requests))) as pool:
            futures = [pool.submit(self.chat, **r) for r in requests]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except EndpointError as e:
                self.failures[e.kind] += 1
                out.append(e)
        self.requests += len(requests)
        return out

    def check(self, key="simulator.model"):
        """One tiny request at the start: a server that is not there, or that does not serve `self.model`,
        stops here with one sentence naming the config key and the fix (later failures are only counted)."""
        try:
            self.chat([{"role": "user", "content": "Hello"}], max_tokens=1, timeout=max(self.timeout, 120.0))
        except EndpointError as e:
            raise EndpointError(e.kind, (
                f"config key '{key}' is {self.base_url!r}, but its chat endpoint gave no usable reply for model "
                f"{self.model!r} ({e}); start an OpenAI-compatible server there (e.g. `transformers serve MODEL "
                f"--port PORT`), or fix the URL or simulator.endpoint_model.")) from None

    def health(self):
        """The counts the simulator adds to its health stats."""
        return {"endpoint_requests": self.requests, "endpoint_timeouts": self.failures["timeout"],
                "endpoint_errors": self.failures["error"], "endpoint_unusable": self.failures["unusable"]}


# --------------------------------------------------------------------------- a local server, for tests and bench.py

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`transformers serve MODEL_DIR` on 127.0.0.1 in a subprocess, offline (HF_HUB_OFFLINE=1), on the CPU
    unless told otherwise; `with LocalServer(path) as url:` waits until it answers /health, yields the base URL
    (http://127.0.0.1:PORT/v1) and stops it. Starting takes ~5 s on a free CPU (minutes on a loaded one: hence
    `startup_s`). A server that does not come up is a RuntimeError with the end of
    its log (the `serving` extra missing is the usual cause: see requirements.txt)."""

    def __init__(self, model_dir, port=None, device="cpu", startup_s=300.0, log_path=None):
        self.model_dir, self.port, self.device, self.startup_s = model_dir, port or free_port(), device, startup_s
        self.log_path = log_path or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve-{self.port}.log")
        self.process = None

    def __enter__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # one torch thread unless told otherwise: on shared CPU cores a second one mostly spin-waits
        env.setdefault("OMP_NUM_THREADS", "1")
        cli = os.path.join(os.path.dirname(sys.executable), "transformers")
        cmd = [cli if os.path.exists(cli) else "transformers", "serve", self.model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", self.device, "--dtype", "float32"]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return f"http://127.0.0.1:{self.port}/v1"
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        with open(self.log_path) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"`{' '.join(cmd)}` did not answer /health within {self.startup_s:g} s; its log ends:\n{tail}")

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
