"""
Serve a trained GPT over HTTP with OpenAI's API, so that the `openai` client, LangChain or a chat UI can use it:
text completions (whole, or streamed as server-sent events), chat completions for an instruction-tuned model, the
model list; plus classification with a fine-tuned classifier and a small page to try it in the browser.

    python serve.py --model=out-wikitext-tiny [--classifier=out-spam] [--host=127.0.0.1 --port=8000]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")      # or the GPT_API_TOKEN value
    client.completions.create(model="out-wikitext-tiny", prompt="The history of", max_tokens=50, seed=1)
    client.chat.completions.create(model="out-instruct", messages=[{"role": "user", "content": "Name a color."}])

    curl -s localhost:8000/v1/completions -d '{"prompt": "The history of", "max_tokens": 50}'
    curl -N localhost:8000/v1/completions -d '{"prompt": "The history of", "stream": true}'
    curl -s localhost:8000/v1/classify -d '{"text": "Free entry, win cash now"}'
    curl -s localhost:8000/health

Endpoints: GET /v1/models (and /v1/models/<id>); POST /v1/completions {prompt (a string, a list of strings, a list of
token ids or a list of such lists: a choice group each), max_tokens (0 with echo scores a text), temperature, top_p,
n (up to 16), logprobs (0-5: each token's log-probability under the model and the likeliest alternatives), echo,
stop, seed, stream, stream_options, and our extra top_k}, as lm-evaluation-harness's local-completions model uses it;
POST /v1/chat/completions {messages, ...the same but n 1, no logprobs}, for a
model that finetune_instruct.py trained: the messages become its prompt template (the last user message is the
instruction; earlier messages, the system message first, become its input as a "role: text" transcript); another
model answers 400. POST /v1/classify {text} -> {"label", "probability"}. GET /health -> the model, the device and
dtype, the limits. Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx for
anything the client can fix. The `model` field is optional and any name is accepted: one model is served.

Requests are decoded together: one engine thread runs every active request's next token in one forward pass
(engine.py, continuous batching), so a request waits for one step, not for the others to finish, and its tokens do
not depend on what else is decoded with it. Set GPT_API_TOKEN to require `Authorization: Bearer <token>` on every
request (but the page's, which holds no data and asks for the token). Flask's own server is for local use; under a
production WSGI server run one process (one copy of the model and its engine) with threads:

    gunicorn -w 1 --threads 32 -b 127.0.0.1:8000 'serve:create_app(model="out-wikitext-tiny")'
"""

import contextlib
import difflib
import hmac
import ipaddress
import itertools
import json
import math
import os
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import WSGIRequestHandler

from cli import UserError, check_settings, parse_config, run_main, setting
from engine import BatchEngine
from generate import decode_stream, format_prompt, has_prompt_format
from runtime import load_for_inference, pick_device


@dataclass
class ServeConfig:
    model: str = "out-wikitext-tiny"          # a train.py checkpoint folder (or gpt2, ... as sample.py takes them)
    classifier: str = ""                      # a finetune_classifier.py folder; empty: /v1/classify answers 404
    host: str = "127.0.0.1"                   # 0.0.0.0 would answer the whole network: set GPT_API_TOKEN first
    port: int = setting(8000, low=1, high=65535)  # TCP port to listen on
    device: str = "auto"                      # auto: cuda, then mps, then cpu
    dtype: str = "auto"                       # float32 | bfloat16 | float16; auto: bf16 where the hardware has it
    max_batch_size: int = setting(32, low=1)  # requests decoded together (rows of the KV cache); 1: one at a time
    max_tokens_limit: int = setting(500, low=1)  # the most tokens one request may ask for
    max_prompt_chars: int = setting(10_000, low=1)  # longest prompt (all messages, or a text to classify)
    max_body_bytes: int = setting(64 * 1024, low=1)  # larger request bodies are refused unread
    request_timeout: float = setting(60.0, above=0)  # seconds a client may stall mid-request before it is cut off
    allowed_origins: str = ""                 # web pages on other origins that may call the API, comma-separated
                                              # (https://app.example); * for any. curl, SDKs and / need none
    allowed_hosts: str = ""                   # Host names to answer besides localhost and IP addresses, comma-
                                              # separated: a guard against DNS rebinding


