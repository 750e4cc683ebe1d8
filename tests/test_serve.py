"""serve.py: OpenAI's API through Flask's test client (completions, chat, models, streaming, every kind of bad input,
the bearer token), then a real server on a free port driven by the official `openai` client, batched requests
against single ones, a client that hangs up mid-stream, and a small load test. The server runs in float32; the tests
that compare its numbers with the model's run in bfloat16 too (emulated where the CPU lacks it), against the model in
the same dtype."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
from werkzeug.serving import make_server

from checkpoint import CHECKPOINT_NAME, save_checkpoint
from cli import UserError, run_main
from data import load_tokenizer
from generate import StopStrings, chat_to_prompt, format_prompt, word_starts
from runtime import load_for_inference
from serve import TOKEN_ENV, create_app, main

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_tokens_limit": 64, "max_prompt_chars": 200, "max_body_bytes": 2000}
# the dtypes the numbers are compared in, and how far (nats per token) the server's logprobs may be from the model's
DTYPES = {"float32": 1e-3, "bfloat16": 2e-2}


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def instruct_dir(tiny_ckpt, tmp_path_factory):
    """tiny_ckpt marked as finetune_instruct.py marks its checkpoints: a model with the chat template."""
    folder = tmp_path_factory.mktemp("instruct")
    saved = torch.load(tiny_ckpt / CHECKPOINT_NAME, weights_only=True)
    save_checkpoint({"model": saved["model"], "model_config": saved["model_config"], "prompt_format": "alpaca"},
                    folder)
    load_tokenizer(tiny_ckpt).save(folder)
    return folder


def make_app(checkpoint, token="", dtype="float32", **settings):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, token) if token else mp.delenv(TOKEN_ENV, raising=False)
        return create_app(str(checkpoint), device="cpu", dtype=dtype, **settings)


@pytest.fixture(scope="module")
def client(checkpoint, tiny_classifier):
    app = make_app(checkpoint, classifier=str(tiny_classifier), **LIMITS)
    yield app.test_client()
    app.engine.close()


@pytest.fixture(scope="module")
def chat_client(instruct_dir):
    app = make_app(instruct_dir, **LIMITS)
    yield app.test_client()
    app.engine.close()


def chunks(raw):
    """The data of each server-sent event; the last must be [DONE], which is left out."""
    data = [block.removeprefix("data: ") for block in raw.strip().split("\n\n")]
    assert data[-1] == "[DONE]" and all(block.startswith("data: ") for block in raw.strip().split("\n\n"))
    return [json.loads(d) for d in data[:-1]]

# ----------------------------------------------------------------------------- the endpoints


def test_health(client, checkpoint):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok" and r.json["model"] == checkpoint.name and r.json["device"] == "cpu"
    assert r.json["parameters"] > 30_000 and r.json["block_size"] == 32 and r.json["vocab_size"] == 300
    assert r.json["classifier"] == {"labels": ["ham", "spam"]} and r.json["chat"] is False
    assert r.json["limits"]["max_tokens"] == 64 and r.json["limits"]["batch_size"] == 32


def test_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    assert b"v1/completions" in r.data and b"getReader" in r.data and b"[DONE]" in r.data


def test_models(client, checkpoint):
    listed = client.get("/v1/models").json
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [checkpoint.name]
    assert client.get(f"/v1/models/{checkpoint.name}").json["object"] == "model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"


def test_completion(client, checkpoint):
    body = {"model": "anything", "prompt": "The cat", "max_tokens": 10, "seed": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.is_json
    assert r.json["object"] == "text_completion" and r.json["id"].startswith("cmpl-") and r.json["model"] == "ckpt"
    choice = r.json["choices"][0]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["finish_reason"] in ("stop", "length")
    prompt_tokens = len(load_tokenizer(checkpoint).encode_document("The cat"))
    usage = r.json["usage"]
    assert usage["prompt_tokens"] == prompt_tokens and 1 <= usage["completion_tokens"] <= 10
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    again = client.post("/v1/completions", json=body)
    assert again.json["choices"][0]["text"] == choice["text"]  # the seed fixes the sample
    nulls = {"prompt": "The cat", "max_tokens": None, "top_k": None, "top_p": None, "seed": None, "stop": None}
    assert client.post("/v1/completions", json=nulls).status_code == 200  # null: the default


@pytest.mark.parametrize("params", [{"temperature": 0}, {"seed": 7, "temperature": 1.0, "top_k": 50, "top_p": 0.9}])
def test_stream_joins_to_the_whole_answer(client, params):
    body = {"prompt": "The dog", "max_tokens": 20, **params}
    whole = client.post("/v1/completions", json=body).json
    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    got = chunks(r.get_data(as_text=True))
    *texts, last, usage = got
    assert all(c["object"] == "text_completion" and c["choices"][0]["finish_reason"] is None for c in texts)
    assert "".join(c["choices"][0]["text"] for c in texts) == whole["choices"][0]["text"]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_stop_strings_cut_the_text(client):
    body = {"prompt": "the café", "max_tokens": 30, "temperature": 1.0, "seed": 3}
    text = client.post("/v1/completions", json=body).json["choices"][0]["text"]
    stop = text[5:8]
    assert len(stop) == 3 and text.find(stop) >= 1, text
    for stream in (False, True):
        r = client.post("/v1/completions", json={**body, "stop": [stop, "never appears"], "stream": stream})
        if stream:
            got = chunks(r.get_data(as_text=True))
            cut, reason = "".join(c["choices"][0]["text"] for c in got), got[-1]["choices"][0]["finish_reason"]
        else:
            cut, reason = r.json["choices"][0]["text"], r.json["choices"][0]["finish_reason"]
        assert (cut, reason) == (text[:text.find(stop)], "stop")


def test_stop_strings_hold_back_what_could_start_a_stop():
    stops = StopStrings([". B"])
    assert list(stops.cut(["Hel", "lo. Bye", "!"])) == ["Hel", "lo"] and stops.found
    stops = StopStrings([". B"])
    assert list(stops.cut(["ab", "c.", " d"])) == ["ab", "c", ". d"] and not stops.found  # ". " held, let go
    gen = StopStrings(["z"]).cut(["x", "y"])
    assert list(gen) == ["x", "y"]


def test_chat(chat_client, instruct_dir):
    messages = [{"role": "user", "content": "Name a color."}]
    r = chat_client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json["object"] == "chat.completion" and r.json["id"].startswith("chatcmpl-")
    message = r.json["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    prompt_tokens = len(load_tokenizer(instruct_dir).encode_document(format_prompt({"instruction": "Name a color."})))
    assert r.json["usage"]["prompt_tokens"] == prompt_tokens
    s = chat_client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 8,
                                                       "temperature": 0, "stream": True})
    got = chunks(s.get_data(as_text=True))
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in got)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got) == message["content"]
    assert got[-1]["choices"][0]["finish_reason"] == r.json["choices"][0]["finish_reason"]
    assert chat_client.get("/health").json["chat"] is True


def test_chat_needs_an_instruction_tuned_model(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json["error"]["param"] == "messages"
    assert "not instruction-tuned" in r.json["error"]["message"]


def test_chat_messages_become_the_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "Name a color."}]
    assert chat_to_prompt(messages) == format_prompt({"instruction": "Name a color.",
                                                      "input": "system: Be brief.\nuser: Hi\nassistant: Hello"})
    assert chat_to_prompt(messages[-1:]) == format_prompt({"instruction": "Name a color."})


def test_classify(client):
    r = client.post("/v1/classify", json={"text": "WIN free cash prize now"})
    assert r.status_code == 200 and set(r.json) == {"label", "probability"}
    assert r.json["label"] in ("ham", "spam") and 0.5 <= r.json["probability"] <= 1.0


def test_classify_without_a_classifier(chat_client):
    r = chat_client.post("/v1/classify", json={"text": "hello"})
    assert r.status_code == 404 and "--classifier" in r.json["error"]["message"]

# ----------------------------------------------------------------------------- bad input: always a 4xx that says why


BAD_COMPLETION = [  # (body: a dict sent as JSON, or raw bytes; status; the param the error names)
    (b"{not json", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    (b"", 400, None),
    (b"[" * 1500, 400, None),  # nested too deep to parse
    (b"[1, 2]", 400, None),
    (b'"The cat"', 400, None),
    (b'{"prompt": "x", "prompt": "x"' + b" " * 3000 + b"}", 413, None),
    ({}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x" * 201}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": None}, 400, "prompt"),
    ({"prompt": ["x"] * 100}, 400, "prompt"),  # more prompts than one request may hold
    ({"prompt": [1, 300]}, 400, "prompt"),  # a token id outside the vocabulary (300 ids)
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1.5]}, 400, "prompt"),
    ({"prompt": "x", "promt": "x"}, 400, "promt"),
    ({"prompt": "x", "max_new_tokens": 5}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": 10**400}, 400, "temperature"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.01}, 400, "top_p"),
    ({"prompt": "x", "top_p": False}, 400, "top_p"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 2**63}, 400, "seed"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stream": 1}, 400, "stream"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": ["x"] * 5, "n": 16}, 400, "n"),  # 80 choices in all
    ({"prompt": "x", "stop": ""}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "model": 3}, 400, "model"),
]


def post(client, path, body):
    if isinstance(body, bytes):
        return client.post(path, data=body, content_type="application/json")
    return client.post(path, json=body)


def assert_openai_error(r, status, param):
    assert r.status_code == status and r.is_json
    error = r.json["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param:
        assert error["message"].startswith(param) or f"'{param}'" in error["message"]


@pytest.mark.parametrize("body, status, param", BAD_COMPLETION)
def test_bad_completion_request(client, body, status, param):
    assert_openai_error(post(client, "/v1/completions", body), status, param)


@pytest.mark.parametrize("body, param", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
])
def test_bad_chat_request(chat_client, body, param):
    assert_openai_error(post(chat_client, "/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize("body, param", [({}, "text"), ({"text": ""}, "text"), ({"text": 3}, "text"),
                                         ({"text": "x" * 201}, "text"), ({"txt": "a"}, "txt"),
                                         ({"text": "a", "prompt": "a"}, "prompt")])
def test_bad_classify_request(client, body, param):
    assert_openai_error(post(client, "/v1/classify", body), 400, param)


def test_error_messages_are_helpful(client):
    message = lambda body: post(client, "/v1/completions", body).json["error"]["message"]  # noqa: E731
    assert "did you mean 'prompt'?" in message({"promt": "x"})
    assert "did you mean 'max_tokens'?" in message({"prompt": "x", "max_token": 5})
    assert "from 0 to 64" in message({"prompt": "x", "max_tokens": 65})
    assert "not valid JSON" in message(b"{")
    assert "2000 bytes" in message(b" " * 3000)


@pytest.mark.parametrize("method, path, status", [("get", "/v1/completions", 405), ("put", "/health", 405),
                                                  ("delete", "/v1/classify", 405), ("post", "/", 405),
                                                  ("get", "/nope", 404), ("post", "/v1/generate", 404)])
def test_wrong_method_or_path(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status and r.is_json and r.json["error"]["message"]
    if status == 405:
        assert r.headers["Allow"]


def test_bearer_token(checkpoint):
    app = make_app(checkpoint, token="s3cret")
    client = app.test_client()
    for header in (None, "Bearer wrong", "Bearer s3cre", "Basic s3cret", "s3cret"):
        r = client.get("/v1/models", headers={"Authorization": header} if header else {})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json["error"]["code"] == "invalid_api_key" and "token" in r.json["error"]["message"]
    assert client.get("/nope").status_code == 401  # no probing of paths without the token
    ok = {"Authorization": "Bearer s3cret"}
    assert client.get("/health", headers=ok).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=ok).status_code == 200
    assert client.get("/").status_code == 200  # the page holds no data; it asks for the token
    app.engine.close()


def test_create_app_settings(checkpoint, tmp_path):
    with pytest.raises(UserError, match="did you mean --max_tokens_limit"):
        create_app(str(checkpoint), max_token_limit=5)
    with pytest.raises(UserError, match="max_batch_size must be >= 1, got 0"):
        create_app(str(checkpoint), max_batch_size=0)
    with pytest.raises(UserError, match="no checkpoint"):
        create_app(str(tmp_path))


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["serve.py", f"--model={tmp_path}"])
    with pytest.raises(SystemExit) as exit:
        run_main(main)
    assert exit.value.code == 2 and capsys.readouterr().err.startswith("error: no checkpoint at")

# ----------------------------------------------------------------------------- a real server


def test_command_line_server(checkpoint, tmp_path):
    """python serve.py: answers on 127.0.0.1 (the default host), without debug mode."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | {"OMP_NUM_THREADS": "1"}
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--model={checkpoint}",
                                    f"--port={port}", "--device=cpu"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        for _ in range(600):  # up to a minute for torch to import and the model to load
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert health["model"] == checkpoint.name
    finally:
        process.terminate()
        process.wait(timeout=30)
    printed = (tmp_path / "server.log").read_text()
    assert "Running on http://127.0.0.1:" in printed and "Debug mode: off" in printed


