"""
Serve a trained GPT with OpenAI's API, so that the `openai` client, LangChain or a chat UI can use
it: completions (whole, or streamed as server-sent events), chat completions for a model that
finetune_instruct.py trained, the model list; classification with a fine-tuned classifier; /health;
and a page to try the model in a browser (serve.html, beside this file).

    python serve.py --model=out-wikitext-tiny [--classifier=out-spam] [--host=127.0.0.1 --port=8000]
    curl -s localhost:8000/v1/completions -d '{"prompt": "The history of", "max_tokens": 50}'
    curl -N localhost:8000/v1/completions -d '{"prompt": "The history of", "stream": true}'

Each POST takes its request class's fields, checked as settings are; errors come in OpenAI's shape.
One engine thread decodes every active request in one forward pass (engine.py); an answer's choices
leave it however the answer ends. GPT_API_TOKEN=secret asks for a token. One process only:

    gunicorn -w 1 --threads 32 -b 127.0.0.1:8000 'serve:create_app(model="out-wikitext-tiny")'
"""

import dataclasses
import difflib
import hmac
import ipaddress
import itertools
import json
import os
import re
import select
import socket
import sys
import threading
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import WSGIRequestHandler

from checkpoint import unknown_word
from cli import UserError, allowed, check_allowed, check_settings, parse_config, run_main, setting
from engine import BatchEngine
from generate import Completion, chat_to_prompt, has_prompt_format, word_starts
from runtime import load_for_inference, pick_device


@dataclass
class ServeConfig:
    model: str = "out-wikitext-tiny"          # a train.py folder (or gpt2, ... as sample.py takes)
    classifier: str = ""                      # a finetune_classifier.py folder; empty: none
    host: str = "127.0.0.1"                   # 0.0.0.0 answers the network: set GPT_API_TOKEN first
    port: int = setting(8000, low=1, high=65535)  # TCP port to listen on
    device: str = "auto"                      # auto: cuda, then mps, then cpu
    dtype: str = "auto"                       # float32 | bfloat16 | float16; auto: bf16 if fast
    max_batch_size: int = setting(32, low=1)  # requests decoded together (rows of the KV cache)
    compile: bool = False                     # compile the decode step, CUDA graphs for batch sizes
                                              # 1, 2, 4, ...: for GPUs
    allow_unk: bool = False                   # let the model write its data's marker for rare words
    max_tokens_limit: int = setting(500, low=1)  # the most tokens one request may ask for
    max_prompt_chars: int = setting(10_000, low=1)  # longest prompt, messages or text to classify
    max_body_bytes: int = setting(64 * 1024, low=1)  # larger request bodies are refused unread
    request_timeout: float = setting(60.0, above=0)  # seconds a client may stall mid-request
    allowed_origins: str = ""                 # web pages elsewhere that may call the API, comma-
                                              # separated (https://app.example); * for any
    allowed_hosts: str = ""                   # Host names to answer besides localhost and IPs
                                              # (NAME or NAME:PORT, ...): against DNS rebinding


RENAMED = {"out_dir": "model", "classifier_dir": "classifier"}  # settings' old names, still taken
TOKEN_ENV, PAGE = "GPT_API_TOKEN", Path(__file__).with_name("serve.html")

# ----------------------------------------------------------------------------- what a request holds
# Each endpoint's fields, declared as settings are (read_field checks them): a bound on a string or
# a list bounds its length, one naming a ServeConfig field is that setting; null means the default.

MAX_STOP_CHARS = 200  # a stop string's length: the text held back for it is checked at every piece
MAX_N, MAX_CHOICES = 16, 64  # choices per prompt; choices per request (prompts x n)
REQUIRED = dataclasses.MISSING