RENAMED = {"out_dir": "model", "classifier_dir": "classifier"}  # settings' old names, still taken
TOKEN_ENV = "GPT_API_TOKEN"
REQUIRED = object()

# ----------------------------------------------------------------------------- what a request may hold


def is_json_type(value, kind):
    """Whether a JSON value is of the Python type a field wants: 1 is a float, True is not an int; NaN, Infinity and
    numbers beyond float's range are no floats."""
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # a 400-digit integer
            return False
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # in Python, True is an int


def number(kind, low, high):
    """A test of a number field: of JSON type `kind` (int or float), within [low, high]."""
    return lambda value: is_json_type(value, kind) and low <= value <= high


MAX_STOP_CHARS = 200  # a stop string's length: the text held back for it is checked at every piece


def stop_strings(value):
    """OpenAI's stop: a string or a list of up to 4 non-empty strings (here of at most MAX_STOP_CHARS)."""
    items = [value] if isinstance(value, str) else value
    return isinstance(items, list) and 0 < len(items) <= 4 and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)


def sampling_fields(config, default_max_tokens):
    """The fields both completion endpoints take: name -> (default, test, what the test asks). null means the
    default. Fields of OpenAI's API that this server does not implement are accepted at their neutral value."""
    limit = config.max_tokens_limit
    return {
        "model": (None, lambda v: isinstance(v, str), "must be a string (any name: one model is served)"),
        "max_tokens": (default_max_tokens, number(int, 1, limit), f"must be an integer from 1 to {limit}"),
        "temperature": (1.0, number(float, 0, 2), "must be a number from 0 to 2 (0: the likeliest token)"),
        "top_p": (1.0, lambda v: number(float, 0, 1)(v) and v > 0, "must be a number above 0, at most 1"),
        "top_k": (None, number(int, 1, 2**31), "must be an integer >= 1 (keep the k likeliest tokens)"),
        "n": (1, lambda v: v == 1 and is_json_type(v, int), "must be 1 (one choice per request)"),
        "stop": (None, stop_strings, f"must be a string or a list of up to 4 strings of 1 to {MAX_STOP_CHARS} "
                                     f"characters"),
        "seed": (None, number(int, 0, 2**63 - 1), "must be an integer from 0 to 2**63 - 1"),
        "stream": (False, lambda v: isinstance(v, bool), "must be true or false"),
        "stream_options": (None, lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                           and isinstance(v.get("include_usage", False), bool), 'must be {"include_usage": bool}'),
        "user": (None, lambda v: isinstance(v, str), "must be a string"),
        "presence_penalty": (0, number(float, 0, 0), "is not supported: leave it out or 0"),
        "frequency_penalty": (0, number(float, 0, 0), "is not supported: leave it out or 0"),
        "logit_bias": (None, lambda v: v == {}, "is not supported: leave it out"),
        "logprobs": (None, lambda v: v is False or v == 0, "is not supported: leave it out"),
    }


MAX_N, MAX_CHOICES = 16, 64  # choices per prompt; choices per request (prompts x n)


def completion_fields(config):
    limit = config.max_tokens_limit
    fields = sampling_fields(config, default_max_tokens=min(16, limit))  # OpenAI's default
    fields["prompt"] = (REQUIRED, lambda v: isinstance(v, (str, list)),  # read_prompts checks what is inside
                        "must be a string, a list of strings, a list of token ids or a list of such lists")
    fields["max_tokens"] = (fields["max_tokens"][0], number(int, 0, limit),
                            f"must be an integer from 0 to {limit} (0: score the prompt, with echo)")
    fields["n"] = (1, number(int, 1, MAX_N), f"must be an integer from 1 to {MAX_N} (choices per prompt)")
    fields["logprobs"] = (None, number(int, 0, 5), "must be an integer from 0 to 5 (the likeliest tokens shown)")
    fields["echo"] = (False, lambda v: isinstance(v, bool), "must be true or false")
    fields["best_of"] = (1, lambda v: v == 1, "is not supported: leave it out or 1")
    fields["suffix"] = (None, lambda v: False, "is not supported: leave it out")
    return fields