def run_server(app):
    """The app on a free port of 127.0.0.1, in a thread: (base URL, a function that stops it)."""
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        thread.join()
        app.engine.close()

    return f"http://127.0.0.1:{httpd.server_port}", stop


@pytest.fixture(scope="module")
def server(checkpoint, tiny_classifier):
    """A high token limit lets a stream run long; a token tests the client's header."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, "s3cret")
        app = create_app(str(checkpoint), device="cpu", dtype="float32", classifier=str(tiny_classifier),
                         max_tokens_limit=1_000_000)
    url, stop = run_server(app)
    yield url
    stop()


@pytest.fixture(scope="module", params=list(DTYPES))
def typed_server(request, checkpoint):
    """(URL, dtype) of a server in each dtype of DTYPES, with a token: for the tests that compare numbers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, "s3cret")
        app = create_app(str(checkpoint), device="cpu", dtype=request.param)
    url, stop = run_server(app)
    yield url, request.param
    stop()


@pytest.fixture(scope="module")
def chat_server(instruct_dir):
    url, stop = run_server(make_app(instruct_dir))
    yield url
    stop()


def test_the_openai_client(server, chat_server, checkpoint):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="s3cret")
    assert [m.id for m in client.models.list().data] == [checkpoint.name]
    kw = dict(model=checkpoint.name, prompt="The bird", max_tokens=20, temperature=1.0, seed=5)
    whole = client.completions.create(**kw)
    assert whole.usage.completion_tokens == 20 or whole.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer from 0"):
        client.completions.create(model=checkpoint.name, prompt="x", max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()
    chat = openai.OpenAI(base_url=f"{chat_server}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Name a color."}]
    answer = chat.chat.completions.create(model="any", messages=messages, max_tokens=10, temperature=0)
    streamed = chat.chat.completions.create(model="any", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content


def test_the_openai_client_with_every_prompt_form(typed_server, checkpoint):
    """OpenAI's /v1/completions as lm-evaluation-harness uses it: prompts as strings, lists of them, token ids and
    lists of those; n choices; logprobs and echo, with max_tokens=0 to score a text; an empty prompt. The scores
    are those of the model in the server's dtype."""
    server, dtype = typed_server
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="s3cret")
    model, tokenizer, _ = load_for_inference(str(checkpoint), "cpu", dtype)
    create = lambda **kw: client.completions.create(model="any", **kw)  # noqa: E731
    text = "The river valley was named after a café owner"
    ids = tokenizer.encode_document(text)

    scored = create(prompt=text, max_tokens=0, echo=True, logprobs=0)
    choice = scored.choices[0]
    assert choice.text == text and scored.usage.completion_tokens == 0 and choice.finish_reason == "length"
    with torch.no_grad():  # the sum of the echoed logprobs is the model's log-likelihood of the text after <eot>
        logits, _ = model(torch.tensor([ids]))
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:]), reduction="sum").item()
    assert abs(-sum(choice.logprobs.token_logprobs) - nll) < DTYPES[dtype] * len(ids)
    assert "".join(choice.logprobs.tokens) == text and choice.logprobs.text_offset[0] == 0

    as_ids = create(prompt=ids, max_tokens=1, echo=True, logprobs=2, temperature=0).choices[0]  # <eot> included
    assert as_ids.logprobs.token_logprobs[0] is None  # a token-id prompt's first token has no context
    assert as_ids.logprobs.token_logprobs[1:len(ids)] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)
    new = as_ids.logprobs.top_logprobs[-1]
    assert len(new) == 2 and max(new.values()) == pytest.approx(as_ids.logprobs.token_logprobs[-1], abs=1e-5)

    batch = create(prompt=[[ids[1]], [ids[2], ids[3]], "The"], max_tokens=3, n=2, seed=7, temperature=1.0)
    assert [c.index for c in batch.choices] == list(range(6))
    again = create(prompt=[[ids[2], ids[3]]], max_tokens=3, n=2, seed=7, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in batch.choices[2:4]]  # seeded: reproducible
    assert batch.usage.prompt_tokens == 1 + 2 + len(tokenizer.encode_document("The"))  # each prompt once

    with pytest.raises(openai.BadRequestError, match="prompt must hold 1 to 64 prompts, got 10000"):
        create(prompt=["x"] * 10_000)

    empty = create(prompt="", max_tokens=5, temperature=0)
    alone = create(prompt=[[tokenizer.eot_id]], max_tokens=5, temperature=0)
    assert empty.choices[0].text == alone.choices[0].text and empty.usage.prompt_tokens == 1

    whole = create(prompt="The bird", max_tokens=12, temperature=0, logprobs=1)
    streamed = list(create(prompt="The bird", max_tokens=12, temperature=0, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert [p for c in streamed if c.choices[0].logprobs for p in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(whole.choices[0].logprobs.token_logprobs)


def test_batched_requests_get_the_tokens_they_get_alone(typed_server):
    """16 greedy requests at once, decoded together, each as it is decoded alone (and seeded samples likewise)."""
    server, _ = typed_server
    headers = {"Authorization": "Bearer s3cret"}
    bodies = [{"prompt": f"The {word}", "max_tokens": 24, "temperature": 0} for word in
              "cat dog bird tree river stone bridge church café people old near valley grew sat mat".split()]
    bodies += [{"prompt": "The café", "max_tokens": 24, "temperature": 1.0, "seed": s} for s in range(4)]
    ask = lambda body: requests.post(f"{server}/v1/completions", json=body, headers=headers,  # noqa: E731
                                     timeout=60).json()["choices"][0]["text"]
    alone = [ask(body) for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(ask, bodies))
    assert together == alone
    assert requests.get(f"{server}/health", headers=headers).json()["batch"]["peak"] > 4  # they did share steps


@pytest.mark.parametrize("params", [{"temperature": 1e-45}, {"temperature": 5e-324}, {"top_p": 5e-324},
                                    {"top_p": 1e-300, "temperature": 2}])
def test_extreme_sampling_values_are_answered(client, params):
    """Numbers the sampler once failed on (a 500): tiny temperatures decode greedily, a tiny top_p keeps one token."""
    r = client.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 5, **params})
    assert r.status_code == 200 and r.json["usage"]["completion_tokens"] >= 1


def test_a_dropped_request_stops_its_generation(server):
    """A client that sends a long non-streamed request and hangs up: the engine lets its row go."""
    headers = {"Authorization": "Bearer s3cret"}
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "The", "max_tokens": 1_000_000, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 20
        while requests.get(f"{server}/health", headers=headers).json()["batch"]["active"] == 0:
            assert time.time() < deadline
            time.sleep(0.05)  # until it is being decoded
    deadline = time.time() + 20
    while requests.get(f"{server}/health", headers=headers).json()["batch"]["active"] > 0:
        assert time.time() < deadline, "the dropped request is still decoding"
        time.sleep(0.1)


def test_client_leaving_mid_stream_frees_its_row(server):
    headers = {"Authorization": "Bearer s3cret"}
    body = {"prompt": "The", "max_tokens": 1_000_000, "temperature": 0, "stream": True}  # greedy: no early end
    r = requests.post(f"{server}/v1/completions", json=body, stream=True, headers=headers, timeout=30)
    lines = r.iter_lines()
    assert next(lines).startswith(b"data: ")  # generation is under way
    r.close()  # hang up; a million tokens would keep the engine busy for minutes
    t0 = time.time()
    after = requests.post(f"{server}/v1/completions", json={"prompt": "The", "max_tokens": 5}, headers=headers,
                          timeout=20)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] and time.time() - t0 < 10


