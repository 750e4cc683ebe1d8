"""
Serve a trained GPT over HTTP: generate text (whole, or token by token as server-sent events), classify text with a
fine-tuned classifier, and try generation from a small page in the browser.

    python serve.py --out_dir=out-wikitext-small [--classifier_dir=out-spam] [--host=127.0.0.1 --port=8000]

    curl -s localhost:8000/v1/generate -H 'content-type: application/json' -d '{"prompt": "The history of"}'
    curl -N localhost:8000/v1/generate -H 'content-type: application/json' -d '{"prompt": "The", "stream": true}'
    curl -s localhost:8000/v1/classify -H 'content-type: application/json' -d '{"text": "Free entry, win cash now"}'
    curl -s localhost:8000/health
    http://127.0.0.1:8000/?prompt=The+history+of in a browser: the page (?prompt= starts generating at once)

POST /v1/generate {prompt, max_new_tokens, temperature, top_k, top_p, seed, stream} -> {"text": ..., "model": ...};
with "stream": true, a `data: {"text": piece}` event per piece of text, then `event: done`. POST /v1/classify {text}
-> {"label": ..., "probability": ...}. GET /health -> the model, its parameter count, the device and dtype, the limits.
Bad input gets a 4xx and {"error": what is wrong, "field": which field}.

Set GPT_API_TOKEN to require `Authorization: Bearer <token>` on every request (except the page itself, which holds
no data and asks for the token). The model serves one request at a time; the others wait their turn. Flask's own
server is for local use; under a production WSGI server run one process (one copy of the model) with threads:

    gunicorn -w 1 --threads 8 -b 127.0.0.1:8000 'serve:create_app(out_dir="out-wikitext-small")'
"""

import contextlib
import difflib
import hmac
import json
import os
import threading
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from checkpoint import load_for_inference
from cli import UserError, parse_config, run_main
from finetune import classify, load_classifier
from generate import stream_text
from runtime import pick_device


@dataclass
class ServeConfig:
    out_dir: str = "out-wikitext-small"   # a train.py checkpoint folder (or gpt2, ... as sample.py takes them)
    classifier_dir: str = ""              # a finetune_classifier.py folder; empty: /v1/classify answers 404
    host: str = "127.0.0.1"               # 0.0.0.0 would answer the whole network: set GPT_API_TOKEN first
    port: int = 8000                      # TCP port to listen on
    device: str = "auto"                  # auto: cuda, then mps, then cpu
    dtype: str = "auto"                   # float32 | bfloat16 | float16; auto: bf16 where the hardware has it
    max_new_tokens_limit: int = 500       # the most tokens one request may ask for
    max_prompt_chars: int = 10_000        # longest prompt (or text to classify), in characters
    max_body_bytes: int = 64 * 1024       # larger request bodies are refused unread


TOKEN_ENV = "GPT_API_TOKEN"
REQUIRED = object()
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
NULLABLE = ("top_k", "top_p", "seed")  # null: no top-k / top-p filter, a random seed


def generate_fields(config):
    """/v1/generate's body: name -> (JSON type, default, test of the value, what the test asks). The defaults are
    sample.py's, but for the seed: a fresh one per request unless the client sets it."""
    limit, chars = config.max_new_tokens_limit, config.max_prompt_chars
    return {
        "prompt": (str, REQUIRED, lambda s: 0 < len(s) <= chars, f"must be 1 to {chars} characters long"),
        "max_new_tokens": (int, min(200, limit), lambda n: 1 <= n <= limit,
                           f"must be 1 to {limit} (the server's limit)"),
        "temperature": (float, 0.8, lambda t: t >= 0, "must be >= 0 (0: the likeliest token)"),
        "top_k": (int, 200, lambda k: k >= 1, "must be >= 1, or null to keep every token"),
        "top_p": (float, 1.0, lambda p: 0 < p <= 1, "must be > 0 and <= 1, or null to keep every token"),
        "seed": (int, None, lambda s: 0 <= s < 2**63, "must be 0 to 2**63 - 1, or null for a random one"),
        "stream": (bool, False, None, ""),
    }


def classify_fields(config):
    chars = config.max_prompt_chars
    return {"text": (str, REQUIRED, lambda s: 0 < len(s) <= chars, f"must be 1 to {chars} characters long")}


