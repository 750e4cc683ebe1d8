"""serve.py: every endpoint and every kind of bad input through Flask's test client, the bearer token, and a real
server on a free port (whole and streamed answers, a client that hangs up mid-stream, a small load test)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from cli import UserError, run_main
from serve import TOKEN_ENV, create_app, main

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_new_tokens_limit": 64, "max_prompt_chars": 200, "max_body_bytes": 2000}


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def classifier_dir(tiny_classifier):
    return tiny_classifier


def make_app(checkpoint, token="", **settings):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, token) if token else mp.delenv(TOKEN_ENV, raising=False)
        return create_app(str(checkpoint), device="cpu", **settings)


@pytest.fixture(scope="module")
def client(checkpoint, classifier_dir):
    return make_app(checkpoint, classifier_dir=str(classifier_dir), **LIMITS).test_client()


def events(raw):
    """[(event name, data)] of a server-sent event stream."""
    out = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out

# ----------------------------------------------------------------------------- the endpoints


def test_health(client, checkpoint):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok" and r.json["model"] == checkpoint.name and r.json["device"] == "cpu"
    assert r.json["parameters"] > 30_000 and r.json["block_size"] == 32 and r.json["vocab_size"] == 300
    assert r.json["classifier"] == {"labels": ["ham", "spam"]}
    assert r.json["limits"]["max_new_tokens"] == 64


def test_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    assert b"v1/generate" in r.data and b"getReader" in r.data and b"TextDecoderStream" in r.data


def test_generate(client):
    r = client.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 10, "seed": 1})
    assert r.status_code == 200 and r.is_json
    assert set(r.json) == {"text", "model"} and isinstance(r.json["text"], str) and r.json["text"]
    again = client.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 10, "seed": 1})
    assert again.json["text"] == r.json["text"]  # the seed fixes the sample
    unfiltered = {"prompt": "The cat", "max_new_tokens": 3, "top_k": None, "top_p": None, "seed": None}
    assert client.post("/v1/generate", json=unfiltered).status_code == 200  # null: no filter, a random seed


@pytest.mark.parametrize("params", [{"temperature": 0}, {"seed": 7, "temperature": 1.0, "top_k": 50, "top_p": 0.9}])
def test_stream_joins_to_the_whole_answer(client, params):
    body = {"prompt": "The dog", "max_new_tokens": 20, **params}
    whole = client.post("/v1/generate", json=body).json["text"]
    r = client.post("/v1/generate", json={**body, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    got = events(r.get_data(as_text=True))
    assert got[-1] == ("done", {}) and all(name == "message" for name, _ in got[:-1])
    assert "".join(data["text"] for _, data in got[:-1]) == whole


def test_classify(client):
    r = client.post("/v1/classify", json={"text": "WIN free cash prize now"})
    assert r.status_code == 200 and set(r.json) == {"label", "probability"}
    assert r.json["label"] in ("ham", "spam") and 0.5 <= r.json["probability"] <= 1.0


def test_classify_without_a_classifier(checkpoint):
    r = make_app(checkpoint).test_client().post("/v1/classify", json={"text": "hello"})
    assert r.status_code == 404 and "--classifier_dir" in r.json["error"]

# ----------------------------------------------------------------------------- bad input: always a 4xx that says why


BAD_GENERATE = [  # (body: a dict sent as JSON, or raw bytes; status; the field the error names)
    (b"{not json", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    (b"", 400, None),
    (b"[" * 1500, 400, None),  # nested too deep to parse
    (b"[1, 2]", 400, None),
    (b'"The cat"', 400, None),
    (b'{"prompt": "x", "prompt": "x"' + b" " * 3000 + b"}", 413, None),
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 201}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": None}, 400, "prompt"),
    ({"prompt": ["The"]}, 400, "prompt"),
    ({"prompt": "x", "promt": "x"}, 400, "promt"),
    ({"prompt": "x", "max_tokens": 5}, 400, "max_tokens"),
    ({"prompt": "x", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 65}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**30}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "10"}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 1.5}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": True}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": None}, 400, "max_new_tokens"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": None}, 400, "temperature"),
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
]


def post(client, path, body):
    if isinstance(body, bytes):
        return client.post(path, data=body, content_type="application/json")
    return client.post(path, json=body)


@pytest.mark.parametrize("body, status, field", BAD_GENERATE)
def test_bad_generate_request(client, body, status, field):
    r = post(client, "/v1/generate", body)
    assert r.status_code == status and r.is_json
    assert isinstance(r.json["error"], str) and r.json.get("field") == field
    if field:
        assert r.json["error"].startswith(field) or f"'{field}'" in r.json["error"]


@pytest.mark.parametrize("body, field", [({}, "text"), ({"text": ""}, "text"), ({"text": 3}, "text"),
                                         ({"text": "x" * 201}, "text"), ({"txt": "a"}, "txt"),
                                         ({"text": "a", "prompt": "a"}, "prompt")])
def test_bad_classify_request(client, body, field):
    r = post(client, "/v1/classify", body)
    assert r.status_code == 400 and r.json["field"] == field


def test_error_messages_are_helpful(client):
    assert "did you mean 'prompt'?" in post(client, "/v1/generate", {"promt": "x"}).json["error"]
    assert "1 to 64" in post(client, "/v1/generate", {"prompt": "x", "max_new_tokens": 65}).json["error"]
    assert "not valid JSON" in post(client, "/v1/generate", b"{").json["error"]
    assert "2000 bytes" in post(client, "/v1/generate", b" " * 3000).json["error"]


@pytest.mark.parametrize("method, path, status", [("get", "/v1/generate", 405), ("put", "/health", 405),
                                                  ("delete", "/v1/classify", 405), ("post", "/", 405),
                                                  ("get", "/nope", 404), ("post", "/v1/generat", 404)])
def test_wrong_method_or_path(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status and r.is_json and r.json["error"]
    if status == 405:
        assert r.headers["Allow"]


def test_bearer_token(checkpoint):
    client = make_app(checkpoint, token="s3cret").test_client()
    for header in (None, "Bearer wrong", "Bearer s3cre", "Basic s3cret", "s3cret"):
        r = client.get("/health", headers={"Authorization": header} if header else {})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "token" in r.json["error"]
    assert client.get("/nope").status_code == 401  # no probing of paths without the token
    ok = {"Authorization": "Bearer s3cret"}
    assert client.get("/health", headers=ok).status_code == 200
    assert client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 2}, headers=ok).status_code == 200
    assert client.get("/").status_code == 200  # the page holds no data; it asks for the token


def test_create_app_settings(checkpoint, tmp_path):
    with pytest.raises(UserError, match="did you mean --max_new_tokens_limit"):
        create_app(str(checkpoint), max_new_token_limit=5)
    with pytest.raises(UserError, match="max_body_bytes must be at least 1"):
        create_app(str(checkpoint), max_body_bytes=0)
    with pytest.raises(UserError, match="no checkpoint"):
        create_app(str(tmp_path))

def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["serve.py", f"--out_dir={tmp_path}"])
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
        process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--out_dir={checkpoint}",
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


@pytest.fixture(scope="module")
def server(checkpoint, classifier_dir):
    """serve.py's app on a free port of 127.0.0.1, in a thread; a high token limit lets a stream run long."""
    app = make_app(checkpoint, classifier_dir=str(classifier_dir), max_new_tokens_limit=1_000_000)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join()