def check(kind, r):
    """The status code, after checking that the answer is well-formed for its kind."""
    if kind == "stream":
        got = chunks(r.text)
        assert got[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    elif kind == "bad":
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    else:
        assert set(r.json()) >= {"complete": {"choices", "usage"}, "classify": {"label"}, "health": {"status"}}[kind]
    return r.status_code


def test_small_load(server):
    """40 requests, 8 at a time, of every kind: no 5xx, every answer well-formed."""
    requests_by_kind = {
        "complete": ("post", "/v1/completions", {"prompt": "The cat", "max_tokens": 16}),
        "stream": ("post", "/v1/completions", {"prompt": "The cat", "max_tokens": 16, "stream": True}),
        "classify": ("post", "/v1/classify", {"text": "free cash"}),
        "health": ("get", "/health", None),
        "bad": ("post", "/v1/completions", {"prompt": "x", "top_p": 2}),
    }
    kinds = list(requests_by_kind) * 8

    def one(kind):
        method, path, body = requests_by_kind[kind]
        r = requests.request(method, server + path, json=body, timeout=60, headers={"Authorization": "Bearer s3cret"})
        return check(kind, r)

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, kinds))
    assert len(statuses) == 40 and all(s < 500 for s in statuses)
    assert statuses.count(200) == 32


def test_the_data_s_unknown_word_is_never_sampled_unless_allowed(tiny_ckpt, tmp_path):
    """As sample.py: a model whose meta.json names a marker for rare words (<unk>) never starts it,
    unless --allow_unk=True (the engine keeps suppress_ids out: tests/test_engine.py)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    app = make_app(folder)
    assert app.engine.suppress_ids is None  # its data names no marker
    app.engine.close()
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "unknown_word": "<unk>"}))
    for allow, expected in ((False, word_starts(load_tokenizer(folder), "<unk>")), (True, None)):
        app = make_app(folder, allow_unk=allow)
        body = {"prompt": "The history of", "max_tokens": 5, "temperature": 1.0, "seed": 0}
        assert app.test_client().post("/v1/completions", json=body).status_code == 200
        app.engine.close()
        assert app.engine.suppress_ids == expected