class ApiError(Exception):
    """A request the client can fix: answered with `status` and {"error": message, "field": field}."""

    def __init__(self, message, field=None, status=400):
        super().__init__(message)
        self.field, self.status = field, status


def error_response(status, message, field=None):
    body = {"error": message} if field is None else {"error": message, "field": field}
    return jsonify(body), status

# ----------------------------------------------------------------------------- reading a request


def excerpt(value):
    """A value as the client wrote it, cut short: error messages echo input, never much of it."""
    text = json.dumps(value)
    if len(text) <= 40:
        return text
    return f"a string of {len(value)} characters" if isinstance(value, str) else text[:37] + "..."


def is_json_type(value, kind):
    """Whether a JSON value is of the Python type a field wants: 1 is a float, True is not an int, NaN no float."""
    if kind is float:  # an integer is a number too; NaN and Infinity (which Python's json accepts) are not
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # in Python, True is an int


def read_body(fields, max_bytes):
    """The JSON object of the request, defaults filled in. Each field must be known, of its type, and pass its
    test; the first that is not is an ApiError naming it."""
    try:
        body = json.loads(request.get_data(cache=False))  # any content type: curl -d sends a form type
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
    for name, (kind, default, test, rule) in fields.items():
        value = body.get(name, default)
        if value is REQUIRED:
            raise ApiError(f"{name} is required", name)
        if value is None and name in NULLABLE:
            values[name] = None
            continue
        if not is_json_type(value, kind):
            null = ", or null" if name in NULLABLE else ""
            raise ApiError(f"{name} must be {TYPE_NAMES[kind]}{null}, got {excerpt(value)}", name)
        if test is not None and not test(value):
            raise ApiError(f"{name} {rule}, got {excerpt(value)}", name)
        values[name] = float(value) if kind is float else value
    return values


def token_matches(header, token):
    scheme, _, given = header.partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess: the token cannot be found byte by byte
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

# ----------------------------------------------------------------------------- generating