def chat_fields(config):
    fields = sampling_fields(config, default_max_tokens=config.max_tokens_limit)  # chat: up to the limit
    fields["messages"] = (REQUIRED, lambda v: isinstance(v, list) and 0 < len(v) <= 100,
                          "must be a list of 1 to 100 messages")
    fields["max_completion_tokens"] = (None, *fields["max_tokens"][1:])  # the newer name of max_tokens
    fields["response_format"] = (None, lambda v: v == {"type": "text"}, 'is not supported beyond {"type": "text"}')
    return fields


def classify_fields(config):
    chars = config.max_prompt_chars
    return {"text": (REQUIRED, lambda v: isinstance(v, str) and 0 < len(v) <= chars,
                     f"must be a string of 1 to {chars} characters")}

# ----------------------------------------------------------------------------- errors, in OpenAI's shape


class ApiError(Exception):
    """A request the client can fix: answered with `status` and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_response(status, message, param=None, code=None):
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return jsonify(error={"message": message, "type": kind, "param": param, "code": code}), status

# ----------------------------------------------------------------------------- reading a request


def excerpt(value):
    """A value as the client wrote it, cut short: error messages echo input, never much of it."""
    text = json.dumps(value)
    if len(text) <= 40:
        return text
    return f"a string of {len(value)} characters" if isinstance(value, str) else text[:37] + "..."


def read_body(fields, max_bytes):
    """The JSON object of the request, defaults filled in (null: the default). Each field must be known and pass its
    test; the first that does not is an ApiError naming it."""
    try:
        if request.content_length is None:  # a chunked body: its size is known only by reading it
            data = request.environ["wsgi.input"].read(max_bytes + 1)
            if len(data) > max_bytes:
                raise RequestEntityTooLarge()
        else:
            data = request.get_data(cache=False)
        body = json.loads(data)  # any content type: curl -d sends a form type
    except RequestEntityTooLarge:
        raise ApiError(f"the body is larger than the server's limit of {max_bytes} bytes", status=413)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nesting too deep to parse
        raise ApiError(f"the body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise ApiError(f"the body must be a JSON object, like {{\"{next(iter(fields))}\": ...}}")
    for name in body:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(fields)}"
            raise ApiError(f"unknown field '{name[:40]}'; {hint}", name[:40])
    values = {}
    for name, (default, test, rule) in fields.items():
        value = body.get(name)
        if value is None:
            if default is REQUIRED:
                raise ApiError(f"{name} is required", name)
            values[name] = default
        elif not test(value):
            raise ApiError(f"{name} {rule}, got {excerpt(value)}", name)
        else:
            values[name] = float(value) if isinstance(default, float) else value
    return values


def token_matches(header, token):
    scheme, _, given = header.partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess: the token cannot be found byte by byte
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def read_prompts(value, tokenizer, max_chars, max_prompts):
    """OpenAI's prompt forms as [(text or None, token ids)]: a string (its ids after <|endoftext|>, where a document
    starts; "" is just that token), a list of strings, a list of token ids (taken as they are), or a list of such
    lists. One prompt per choice group, in order.

        read_prompts("Hi", ...) -> [("Hi", [eot, ...])]
        read_prompts([[5, 6], [7]], ...) -> [(None, [5, 6]), (None, [7])]
    """
    vocab = tokenizer.vocab_size
    is_id = lambda t: is_json_type(t, int) and 0 <= t < vocab  # noqa: E731

    def one(item, where):
        if isinstance(item, str):
            if len(item) > max_chars:
                raise ApiError(f"prompt{where} has {len(item)} characters, beyond the server's limit of {max_chars}",
                               "prompt")
            return item, tokenizer.encode_document(item)
        if isinstance(item, list) and item and all(is_id(t) for t in item):
            if len(item) > max_chars:
                raise ApiError(f"prompt{where} has {len(item)} token ids, beyond the server's limit of {max_chars}",
                               "prompt")
            return None, list(item)
        bad = next((t for t in item if not is_id(t)), None) if isinstance(item, list) and item else None
        if bad is not None and is_json_type(bad, int):
            raise ApiError(f"prompt{where} holds the token id {bad}, outside the vocabulary (0 to {vocab - 1})",
                           "prompt")
        raise ApiError(f"prompt{where} must be a string or a non-empty list of token ids (0 to {vocab - 1}), got "
                       f"{excerpt(item)}", "prompt")
    if isinstance(value, str) or (value and all(is_json_type(t, int) for t in value)):
        return [one(value, "")]
    if not 0 < len(value) <= max_prompts:
        raise ApiError(f"prompt must hold 1 to {max_prompts} prompts, got {len(value)}", "prompt")
    return [one(item, f"[{i}]") for i, item in enumerate(value)]


def chat_to_prompt(messages):
    """The instruction-template prompt for OpenAI chat messages: the last user message is the instruction, the
    earlier ones the input, as a transcript. A message's content is a string or a list of text parts."""
    turns = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")):
            raise ApiError(f"messages[{i}] must be an object with a role of system, user or assistant", "messages")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string (or a list of text parts)", "messages")
        turns.append((message["role"], content))
    if turns[-1][0] != "user":
        raise ApiError("messages must end with the user's: it is the instruction the model answers", "messages")
    context = "\n".join(f"{role}: {content}" for role, content in turns[:-1])
    return format_prompt({"instruction": turns[-1][1], "input": context})