@dataclass(kw_only=True)
class SamplingRequest:
    """The fields both completion endpoints take (OpenAI's that we lack: their neutral value)."""
    model: str = None  # any name: one model is served
    max_tokens: int = setting(None, low=1, high="max_tokens_limit")
    temperature: float = setting(1.0, low=0, high=2)  # 0: the likeliest token
    top_p: float = setting(1.0, above=0, high=1)
    top_k: int = setting(None, low=1, below=2**31)  # ours: sample among the k likeliest tokens
    n: int = setting(1, choices=(1,))
    stop: str | list = None  # a string, or up to 4: see __post_init__
    seed: int = setting(None, low=0, below=2**63)
    stream: bool = False
    stream_options: dict = setting(None, choices=({}, {"include_usage": False}, {"include_usage": True}))
    user: str = None
    presence_penalty: float = setting(0.0, choices=(0,))
    frequency_penalty: float = setting(0.0, choices=(0,))
    logit_bias: dict = setting(None, choices=({},))
    logprobs: bool | int = setting(None, choices=(0,))

    def __post_init__(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if self.stop == [] or len(stops) > 4 or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ApiError(f"stop must be a string or a list of up to 4, of 1 to {MAX_STOP_CHARS} "
                           f"characters each, got {excerpt(self.stop)}", "stop")
        self.stop = stops


@dataclass(kw_only=True)
class CompletionRequest(SamplingRequest):
    prompt: str | list  # a string, strings, token ids or lists of them: see read_prompts
    max_tokens: int = setting(None, low=0, high="max_tokens_limit")  # 0 with echo: score the prompt
    n: int = setting(1, low=1, high=MAX_N)  # choices per prompt
    logprobs: int = setting(None, low=0, high=5)  # the likeliest tokens shown beside each token
    echo: bool = False
    best_of: int = setting(1, choices=(1,))
    suffix: str = setting(None, choices=(None,))


@dataclass(kw_only=True)
class ChatRequest(SamplingRequest):
    messages: list = setting(REQUIRED, low=1, high=100)
    max_completion_tokens: int = setting(None, low=1, high="max_tokens_limit")  # max_tokens, newer
    response_format: dict = setting(None, choices=({"type": "text"},))


@dataclass
class ClassifyRequest:
    text: str = setting(REQUIRED, low=1, high="max_prompt_chars")

# ----------------------------------------------------------------------------- reading a request


class ApiError(Exception):
    """A request the client can fix: answered with `status` and OpenAI's error object."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_response(status, message, param=None, code=None, headers=None):
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return jsonify(error={"message": message, "type": kind, "param": param, "code": code}), status, headers


def excerpt(value):
    """A value as the client wrote it, cut short: error messages echo input, never much of it."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_request(kind, max_bytes, config):
    """The request's JSON body as a request class (`kind`): every field known, of its JSON type and
    within its rules; the first that is not is an ApiError that names it.

        {"prompt": "Hi", "temperature": 3} -> 400 "temperature must be a number from 0 to 2, got 3"
    """
    try:
        chunked = request.content_length is None  # a chunked body: its size is known only by reading it
        data = request.environ["wsgi.input"].read(max_bytes + 1) if chunked else request.get_data(cache=False)
        if len(data) > max_bytes:
            raise RequestEntityTooLarge()
        body = json.loads(data)  # whatever the content type: curl -d sends a form's
    except RequestEntityTooLarge:
        raise ApiError(f"the body is beyond the server's limit of {max_bytes} bytes", None, 413)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested too deep to parse
        raise ApiError(f"the body is not valid JSON: {e}")
    fields = {field.name: field for field in dataclasses.fields(kind)}
    if not isinstance(body, dict):
        first = next(name for name, field in fields.items() if field.default is REQUIRED)
        raise ApiError(f'the body must be a JSON object, like {{"{first}": ...}}')
    for name in body:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(fields)}"
            raise ApiError(f"unknown field '{name[:40]}'; {hint}", name[:40])
    hints, values = typing.get_type_hints(kind), {}
    for name, field in fields.items():
        if body.get(name) is not None:
            values[name] = read_field(name, body[name], hints[name], field.metadata, config)
        elif field.default is REQUIRED:
            raise ApiError(f"{name} is required", name)
    return kind(**values)


JSON_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              list: "a list", dict: "an object"}


def read_field(name, value, hint, rules, config):
    """A JSON value as the field takes it (a number as a float), or an ApiError saying what it
    takes: true is no integer; NaN, Infinity and integers beyond float's range are no numbers."""
    kinds = typing.get_args(hint) or (hint,)
    rules = {k: getattr(config, v) if isinstance(v, str) else v for k, v in rules.items()}
    for kind in kinds:
        taken = value if isinstance(value, bool) == (kind is bool) else None  # True is an int too
        if kind is float and isinstance(taken, (int, float)):
            taken = float(taken) if abs(taken) <= sys.float_info.max else None  # NaN, inf, 1e400
        if isinstance(taken, kind):
            try:  # the settings' test; a string's or a list's length is what is bounded
                check_allowed(name, len(taken) if kind in (str, list) else taken, rules)
                return taken
            except UserError:
                break
    raise ApiError(f"{name} must be {rule_words(kinds, rules)}, got {excerpt(value)}", name)


