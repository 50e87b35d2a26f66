"""endpoint.py: the simulator model behind an OpenAI-compatible endpoint. The settings a user can get wrong
are one sentence each; the real test starts `transformers serve` on 127.0.0.1 with the embedded model
(offline), plays calls through it and stops it -- no fake server."""
import time

import pytest
import yaml

import config
import endpoint as E
import env
import lm
import personas as P
import rollout
import simulator as S

DOMAINS = ["merchant_recruitment", "courier_recruitment", "broadband_switch"]


@pytest.mark.parametrize("overrides, words", [
    (["simulator.model=http//127.0.0.1:8000/v1"], ["simulator.model", "http://127.0.0.1:8000/v1"]),
    (["simulator.model=http://:8000/v1"], ["simulator.model", "names no host"]),
    (["simulator.model=http://127.0.0.1:99999/v1"], ["simulator.model", "port"]),
    (["simulator.model=http://127.0.0.1:8000/v1"], ["simulator.endpoint_model", "is empty"]),
    (["simulator.model=http://127.0.0.1:8000/v1", "simulator.endpoint_model=m", "simulator.appraiser=llm"],
     ["simulator.appraiser", "log-probabilities", "generative"]),
    (["simulator.model=http://127.0.0.1:8000/v1", "simulator.endpoint_model=m", "simulator.endpoint_timeout=0"],
     ["simulator.endpoint_timeout", "> 0"]),
])
def test_endpoint_settings_a_user_gets_wrong_are_one_sentence(overrides, words):
    with pytest.raises(config.ConfigError) as e:
        config.load(None, overrides)
    message = str(e.value)
    assert all(w in message for w in words) and "\n" not in message


def test_an_endpoint_config_loads_and_is_saved_with_the_run(tmp_path):
    cfg = config.load(None, ["simulator.model=http://127.0.0.1:8000/v1", "simulator.endpoint_model=my/model",
                             "simulator.appraiser=generative", "simulator.utterance=llm"])
    assert not S.own_model(cfg["simulator"]["model"]) and S.own_model("smollm2-135m") and not S.own_model("")
    config.save(cfg, tmp_path)
    saved = yaml.safe_load(open(tmp_path / "config.yaml"))["simulator"]
    assert (saved["model"], saved["endpoint_model"]) == ("http://127.0.0.1:8000/v1", "my/model")


def test_nothing_listening_stops_the_run_in_one_sentence():
    cfg = config.load(None, [f"simulator.model=http://127.0.0.1:{E.free_port()}/v1", "simulator.endpoint_model=m",
                             "simulator.utterance=llm", "simulator.appraiser=lexical"])
    t0 = time.perf_counter()
    with pytest.raises(config.ConfigError) as e:
        S.CognitiveUserSimulator(cfg["simulator"])
    message = str(e.value)
    assert time.perf_counter() - t0 < 10 and "\n" not in message
    assert "simulator.model" in message and "transformers serve" in message


def test_calls_through_transformers_serve_with_the_embedded_model(cfg, tokenizer, stopping_model):
    """`transformers serve` on 127.0.0.1 with the embedded SmolLM2-135M, offline: calls played by rollout.run with
    the callee's lines and the generative appraiser's tags served. Every request is answered (no timeout, no
    error); each callee line is the server's reply or, where the line checks refused it, the template line,
    counted. Then a request that times out against the same live server falls back to exactly the template
    line (and the lexical appraisal) and is counted; the call goes on."""
    model_dir = lm.embedded_path()
    server = E.LocalServer(model_dir)
    with server as url:
        # small budgets: the server answers one request at a time, ~0.1 s a token on a free CPU core (the tags,
        # cut at 8 tokens, do not parse: the lexical fallback is counted as a parse failure -- the plumbing is tested)
        sim_cfg = {**cfg["simulator"], "model": url, "endpoint_model": model_dir, "utterance": "llm",
                   "appraiser": "generative", "max_turns": 2, "max_new_tokens": 8, "generative_max_tokens": 8,
                   "temperature": 0.0, "endpoint_timeout": 600.0}
        sim = S.CognitiveUserSimulator(sim_cfg, seed=0)             # one request first: the server answers
        replies, chat_many = [], sim.endpoint.chat_many

        def recording(requests):                                    # what the server said, as it said it
            out = chat_many(requests)
            replies.extend(r.text.split("\n\n")[0].strip() for r in out if isinstance(r, E.Reply))
            return out

        sim.endpoint.chat_many = recording
        people = P.sample_many(DOMAINS, 2, seed=0)
        roll_cfg = {**cfg["rollout"], "max_new_tokens": 8, "temperature": 0.0}
        trajs = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg, seed=0)
        st = sim.stats
        turns = sum(t.n_turns for t in trajs)
        assert st["endpoint_requests"] == 2 * turns == len(replies)  # one line + one appraisal per agent turn
        assert st["endpoint_timeouts"] == st["endpoint_errors"] == st["endpoint_unusable"] == 0
        assert st["generated_tokens"] > 0 and st["parse_failures"] == turns   # 8 tokens hold no full tags
        lines = [m["content"] for t in trajs for m in t.messages[2::2]]
        refused = st["empty_turns"] + st["role_inversions"] + st["inconsistent_lines"]
        assert len(lines) == turns and sum(line in replies for line in lines) + refused == turns

        # the same live server, a timeout no reply can meet: what a template simulator with the lexical
        # appraiser says and decides, counted; the call goes on
        slow = E.Endpoint(url, model_dir, timeout=0.001)
        batch = env.CallBatch({**cfg, "simulator": sim_cfg}, simulator=S.CognitiveUserSimulator(sim_cfg, endpoint=slow))
        plain = env.CallBatch({**cfg, "simulator": {**sim_cfg, "model": "", "utterance": "template",
                                                    "appraiser": "lexical"}})
        turn = ["Hi, is anything about this worrying you?"] * 2
        assert batch.reset(people[:2], seed=0)[0] == plain.reset(people[:2], seed=0)[0]
        got, want = batch.step(turn), plain.step(turn)
        assert got[0] == want[0] and [i["state"] for i in got[4]] == [i["state"] for i in want[4]]
        assert got[4][0]["health"]["endpoint_timeouts"] == 4       # 2 appraisals + 2 lines, none fatal
        assert not any(got[2]) and not any(got[3])
    assert server.process.poll() is not None                       # stopped