# ----------------------------------------------------------------------------- generating


def text_until_stop(pieces, stops):
    """Yield the text of `pieces` up to the first stop string (left out). Text that could be the start of a stop
    string waits until the next piece settles it. Returns True (StopIteration's value) if a stop string ended it.

        list(text_until_stop(["Hel", "lo. Bye", "!"], [". B"])) -> ["Hel", "lo"]
    """
    held = ""
    for piece in pieces:
        held += piece
        found = [i for i in (held.find(stop) for stop in stops) if i >= 0]
        if found:
            if min(found):
                yield held[:min(found)]
            return True
        keep = max((len(held) - i for stop in stops for i in range(max(len(held) - len(stop) + 1, 0), len(held))
                    if stop.startswith(held[i:])), default=0)  # the longest end of held that starts a stop string
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
    return False


class Completion:
    """One choice: the engine's generation of a prompt, as text. Iterate for the pieces (with echo, the prompt's
    text first); then finish_reason ("stop": end-of-text or a stop string; "length": max_tokens) is set, and with
    logprobs, logprobs() gives OpenAI's object. A text prompt starts after <|endoftext|> (as documents do in
    training): that token is not echoed, and the text's first token is scored; a token-id prompt is taken as it is,
    its first token unscored (null)."""

    def __init__(self, engine, tokenizer, text, ids, req, seed, logprobs=None, echo=False):
        self.tokenizer, self.ids, self.logprobs_wanted, self.echo = tokenizer, ids, logprobs, echo
        self.prompt = text if text is not None else tokenizer.decode(ids)
        self.hidden = 0 if text is None else 1  # the <|endoftext|> a text prompt starts after
        self.sequence = engine.submit(ids, req["max_tokens"], req["temperature"], req["top_k"], req["top_p"], seed,
                                      tokenizer.eot_id, logprobs=logprobs, score_prompt=echo and logprobs is not None)
        self.stops = [req["stop"]] if isinstance(req["stop"], str) else req["stop"] or []
        self.finish_reason, self.taken, self.completion_text = None, [], ""  # taken: new ids the text has read
        self.stopped_by_string = False

    def __iter__(self):
        try:
            if self.echo and self.prompt:
                yield self.prompt
            stopped = False
            pieces = text_until_stop(decode_stream(self.tokenizer, self._taking()), self.stops)
            while True:
                try:
                    piece = next(pieces)
                except StopIteration as end:
                    stopped = end.value
                    break
                self.completion_text += piece
                yield piece
            self.stopped_by_string = stopped
            self.finish_reason = "stop" if stopped else self.sequence.finish_reason
        finally:
            self.sequence.close()  # a stop string, or a client gone: the engine frees the row at its next step

    def _taking(self):
        for token in self.sequence:
            self.taken.append(token)
            yield token

    def close(self):
        self.sequence.close()

    def logprobs(self, prompt=True, start=0, stop=None):
        """OpenAI's logprobs object (tokens, token_logprobs, top_logprobs, text_offset) of the prompt (with echo)
        and of the new tokens start..stop; the whole answer's (stop None) ends where its text does (a stop string),
        or with the end-of-text token that ended it, as vLLM and OpenAI count it.
        An offset counts the characters of the tokens before it (a character split over tokens counts as U+FFFD)."""
        if self.logprobs_wanted is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        decode = lambda token: self.tokenizer.decode([token])  # noqa: E731

        def add(tokens, scores, offset, end=None):
            for token, score in zip(tokens, scores):
                if end is not None and offset >= end:
                    break
                out["tokens"].append(decode(token))
                out["text_offset"].append(offset)
                out["token_logprobs"].append(None if score is None else score[0])
                out["top_logprobs"].append(None if score is None else {decode(i): lp for i, lp in score[1]})
                offset += len(out["tokens"][-1])
            return offset
        if prompt and self.echo:
            add(self.ids[self.hidden:], self.sequence.prompt_scores[self.hidden:], 0)
        new, before = self.taken[start:stop], len(self.prompt)
        end = before + len(self.completion_text) if stop is None else None
        offset = add(new, self.sequence.scores[start:start + len(new)],
                     before + sum(len(decode(t)) for t in self.taken[:start]), end)
        if stop is None and self.sequence.finish_reason == "stop" and not self.stopped_by_string:
            add([self.tokenizer.eot_id], self.sequence.scores[len(self.taken):], offset)  # the end-of-text token
        return out