def rule_words(kinds, rules):
    """What a field takes, in words: 'an integer from 0 to 64', 'a number > 0 and <= 1', 'a string
    of 1 to 200 characters', 'true or false', '{}'."""
    if "choices" in rules:
        return " or ".join(json.dumps(choice) for choice in rules["choices"])
    words = " or ".join(JSON_TYPES[kind] for kind in kinds)
    if rules.keys() == {"low", "high"}:  # a string's or a list's length, or a number
        unit = {str: " characters", list: " items"}.get(kinds[0], "")
        return f"{words} {'of' if unit else 'from'} {rules['low']} to {rules['high']}{unit}"
    return f"{words} {allowed(rules)}".strip()


def read_prompts(value, tokenizer, max_chars):
    """OpenAI's prompt forms as [(text or None, token ids)], one per choice group in order: a
    string (its ids after <|endoftext|>, where a document starts; "" is just that token), a list of
    strings, a list of token ids (taken as they are), or a list of such lists.

        read_prompts("Hi", ...) -> [("Hi", [eot, ...])]
        read_prompts([[5, 6], [7]], ...) -> [(None, [5, 6]), (None, [7])]
    """
    vocab = tokenizer.vocab_size
    is_int = lambda t: isinstance(t, int) and not isinstance(t, bool)  # noqa: E731
    is_id = lambda t: is_int(t) and 0 <= t < vocab  # noqa: E731

    def one(item, where):
        if not (isinstance(item, str) or isinstance(item, list) and item and all(map(is_id, item))):
            bad = next((t for t in item if not is_id(t)), item) if isinstance(item, list) else item
            raise ApiError(f"prompt{where} must be a string or a non-empty list of token ids from "
                           f"0 to {vocab - 1}, got {excerpt(bad)}", "prompt")
        if len(item) > max_chars:
            unit = "characters" if isinstance(item, str) else "token ids"
            raise ApiError(f"prompt{where} has {len(item)} {unit}, beyond the server's limit of {max_chars}",
                           "prompt")
        return (item, tokenizer.encode_document(item)) if isinstance(item, str) else (None, item)

    if isinstance(value, str) or (value and all(map(is_int, value))):
        return [one(value, "")]
    if not 0 < len(value) <= MAX_CHOICES:
        raise ApiError(f"prompt must hold 1 to {MAX_CHOICES} prompts, got {len(value)}", "prompt")
    return [one(item, f"[{i}]") for i, item in enumerate(value)]


def read_chat_prompt(messages, tokenizer, max_chars):
    """The chat's messages in the instruction template, as read_prompts gives a prompt: [(text,
    token ids)]; refused where they are malformed or make more than max_chars characters."""
    try:
        prompt = chat_to_prompt(messages)
    except ValueError as e:
        raise ApiError(str(e), "messages")
    if len(prompt) > max_chars:
        raise ApiError(f"messages make a prompt of {len(prompt)} characters with the template, "
                       f"beyond the server's limit of {max_chars}", "messages")
    return [(prompt, tokenizer.encode_document(prompt))]


def check_choices(prompts, req, block_size):
    """What a completion's prompts must meet beyond their field: MAX_CHOICES choices at most (prompts
    x n), and a prompt scored for its echo (echo with logprobs) within the model's context."""
    if len(prompts) * req.n > MAX_CHOICES:
        raise ApiError(f"n={req.n} choices for each of {len(prompts)} prompts make "
                       f"{len(prompts) * req.n}, beyond the limit of {MAX_CHOICES}", "n")
    if req.echo and req.logprobs is not None and any(len(ids) > block_size for _, ids in prompts):
        raise ApiError(f"prompt is longer than the model's context of {block_size} tokens: it cannot be "
                       f"scored whole", "prompt")

# ----------------------------------------------------------------------------- generating


def logprobs_object(rows):
    """OpenAI's logprobs object for a Completion's rows (None: no logprobs were asked for)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return None if rows is None else {key: [row[i] for row in rows] for i, key in enumerate(keys)}


def client_gone(environ):
    """Whether this request's client has hung up (a peek: its next request stays unread)."""
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # closed already
        return True