def test_server_whole_and_streamed(server):
    body = {"prompt": "The bird", "max_new_tokens": 30, "temperature": 0}
    whole = requests.post(f"{server}/v1/generate", json=body, timeout=30)
    assert whole.status_code == 200 and whole.headers["Content-Type"] == "application/json"
    with requests.post(f"{server}/v1/generate", json={**body, "stream": True}, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        got = events(r.text)
    assert got[-1] == ("done", {}) and "".join(d["text"] for _, d in got[:-1]) == whole.json()["text"]


def test_client_leaving_mid_stream_frees_the_model(server):
    body = {"prompt": "The", "max_new_tokens": 1_000_000, "temperature": 0, "stream": True}  # greedy: no early end
    r = requests.post(f"{server}/v1/generate", json=body, stream=True, timeout=30)
    lines = r.iter_lines()
    assert next(lines).startswith(b"data: ")  # generation is under way, holding the model
    r.close()  # hang up; a million tokens would keep the model busy for minutes
    after = requests.post(f"{server}/v1/generate", json={"prompt": "The", "max_new_tokens": 5}, timeout=20)
    assert after.status_code == 200 and after.json()["text"]


def check(kind, r):
    """The status code, after checking that the answer is well-formed for its kind."""
    if kind == "stream":
        got = events(r.text)
        assert got[-1] == ("done", {}) and all(isinstance(d["text"], str) for _, d in got[:-1])
    elif kind == "bad":
        assert r.status_code == 400 and r.json()["field"] == "top_p"
    else:
        assert set(r.json()) >= {"generate": {"text"}, "classify": {"label"}, "health": {"status"}}[kind]
    return r.status_code


def test_small_load(server):
    """40 requests, 8 at a time, of every kind: no 5xx, every answer well-formed."""
    requests_by_kind = {
        "generate": ("post", "/v1/generate", {"prompt": "The cat", "max_new_tokens": 16}),
        "stream": ("post", "/v1/generate", {"prompt": "The cat", "max_new_tokens": 16, "stream": True}),
        "classify": ("post", "/v1/classify", {"text": "free cash"}),
        "health": ("get", "/health", None),
        "bad": ("post", "/v1/generate", {"prompt": "x", "top_p": 2}),
    }
    kinds = list(requests_by_kind) * 8

    def one(kind):
        method, path, body = requests_by_kind[kind]
        return check(kind, requests.request(method, server + path, json=body, timeout=60))

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, kinds))
    assert len(statuses) == 40 and all(s < 500 for s in statuses)
    assert statuses.count(200) == 32