def generation(model, tokenizer, lock, req):
    """The text pieces of one generation, made while holding the model's lock. The lock is taken at the first
    piece and let go when the generator finishes or is closed (the server closes it when a client goes away)."""
    options = {name: req[name] for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
    with lock, contextlib.closing(stream_text(model, tokenizer, req["prompt"], **options)) as pieces:
        yield from pieces


def sse(data, event=None):
    """One server-sent event; JSON keeps newlines in the text from ending the event early."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


def event_stream(pieces, logger):
    """A server-sent event per text piece, then `done` (or `error`, should generation fail)."""
    with contextlib.closing(pieces):
        try:
            for piece in pieces:
                yield sse({"text": piece})
        except Exception:  # the status line is already sent: the stream itself has to say it failed
            logger.exception("generation failed mid-stream")
            yield sse({"error": "generation failed"}, "error")
            return
    yield sse({}, "done")

# ----------------------------------------------------------------------------- the app


def serve_config(config, settings):
    """A ServeConfig from one (returned as it is), an out_dir string, or ServeConfig fields by name, checked as the
    command line checks them."""
    if isinstance(config, str):
        config, settings = None, {"out_dir": config, **settings}
    if config is None:  # the command line's checks and messages, for settings given in Python
        config = parse_config(ServeConfig, [f"--{name}={value}" for name, value in settings.items()])
    for name in ("max_new_tokens_limit", "max_prompt_chars", "max_body_bytes"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}")
    return config


def require_token(app, token):
    """Every request but the page's must carry `Authorization: Bearer <token>` (none needed if token is empty)."""

    @app.before_request
    def check_token():
        if token and request.path != "/" and not token_matches(request.headers.get("Authorization", ""), token):
            response, status = error_response(401, "this server needs 'Authorization: Bearer <token>' (see "
                                                   f"{TOKEN_ENV}); the token was missing or wrong")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response, status


def answer_errors_in_json(app):
    """ApiError -> its 4xx; Flask's own 404, 405, 413 -> the same JSON shape; anything else -> a bare 500."""

    @app.errorhandler(ApiError)
    def api_error(e):
        return error_response(e.status, str(e), e.field)

    @app.errorhandler(HTTPException)
    def http_error(e):  # 404, 405 (its Allow header kept), ...: JSON like every other answer
        response = e.get_response()
        response.data, response.content_type = json.dumps({"error": f"{e.name}: {e.description}"}), "application/json"
        return response

    @app.errorhandler(Exception)
    def internal_error(e):
        app.logger.exception("internal error")
        return error_response(500, "internal error")


def create_app(config=None, **settings):
    """The Flask app, with the model(s) loaded. config: a ServeConfig, or an out_dir; settings: ServeConfig fields by
    name. For a WSGI server: gunicorn 'serve:create_app(out_dir="out-wikitext-small", classifier_dir="out-spam")'."""
    config = serve_config(config, settings)
    device = pick_device(config.device)
    model, tokenizer, _ = load_for_inference(config.out_dir, device, config.dtype)
    classifier = load_classifier(config.classifier_dir, device) if config.classifier_dir else None
    model_lock, classifier_lock = threading.Lock(), threading.Lock()  # one request at a time on each model
    name = os.path.basename(os.path.abspath(config.out_dir))
    gen_fields, cls_fields = generate_fields(config), classify_fields(config)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    require_token(app, os.environ.get(TOKEN_ENV, ""))
    answer_errors_in_json(app)

    @app.get("/")
    def page():
        return Response(PAGE, mimetype="text/html")

    @app.get("/health")
    def health():
        labels = classifier[0].labels if classifier else None
        return jsonify(status="ok", model=name, parameters=model.num_params(non_embedding=False), device=device,
                       dtype=str(model.token_emb.weight.dtype).removeprefix("torch."),
                       block_size=model.config.block_size, vocab_size=model.config.vocab_size,
                       classifier={"labels": labels} if classifier else None,
                       limits={"max_new_tokens": config.max_new_tokens_limit, "prompt_chars": config.max_prompt_chars,
                               "body_bytes": config.max_body_bytes})

    @app.post("/v1/generate")
    def generate():
        req = read_body(gen_fields, config.max_body_bytes)
        pieces = generation(model, tokenizer, model_lock, req)
        if req["stream"]:  # no-cache and X-Accel-Buffering: proxies pass each event on as it comes
            return Response(event_stream(pieces, app.logger), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return jsonify(text="".join(pieces), model=name)

    @app.post("/v1/classify")
    def classify_text():
        if classifier is None:
            raise ApiError("no classifier is loaded: start the server with --classifier_dir=DIR", status=404)
        req = read_body(cls_fields, config.max_body_bytes)
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
<p><label>tokens <input id="max_new_tokens" type="number" value="100" min="1"></label>
<label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0"></label>
<label>token <input id="token" type="password" placeholder="if set"></label>
<button id="go">Generate</button> <button id="stop">Stop</button></p>
<pre><b id="shown"></b><span id="out"></span></pre><p id="status"></p>
<script>
const $ = id => document.getElementById(id);
let controller = null;
async function generate() {
  controller?.abort();
  controller = new AbortController();
  const body = {prompt: $("prompt").value, stream: true, max_new_tokens: Number($("max_new_tokens").value),
                temperature: Number($("temperature").value)};
  const headers = {"content-type": "application/json"};
  if ($("token").value) headers.authorization = "Bearer " + $("token").value;
  $("shown").textContent = body.prompt; $("out").textContent = ""; $("status").textContent = "generating...";
  const t0 = performance.now();
  try {
    const response = await fetch("v1/generate", {method: "POST", headers, body: JSON.stringify(body),
                                                 signal: controller.signal});
    if (!response.ok) throw new Error((await response.json()).error);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", finished = false;
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      const events = (buffer + r.value).split("\\n\\n");
      buffer = events.pop();  // the last part may be an event cut in two
      for (const event of events) {
        const data = JSON.parse(event.slice(event.indexOf("data: ") + 6));
        if (event.startsWith("event: error")) throw new Error(data.error);
        finished ||= event.startsWith("event: done");
        if (data.text) $("out").textContent += data.text;
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
    config = parse_config(ServeConfig)
    app = create_app(config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(TOKEN_ENV):
        print(f"warning: listening on {config.host} without {TOKEN_ENV}: anyone who can reach it can use the model")
    print(f"serving {config.out_dir} on http://{config.host}:{config.port}/", flush=True)
    app.run(config.host, config.port, debug=False, use_reloader=False, threaded=True)


if __name__ == "__main__":
    run_main(main)