def sse(data):
    """One server-sent event; JSON keeps newlines in the text from ending the event early."""
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def client_gone(environ):
    """Whether the client of this request has closed its connection (a peek: its next request stays unread)."""
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # closed already
        return True


def completion_response(completions, prompt_tokens, model_name, chat, stream, include_usage, logger, environ):
    """The OpenAI answer to a completion (one choice per Completion, in order): one JSON object, or a
    text/event-stream of chunks ending in [DONE]. A client that hangs up stops its generations, streamed or not."""
    header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
              "model": model_name}
    kind = "chat.completion" if chat else "text_completion"

    def usage():
        completion = sum(c.sequence.generated for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    if not stream:
        choices = []
        for index, completion in enumerate(completions):
            text = ""
            for piece in completion:
                text += piece
                if client_gone(environ):
                    for c in completions:
                        c.close()
                    return Response(status=499)  # nobody reads it: the status is for the log ("client closed")
            choice = {"message": {"role": "assistant", "content": text}} if chat else {
                "text": text, "logprobs": completion.logprobs()}
            choices.append({"index": index, **choice, "finish_reason": completion.finish_reason})
        return jsonify(**header, object=kind, choices=choices, usage=usage())

    def chunk(index, text=None, finish_reason=None, first=False, logprobs=None):
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"delta": delta}
        else:
            choice = {"text": text or "", "logprobs": logprobs}
        return sse({**header, "object": f"{kind}.chunk" if chat else kind,
                    "choices": [{"index": index, **choice, "finish_reason": finish_reason}]})

    def pieces_with_logprobs(completion):
        """(text, logprobs of the tokens read since the last piece) for each piece of a choice."""
        done, prompt = 0, completion.echo and bool(completion.prompt)
        for piece in completion:
            if prompt:  # the echoed prompt comes first, whole
                yield piece, completion.logprobs(prompt=True, start=0, stop=0)
                prompt = False
                continue
            yield piece, completion.logprobs(prompt=False, start=done, stop=len(completion.taken))
            done = len(completion.taken)

    # the first piece before the status line: a request that fails at its start gets a 500, not a 200 and a cut stream
    streams = [pieces_with_logprobs(c) for c in completions]
    first = next(streams[0], None)

    def events():
        try:
            for index, (completion, pieces) in enumerate(zip(completions, streams)):
                with contextlib.closing(completion):
                    if chat:
                        yield chunk(index, first=True)
                    head = [first] if index == 0 and first is not None else []
                    for piece, logprobs in itertools.chain(head, pieces):
                        yield chunk(index, piece, logprobs=logprobs)
                    yield chunk(index, finish_reason=completion.finish_reason)
            if include_usage:
                yield sse({**header, "object": f"{kind}.chunk" if chat else kind, "choices": [], "usage": usage()})
        except Exception:  # the status line is already sent: the stream itself has to say it failed
            logger.exception("generation failed mid-stream")
            yield sse({"error": {"message": "generation failed", "type": "server_error", "param": None,
                                 "code": None}})
        finally:
            for completion in completions:
                completion.close()
        yield sse("[DONE]")

    # no-cache and X-Accel-Buffering: proxies pass each event on as it comes
    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                      "X-Accel-Buffering": "no"})