def whole_choices(completions, chat, environ):
    """The choices of an answer sent whole, or None if its client hung up meanwhile."""
    choices = []
    for index, completion in enumerate(completions):
        if any(client_gone(environ) for _ in completion):
            return None
        text = (completion.prompt if completion.echo else "") + completion.text
        answer = {"message": {"role": "assistant", "content": text}} if chat else {
            "text": text, "logprobs": logprobs_object(completion.rows())}
        choices.append({"index": index, **answer, "finish_reason": completion.finish_reason})
    return choices


def stream_events(completions, header, chat, logger, environ, usage):
    """A streamed answer's events: each choice's pieces in turn, then its finish_reason; the usage
    (a function, if asked for) and [DONE] at the end. The first piece is read before the status line
    is sent: a request that fails at its start gets a 500, not a 200 and a cut stream."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    sse = lambda data: f"data: {json.dumps(data)}\n\n"  # noqa: E731  (JSON: one line)

    def chunk(index, text="", rows=None, finish_reason=None, delta=None):
        choice = {"delta": delta or ({"content": text} if text else {})} if chat else {
            "text": text, "logprobs": logprobs_object(rows)}
        choice |= {"index": index, "finish_reason": finish_reason}
        return sse({**header, "object": kind, "choices": [choice]})

    pieces = [iter(completion) for completion in completions]
    pieces[0] = itertools.chain(list(itertools.islice(pieces[0], 1)), pieces[0])

    def events():
        try:
            for index, completion in enumerate(completions):
                if chat:
                    yield chunk(index, delta={"role": "assistant", "content": ""})
                for text, rows in pieces[index]:
                    if client_gone(environ):  # (sooner than a write that fails)
                        return
                    yield chunk(index, text, rows)
                yield chunk(index, finish_reason=completion.finish_reason)
            if usage:
                yield sse({**header, "object": kind, "choices": [], "usage": usage()})
        except Exception:  # the status line is sent: the stream itself has to say it failed
            logger.exception("generation failed mid-stream")
            yield sse({"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    return events()

# ----------------------------------------------------------------------------- the guards


def guard(app, token, allowed_origins, allowed_hosts):
    """Who may call. No web page on another site (as Jupyter, Ollama and llama.cpp guard): a
    browser's request from another origin (its Origin header; curl, the SDKs and / send none) gets a
    403 unless allowed, and so does a Host that is not localhost, an IP or an allowed name (a page
    that rebinds its own name to 127.0.0.1 is same-origin to the browser, but its requests carry
    that name); an allowed origin gets CORS headers. With a token, only requests that carry it."""
    if not (token.isascii() and token.isprintable() and token.strip() == token):
        raise UserError(f"{TOKEN_ENV} must be printable ASCII without spaces at its ends: an HTTP header carries it")
    origins = {o.strip().rstrip("/") for o in allowed_origins.split(",") if o.strip()}
    hosts = {"localhost"}
    for entry in filter(None, (h.strip().lower() for h in allowed_hosts.split(","))):
        if not (name := re.fullmatch(r"([a-z0-9_.-]+)(:\d+)?", entry)):
            raise UserError(f"--allowed_hosts takes host names, NAME or NAME:PORT, got '{entry}'")
        hosts.add(name[1])  # a Host header is checked by its name

    def known_host(name):
        try:
            return ipaddress.ip_address(name) is not None
        except ValueError:
            return name in hosts

    def allowed_origin():
        origin = request.headers.get("Origin")
        return origin if origin and ("*" in origins or origin.rstrip("/") in origins) else None

    @app.before_request
    def check():
        host, origin = request.host, request.headers.get("Origin")
        if not known_host(urlsplit("//" + host).hostname or ""):
            return error_response(403, f"this server does not answer for the host {host[:100]!r}: "
                                  f"start it with --allowed_hosts=NAME to allow it", code="host_not_allowed")
        if origin and origin != request.host_url.rstrip("/") and not allowed_origin():
            return error_response(403, f"requests from web pages on {origin[:100]} are refused: start "
                                  f"the server with --allowed_origins={origin[:100]} to allow them",
                                  code="origin_not_allowed")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip().encode() if scheme.lower() == "bearer" else b""
        # compare_digest takes as long for a near miss as for a wild guess: no guessing byte by byte
        if token and request.path != "/" and request.method != "OPTIONS" and not hmac.compare_digest(
                given, token.encode()):
            return error_response(401, f"this server needs 'Authorization: Bearer <token>' (see "
                                  f"{TOKEN_ENV}): missing or wrong", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})

    @app.after_request
    def cors_headers(response):
        if origin := allowed_origin():
            response.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        return response


def answer_errors_in_json(app):
    """ApiError -> its 4xx; Flask's own 404, 405, 413 -> the same JSON shape; anything else, 500."""

    @app.errorhandler(ApiError)
    def api_error(e):
        return error_response(e.status, str(e), e.param, e.code)

    @app.errorhandler(HTTPException)
    def http_error(e):  # 404, 405 (its Allow header kept), ...: JSON like every other answer
        response = e.get_response()
        response.data = error_response(e.code, f"{e.name}: {e.description}")[0].data
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def internal_error(e):
        app.logger.exception("internal error")
        return error_response(500, "internal error")


# ----------------------------------------------------------------------------- the app

def answer(engine, tokenizer, name, prompts, req, chat):
    """Submit a choice per prompt and n to the engine, answer as the model `name`, whole or streamed;
    however the answer ends (sent, failed, its client gone), its choices are closed: let go."""
    completions, prompt_tokens = [], sum(len(ids) for _, ids in prompts)
    close_all = lambda: [choice.sequence.close() for choice in completions]  # noqa: E731
    logprobs, echo = (None, False) if chat else (req.logprobs, req.echo)
    header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
              "model": name}
    def usage():
        new = sum(completion.sequence.generated for completion in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": new, "total_tokens": prompt_tokens + new}
    if client_gone(request.environ):  # the client has gone already: no work
        return Response(status=499)
    try:
        # with a seed, choice i of every prompt draws from seed + i; rank, after: see engine.py
        for rank, ((text, ids), i) in enumerate(itertools.product(prompts, range(req.n))):
            seed = None if req.seed is None else (req.seed + i) % 2**63
            completions.append(Completion(engine, tokenizer, text, ids, req.stop, logprobs, echo, seed=seed,
                                          rank=rank, max_new_tokens=req.max_tokens, top_k=req.top_k,
                                          temperature=req.temperature, top_p=req.top_p,
                                          after=completions[0].sequence if rank else None))
        if req.stream:
            events = stream_events(completions, header, chat, current_app.logger, request.environ,
                                   usage if (req.stream_options or {}).get("include_usage") else None)
            response = Response(events, mimetype="text/event-stream", headers={
                "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # proxies: no holding back
        elif (choices := whole_choices(completions, chat, request.environ)) is None:
            response = Response(status=499)  # nobody reads it: the status is for the log
        else:
            kind = "chat.completion" if chat else "text_completion"
            response = jsonify(**header, object=kind, choices=choices, usage=usage())
    except BaseException:
        close_all()
        raise
    response.call_on_close(close_all)
    return response


def serve_config(config, settings):
    """create_app's arguments as a checked ServeConfig: a ServeConfig, or a model's name and
    ServeConfig fields by name, checked as flags are (and renamed ones taken: RENAMED)."""
    if not isinstance(config, ServeConfig):
        settings = {"model": config, **settings} if config else settings
        config = parse_config(ServeConfig, [f"--{k}={v}" for k, v in settings.items()], RENAMED)
    return check_settings(config)


def load_models(config):
    """(device, the model's BatchEngine, started, its tokenizer and checkpoint, the classifier
    (model, tokenizer) or None): what config names, loaded."""
    device = pick_device(config.device)
    model, tokenizer, checkpoint = load_for_inference(config.model, device, config.dtype)
    word = None if config.allow_unk else unknown_word(config.model)
    engine = BatchEngine(model, config.max_batch_size, config.compile,
                         suppress_ids=word_starts(tokenizer, word) if word else None)
    classifier = None
    if config.classifier:  # (its module only then)
        from finetune import load_classifier
        classifier = load_classifier(config.classifier, device)
    return device, engine, tokenizer, checkpoint, classifier


def describe(engine, checkpoint, classifier, config):
    """/health's facts: the model's size and shape, whether it chats, the classifier's labels, the
    batch now and the server's limits."""
    model = engine.model
    return dict(parameters=model.num_params(non_embedding=False),
                dtype=str(model.token_emb.weight.dtype).removeprefix("torch."),
                block_size=model.config.block_size, vocab_size=model.config.vocab_size,
                chat=has_prompt_format(checkpoint),
                classifier={"labels": classifier[0].labels} if classifier else None,
                batch={"active": len(engine.active), "waiting": engine.waiting.qsize(),
                       "peak": engine.peak_batch},
                limits={"max_tokens": config.max_tokens_limit,
                        "batch_size": config.max_batch_size,
                        "prompt_chars": config.max_prompt_chars,
                        "body_bytes": config.max_body_bytes})


def create_app(config=None, **settings):
    """The Flask app, with the model(s) loaded and the batching engine started. config: a
    ServeConfig or a model's name; settings: ServeConfig fields by name, checked as flags are.
    Under gunicorn: 'serve:create_app(model="out-wikitext-tiny", classifier="out-spam")'."""
    config = serve_config(config, settings)
    if not PAGE.is_file():  # a copy of serve.py without its page
        raise UserError(f"{PAGE.name}, the page at /, is missing: copy it beside serve.py")
    app, page = Flask(__name__), PAGE.read_text(encoding="utf-8")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    guard(app, os.environ.get(TOKEN_ENV, ""), config.allowed_origins, config.allowed_hosts)
    answer_errors_in_json(app)

    device, engine, tokenizer, checkpoint, classifier = load_models(config)
    app.engine, model = engine, engine.model  # app.engine.close() stops its thread
    classifier_lock = threading.Lock()  # one classification at a time
    name = os.path.basename(os.path.abspath(config.model))
    card = {"id": name, "object": "model", "owned_by": "local",
            "created": int(os.path.getmtime(config.model)) if os.path.exists(config.model) else 0}

    @app.get("/")
    def page_to_try_the_model():
        # no other site may frame it, and so have a visitor click in it unknowingly
        return Response(page, mimetype="text/html", headers={
            "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"})

    @app.get("/health")
    def health():
        facts = describe(engine, checkpoint, classifier, config)
        return jsonify(status="ok", model=name, device=device, **facts)

    @app.get("/v1/models")
    @app.get("/v1/models/<path:model_id>")
    def models(model_id=None):
        if model_id not in (None, name):
            raise ApiError(f"no model '{model_id[:60]}' here; it serves '{name}'", "model", 404,
                           "model_not_found")
        return jsonify(card) if model_id else jsonify(object="list", data=[card])

    @app.post("/v1/completions")
    def completions():
        req = read_request(CompletionRequest, config.max_body_bytes, config)
        prompts = read_prompts(req.prompt, tokenizer, config.max_prompt_chars)
        check_choices(prompts, req, model.config.block_size)
        if req.max_tokens is None:
            req.max_tokens = min(16, config.max_tokens_limit)  # OpenAI's default
        return answer(engine, tokenizer, name, prompts, req, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        req = read_request(ChatRequest, config.max_body_bytes, config)
        if not has_prompt_format(checkpoint):
            raise ApiError(f"{name} was not instruction-tuned, so it has no chat template: use "
                           f"/v1/completions, or a model finetune_instruct.py trained", "messages")
        prompts = read_chat_prompt(req.messages, tokenizer, config.max_prompt_chars)
        # the newer name wins; chat's default is the server's limit
        req.max_tokens = req.max_completion_tokens or req.max_tokens or config.max_tokens_limit
        return answer(engine, tokenizer, name, prompts, req, True)

    @app.post("/v1/classify")
    def classify_text():
        if classifier is None:
            raise ApiError("no classifier here: start the server with --classifier=DIR", None, 404)
        req = read_request(ClassifyRequest, config.max_body_bytes, config)
        from finetune import classify
        with classifier_lock:
            label, probability = classify(*classifier, [req.text])[0]
        return jsonify(label=label, probability=probability)

    return app


def main():
    config = parse_config(ServeConfig, renamed=RENAMED)
    app = create_app(config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(TOKEN_ENV):
        print(f"warning: listening on {config.host} without {TOKEN_ENV}: anyone who can reach it can use the model")
    print(f"serving {config.model} on http://{config.host}:{config.port}/v1 (OpenAI API; a page at /)", flush=True)

    class RequestHandler(WSGIRequestHandler):
        timeout = config.request_timeout  # a client stalling mid-request (or not reading): cut off

    app.run(config.host, config.port, debug=False, use_reloader=False, threaded=True, request_handler=RequestHandler)


if __name__ == "__main__":
    run_main(main)