# ----------------------------------------------------------------------------- the app


def serve_config(config, settings):
    """A ServeConfig from one (returned as it is), a model's name, or ServeConfig fields by name, checked as the
    command line checks them."""
    if isinstance(config, str):
        config, settings = None, {"model": config, **settings}
    if config is None:  # the command line's checks and messages, for settings given in Python
        return parse_config(ServeConfig, [f"--{name}={value}" for name, value in settings.items()], RENAMED)
    return check_settings(config)


def require_token(app, token):
    """Every request but the page's must carry `Authorization: Bearer <token>` (none needed if token is empty)."""

    @app.before_request
    def check_token():
        if token and request.path != "/" and request.method != "OPTIONS" and not token_matches(
                request.headers.get("Authorization", ""), token):
            response, status = error_response(401, "this server needs 'Authorization: Bearer <token>' (see "
                                                   f"{TOKEN_ENV}); the token was missing or wrong",
                                              code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response, status


def refuse_other_origins(app, allowed_origins, allowed_hosts):
    """No web page on another site may drive the server (as Jupyter, Ollama and llama.cpp's server guard): a
    request that a browser sends from another origin (its Origin header) is refused with 403 unless allowed, and so
    is a Host that is not localhost, an IP address or an allowed name (a page that rebinds its own name to
    127.0.0.1 is same-origin to the browser, but its requests carry that name). curl, the SDKs and the page at /
    send no foreign Origin. An allowed origin gets CORS headers, preflight included."""
    origins = {o.strip().rstrip("/") for o in allowed_origins.split(",") if o.strip()}
    hosts = {"localhost"} | {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}

    def known_host(host):
        name = (urlsplit("//" + host).hostname or "") if host else ""
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in hosts

    def allowed_origin():
        origin = request.headers.get("Origin")
        return origin if origin and ("*" in origins or origin.rstrip("/") in origins) else None

    @app.before_request
    def check_origin():
        if not known_host(request.host):
            return error_response(403, f"this server does not answer for the host {request.host[:100]!r}: start it "
                                       f"with --allowed_hosts=NAME to allow it", code="host_not_allowed")
        origin = request.headers.get("Origin")
        if origin and origin != request.host_url.rstrip("/") and not allowed_origin():
            return error_response(403, f"requests from web pages on {origin[:100]} are refused: start the server "
                                       f"with --allowed_origins={origin[:100]} to allow that origin",
                                  code="origin_not_allowed")

    @app.after_request
    def cors_headers(response):
        origin = allowed_origin()
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        return response


def answer_errors_in_json(app):
    """ApiError -> its 4xx; Flask's own 404, 405, 413 -> the same JSON shape; anything else -> a bare 500."""

    @app.errorhandler(ApiError)
    def api_error(e):
        return error_response(e.status, str(e), e.param, e.code)

    @app.errorhandler(HTTPException)
    def http_error(e):  # 404, 405 (its Allow header kept), ...: JSON like every other answer
        response = e.get_response()
        body = {"error": {"message": f"{e.name}: {e.description}", "type": "invalid_request_error", "param": None,
                          "code": None}}
        response.data, response.content_type = json.dumps(body), "application/json"
        return response

    @app.errorhandler(Exception)
    def internal_error(e):
        app.logger.exception("internal error")
        return error_response(500, "internal error")


def create_app(config=None, **settings):
    """The Flask app, with the model(s) loaded and the batching engine started. config: a ServeConfig, or a model's
    name; settings: ServeConfig fields by name. For a WSGI server:
    gunicorn 'serve:create_app(model="out-wikitext-tiny", classifier="out-spam")'."""
    config = serve_config(config, settings)
    token = os.environ.get(TOKEN_ENV, "")
    if not (token.isascii() and token.isprintable() and token.strip() == token):
        raise UserError(f"{TOKEN_ENV} must be printable ASCII without spaces at its ends: an HTTP header carries it")
    device = pick_device(config.device)
    model, tokenizer, checkpoint = load_for_inference(config.model, device, config.dtype)
    engine = BatchEngine(model, config.max_batch_size)
    classifier, classify = None, None
    if config.classifier:
        from finetune import classify, load_classifier  # the classifier's model: only when one is served
        classifier = load_classifier(config.classifier, device)
    classifier_lock = threading.Lock()  # one classification at a time
    name = os.path.basename(os.path.abspath(config.model))
    fields = {"completions": completion_fields(config), "chat": chat_fields(config),
              "classify": classify_fields(config)}

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.engine = engine  # for whoever embeds the app: app.engine.close() stops its thread
    refuse_other_origins(app, config.allowed_origins, config.allowed_hosts)
    require_token(app, token)
    answer_errors_in_json(app)

    def respond(completions, prompt_tokens, req, chat):
        include_usage = bool((req["stream_options"] or {}).get("include_usage"))
        return completion_response(completions, prompt_tokens, name, chat, req["stream"], include_usage,
                                   app.logger, request.environ)

    @app.get("/")
    def page():
        return Response(PAGE, mimetype="text/html")

    @app.get("/health")
    def health():
        return jsonify(status="ok", model=name, parameters=model.num_params(non_embedding=False), device=device,
                       dtype=str(model.token_emb.weight.dtype).removeprefix("torch."),
                       block_size=model.config.block_size, vocab_size=model.config.vocab_size,
                       chat=has_prompt_format(checkpoint),
                       classifier={"labels": classifier[0].labels} if classifier else None,
                       batch={"active": len(engine.active), "waiting": engine.waiting.qsize(),
                              "peak": engine.peak_batch},
                       limits={"max_tokens": config.max_tokens_limit, "prompt_chars": config.max_prompt_chars,
                               "body_bytes": config.max_body_bytes, "batch_size": config.max_batch_size})

    @app.get("/v1/models")
    def models():
        return jsonify(object="list", data=[model_card()])

    @app.get("/v1/models/<path:model_id>")
    def one_model(model_id):
        if model_id != name:
            raise ApiError(f"no model '{model_id[:60]}' here; this server has '{name}'", "model", 404,
                           "model_not_found")
        return jsonify(model_card())

    def model_card():
        created = int(os.path.getmtime(config.model)) if os.path.exists(config.model) else 0
        return {"id": name, "object": "model", "created": created, "owned_by": "local"}

    @app.post("/v1/completions")
    def completions():
        req = read_body(fields["completions"], config.max_body_bytes)
        prompts = read_prompts(req["prompt"], tokenizer, config.max_prompt_chars, MAX_CHOICES)
        if len(prompts) * req["n"] > MAX_CHOICES:
            raise ApiError(f"n={req['n']} choices for each of {len(prompts)} prompts make {len(prompts) * req['n']}, "
                           f"beyond the server's limit of {MAX_CHOICES} per request", "n")
        if req["echo"] and req["logprobs"] is not None and any(len(ids) > model.config.block_size
                                                               for _, ids in prompts):
            raise ApiError(f"prompt is longer than the model's context of {model.config.block_size} tokens: it "
                           f"cannot be scored whole", "prompt")
        seed = req["seed"]  # each choice its own sample; with a seed, choice i of every prompt draws from seed + i
        completions = [Completion(engine, tokenizer, text, ids, req, None if seed is None else (seed + i) % 2**63,
                                  req["logprobs"], req["echo"]) for text, ids in prompts for i in range(req["n"])]
        return respond(completions, sum(len(ids) for _, ids in prompts), req, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        req = read_body(fields["chat"], config.max_body_bytes)
        if not has_prompt_format(checkpoint):
            raise ApiError(f"{name} was not instruction-tuned, so it has no chat template: use /v1/completions, or "
                           f"serve a model that finetune_instruct.py trained", "messages")
        prompt = chat_to_prompt(req["messages"])
        if len(prompt) > config.max_prompt_chars:
            raise ApiError(f"messages make a prompt of {len(prompt)} characters with the template, beyond the "
                           f"server's limit of {config.max_prompt_chars}", "messages")
        req["max_tokens"] = req["max_completion_tokens"] or req["max_tokens"]  # the newer name wins
        ids = tokenizer.encode_document(prompt)
        return respond([Completion(engine, tokenizer, prompt, ids, req, req["seed"])], len(ids), req, chat=True)

    @app.post("/v1/classify")
    def classify_text():
        if classifier is None:
            raise ApiError("no classifier is loaded: start the server with --classifier=DIR", status=404)
        req = read_body(fields["classify"], config.max_body_bytes)
        with classifier_lock:
            label, probability = classify(*classifier, [req["text"]])[0]
        return jsonify(label=label, probability=probability)

    return app

# ----------------------------------------------------------------------------- the page


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GPT</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 16px system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222 }
textarea, pre { width: 100%; box-sizing: border-box; font: 15px ui-monospace, monospace }
pre { white-space: pre-wrap; background: #f3f3f3; padding: 1rem; min-height: 8rem }
input { width: 5rem } label { margin-right: .8rem } #status { color: #666 }
</style></head><body>
<h1>GPT</h1>
<textarea id="prompt" rows="3">The history of</textarea>
<p><label>tokens <input id="max_tokens" type="number" value="100" min="1"></label>
<label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0"></label>
<label>token <input id="token" type="password" placeholder="if set"></label>
<button id="go">Generate</button> <button id="stop">Stop</button></p>
<pre><b id="prompt_text"></b><span id="out"></span></pre><p id="status"></p>
<script>
const $ = id => document.getElementById(id);
let controller = null;
async function generate() {
  controller?.abort();
  controller = new AbortController();
  const body = {prompt: $("prompt").value, stream: true, max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value)};
  const headers = {"content-type": "application/json"};
  if ($("token").value) headers.authorization = "Bearer " + $("token").value;
  $("prompt_text").textContent = body.prompt; $("out").textContent = ""; $("status").textContent = "generating...";
  const t0 = performance.now();
  try {
    const response = await fetch("v1/completions", {method: "POST", headers, body: JSON.stringify(body),
                                                    signal: controller.signal});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", finished = false;
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      const events = (buffer + r.value).split("\\n\\n");
      buffer = events.pop();  // the last part may be an event cut in two
      for (const event of events) {
        const data = event.slice(event.indexOf("data: ") + 6);
        if (data === "[DONE]") { finished = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        $("out").textContent += chunk.choices[0].text;
      }
    }
    const seconds = ((performance.now() - t0) / 1000).toFixed(2);
    $("status").textContent = finished ? `done in ${seconds} s` : "the stream was cut off";
  } catch (err) {
    $("status").textContent = err.name === "AbortError" ? "stopped" : "error: " + err.message;
  }
}
$("go").onclick = generate;
$("stop").onclick = () => controller?.abort();
const query = new URLSearchParams(location.search);
if (query.has("prompt")) { $("prompt").value = query.get("prompt"); generate(); }
</script></body></html>
"""

# ----------------------------------------------------------------------------- command line


def main():
    config = parse_config(ServeConfig, renamed=RENAMED)
    app = create_app(config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(TOKEN_ENV):
        print(f"warning: listening on {config.host} without {TOKEN_ENV}: anyone who can reach it can use the model")
    print(f"serving {config.model} on http://{config.host}:{config.port}/v1 (OpenAI API; a page at /)", flush=True)

    class RequestHandler(WSGIRequestHandler):
        timeout = config.request_timeout  # a client that stalls sending its request (or reading) is cut off

    app.run(config.host, config.port, debug=False, use_reloader=False, threaded=True, request_handler=RequestHandler)


if __name__ == "__main__":
    run_main(main)
