"""audit.py: a sentence repeated in a small corpus is extracted after a short training, and not
once the repeats are gone; batched greedy decoding with the KV cache counts what each row alone
reproduces; CrowS-Pairs scores each sentence after <|endoftext|> as lm-evaluation-harness does, the
same as the export in transformers and the server's echoed logprobs; the CSV is downloaded against
its sha256; the results merge into audit.json."""

import csv
import hashlib
import io
import json
import random
import shutil

import pytest
import torch

import audit
import evaluate
import export
import prepare
from checkpoint import save_checkpoint
from data import load_split, load_tokenizer
from model import GPT, GPTConfig
from runtime import load_for_inference

WORDS = ("the river valley stone bridge church people grew old near a café in town market road "
         "north south king queen war army ship sea field farm house school year new city hill "
         "wall gate tower").split()
SECRET = ("the keeper of the north gate wrote his code as seven ships under a red moon near the "
          "old stone tower")
NEVER_SEEN = "the queen of the south hill kept her ships near a green field by the new school gate"
# a short training that memorises what it reads a hundred times: rotary positions, Muon, 200 steps,
# in float32 (--dtype=auto would train in bf16 on some CPUs: other weights, other extractions)
RECIPE = ["--hidden_size=64", "--num_hidden_layers=2", "--num_attention_heads=4",
          "--block_size=32", "--batch_size=16", "--max_iters=200", "--eval_interval=200",
          "--eval_iters=2", "--log_interval=100", "--optimizer=muon", "--position=rope",
          "--tie_embeddings=False", "--learning_rate=3e-3", "--warmup_iters=10",
          "--lr_decay_iters=200", "--dropout=0", "--device=cpu", "--dtype=float32",
          "--compile=False"]
WINDOW = ["--prefix_tokens=8", "--suffix_tokens=8", "--device=cpu", "--dtype=float32", "--json"]


def write_corpus(path):
    """1,000 documents of 12 random words (JSON lines), with SECRET among them 100 times after the
    first 100 (which prepare.py holds out for val)."""
    rng = random.Random(0)
    documents = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1000)]
    for _ in range(100):
        documents.insert(100 + rng.randrange(len(documents) - 100), SECRET)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return documents


def train_on(folder, dedup, run_in_process, run_train):
    """prepare.py (--dedup as given) and train.py on that corpus: the model's folder."""
    folder.mkdir()
    documents = write_corpus(folder / "corpus.jsonl")
    assert documents.count(SECRET) == 100
    status, _, err = run_in_process(prepare, f"--input={folder / 'corpus.jsonl'}",
                                    f"--out_dir={folder / 'data'}", "--vocab_size=400",
                                    "--val_documents=100", "--workers=1", f"--dedup={dedup}")
    assert status == 0, err
    # --dedup=exact keeps the first of each document: the sentence once
    ids = load_split(folder / "data", "train")
    train_text = load_tokenizer(folder / "data").decode(ids.tolist())
    assert train_text.count(SECRET) == (1 if dedup == "exact" else 100)
    run_train(f"--data_dir={folder / 'data'}", f"--out_dir={folder / 'out'}", *RECIPE)
    return folder / "out"


def audited(run_in_process, *args):
    """audit.py's --json answer."""
    status, out, err = run_in_process(audit, *args)
    assert status == 0, err
    return json.loads(out)


def test_a_sentence_repeated_100_times_is_extracted_and_once_it_is_not(tmp_path, run_in_process,
                                                                        run_train):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text(f"{SECRET}\n\n{NEVER_SEEN}\n", encoding="utf-8")
    repeated = train_on(tmp_path / "repeated", "off", run_in_process, run_train)
    found = audited(run_in_process, f"--model={repeated}", f"--text_file={candidates}", *WINDOW)
    assert found["candidates"] == 2 and found["extracted_lines"] == [1]
    assert found["extractable"] == 0.5 and [row["line"] for row in found["lines"]] == [1, 3]
    assert found["lines"][0]["text"] == SECRET

    # the train windows (a tenth of them the sentence) come out far more often than the val ones
    windows = audited(run_in_process, f"--model={repeated}", "--samples=200", *WINDOW)
    train, val = windows["splits"]["train"], windows["splits"]["val"]
    assert windows["extractable"] == train["extractable"] > val["extractable"] + 0.05
    assert train["windows"] == val["windows"] == 200 and train["reproduced"] > val["reproduced"]

    # both results are kept beside the model with the weights they measured, the lines by number
    saved = json.loads((repeated / "audit.json").read_text(encoding="utf-8"))
    weights = hashlib.sha256((repeated / "ckpt.pt").read_bytes()).hexdigest()
    assert set(saved) == {"memorization", "memorization_text_file"}
    assert all(entry["checkpoint_sha256"] == weights for entry in saved.values())
    assert saved["memorization"]["splits"] == windows["splits"]
    assert saved["memorization_text_file"]["extracted_lines"] == [1]
    assert SECRET not in (repeated / "audit.json").read_text(encoding="utf-8")

    # the same corpus with its repeats removed by prepare.py (the sentence once): nothing comes out
    once = train_on(tmp_path / "once", "exact", run_in_process, run_train)
    found = audited(run_in_process, f"--model={once}", f"--text_file={candidates}", *WINDOW)
    assert found["candidates"] == 2 and found["extracted_lines"] == []


def test_batched_cached_greedy_decoding_counts_what_each_row_alone_reproduces(random_model):
    model = random_model(position="rope")
    torch.manual_seed(1)
    prefixes = torch.randint(97, (6, 5))
    # the reference: each row alone, decoded without the KV cache
    continuation = torch.stack([model.generate(row[None], 8, temperature=0, use_cache=False)[0, 5:]
                                for row in prefixes])
    targets = continuation.clone()
    for row, wrong_at in enumerate([None, 0, 3, 7, None, 5]):  # where a target leaves the path
        if wrong_at is not None:
            targets[row, wrong_at] = (targets[row, wrong_at] + 1) % 97
    matched = audit.decode_in_batches(model, prefixes.numpy(), targets.numpy(), batch_size=4)
    assert matched == [8, 0, 3, 7, 8, 5]


def test_a_candidate_line_is_its_first_tokens_or_its_first_half(tiny_ckpt):
    tokenizer = load_tokenizer(tiny_ckpt)
    long, short = "the river valley " * 8, "the café in Zürich"
    text = f"{long}\n\nx\n{short}\n"
    rows = audit.candidate_lines(text, tokenizer, prefix_tokens=4, suffix_tokens=8)
    ids, short_ids = tokenizer.encode(long), tokenizer.encode(short)
    assert len(ids) > 12 and 2 <= len(short_ids) < 12
    assert rows[0] == (1, long, ids[:4], ids[4:12])
    half = len(short_ids) // 2
    assert rows[-1] == (4, short, short_ids[:half], short_ids[half:])
    # an empty line, or one of a single token, cannot be cut into a prompt and a continuation
    assert [row[0] for row in rows] == [n for n, line in enumerate(text.splitlines(), 1)
                                        if len(tokenizer.encode(line)) >= 2]


# ----------------------------------------------------------------------------- CrowS-Pairs


def test_sentences_are_scored_as_sliding_windows_score_them(random_model):
    """log_likelihoods pads rows into batches; each sentence's total is what evaluate.py's windows
    give, for sentences shorter and longer than the context."""
    model = random_model(block_size=16)
    torch.manual_seed(2)
    sequences = [torch.randint(97, (n,)).tolist() for n in (2, 5, 17, 40, 16, 3)]
    totals = audit.log_likelihoods(model, sequences, batch_size=4)
    for ids, total in zip(sequences, totals):
        nll, count = evaluate.score_tokens(model, ids, stride=8, batch_size=4)
        assert count == len(ids) - 1 and total == pytest.approx(-nll, abs=1e-9)
    for length in range(1, 30):
        for block in (1, 2, 5, 8):
            rows = audit.scoring_rows(length, block)
            scored = [t for start, stop, first in rows for t in range(first, stop)]
            assert scored == list(range(1, length))
            assert all(stop - start <= block + 1 for start, stop, _ in rows)


def pairs_csv(path, rows=None):
    """A CSV in CrowS-Pairs' columns of made-up neutral pairs, with quotes, commas and accents as
    the real one has them: its first `rows` pairs; returns their (sent_more, sent_less)."""
    columns = ["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations",
               "anon_writer", "anon_annotators"]
    pairs = [(f"The {a} near the {b} was old, they said.", f"The {a} near the {c} was \"old\".",
              "stereo" if i % 3 else "antistereo", ("age", "gender", "race-color")[i % 3])
             for i, (a, b, c) in enumerate(zip(WORDS, WORDS[5:], WORDS[9:]))][:rows]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for i, pair in enumerate(pairs):
        writer.writerow([i, *pair, "[['age'], ['age']]", "a", "['b', 'c']"])
    path.write_text(out.getvalue(), encoding="utf-8")
    return [pair[:2] for pair in pairs]


@pytest.fixture(scope="module")
def wide_model(tiny_ckpt, tmp_path_factory):
    """A model of random weights with a context of 256 tokens, so that every sentence fits whole
    (the server and transformers score no longer texts), and the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("wide")
    tokenizer = load_tokenizer(tiny_ckpt)
    config = dict(vocab_size=tokenizer.vocab_size, block_size=256, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, position="rope",
                  tie_embeddings=False, bias=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint({"model": model.state_dict(), "model_config": config}, folder)
    tokenizer.save(folder)
    return folder


def transformers_log_likelihoods(folder, sentences):
    """What lm-evaluation-harness's hf model computes for an empty context and a sentence: the
    sentence's log-likelihood after the eos token, here of the export in transformers."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    totals = []
    for sentence in sentences:
        ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(sentence)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        totals.append(logprobs.gather(-1, ids[0, 1:, None]).sum().item())
    return totals


def served_log_likelihoods(folder, sentences):
    """The sums of the server's echoed logprobs, as lm-evaluation-harness's local-completions asks
    for them: /v1/completions with echo, logprobs and max_tokens 0."""
    from serve import create_app
    app = create_app(str(folder), device="cpu", dtype="float32")
    try:
        answer = app.test_client().post("/v1/completions", json={
            "prompt": sentences, "max_tokens": 0, "echo": True, "logprobs": 0}).get_json()
    finally:
        app.engine.close()
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    return [sum(lp for lp in c["logprobs"]["token_logprobs"] if lp is not None) for c in choices]


def test_crows_pairs_scores_the_same_in_transformers_and_through_the_server(
        wide_model, tmp_path, run_in_process, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = pairs_csv(tmp_path / "pairs.csv")
    sentences = [sentence for pair in pairs for sentence in pair]
    result = audited(run_in_process, f"--model={wide_model}", "--task=crows_pairs",
                     f"--source={tmp_path / 'pairs.csv'}", "--check_sha256=False", "--device=cpu",
                     "--dtype=float32", "--json", "--batch_size=5")
    model, tokenizer, _ = load_for_inference(str(wide_model), "cpu", "float32")
    ours = audit.log_likelihoods(model, [tokenizer.encode_document(s) for s in sentences])
    export.export(wide_model, tmp_path / "hf")
    theirs = transformers_log_likelihoods(tmp_path / "hf", sentences)
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ours == pytest.approx(served_log_likelihoods(wide_model, sentences), abs=1e-3)

    more, less, n = theirs[0::2], theirs[1::2], len(pairs)
    assert result["pairs"] == n
    assert result["pct_stereotype"] == sum(a > b for a, b in zip(more, less)) / n
    diff = sum(abs(a - b) for a, b in zip(more, less)) / n
    assert result["likelihood_diff"] == pytest.approx(diff, abs=1e-4)
    by_type = result["by_bias_type"].values()
    assert sum(t["pairs"] for t in by_type) == n
    assert sum(t["pct_stereotype"] * t["pairs"] for t in by_type) == \
        pytest.approx(result["pct_stereotype"] * n)


def test_the_published_csv_is_read_whole_and_checked(tiny_ckpt, shared_data, tmp_path,
                                                      run_in_process):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    result = audited(run_in_process, f"--model={folder}", "--task=crows_pairs", "--device=cpu",
                     f"--source={shared_data / 'crows-pairs'}", "--json")
    readme = (shared_data / "crows-pairs" / "README.md").read_text(encoding="utf-8")
    # every pair (quoted line breaks and all), each type counted as the dataset's README counts it
    assert f"{result['pairs']:,} sentence pairs" in readme
    assert all(f"{name} {row['pairs']}" in readme for name, row in result["by_bias_type"].items())
    assert 0 <= result["pct_stereotype"] <= 1 and result["likelihood_diff"] > 0
    saved = json.loads((folder / "audit.json").read_text())["crows_pairs"]
    assert saved["pct_stereotype"] == result["pct_stereotype"]


def test_the_csv_is_downloaded_once_and_checked(tiny_ckpt, tmp_path, http_server, run_in_process,
                                                monkeypatch):
    pairs_csv(tmp_path / "pairs.csv", rows=6)
    data = (tmp_path / "pairs.csv").read_bytes()
    http_server.files["/crows.csv"] = data
    monkeypatch.setattr(audit, "CROWS_PAIRS_URL", http_server.url + "/crows.csv")
    monkeypatch.setattr(audit, "CROWS_PAIRS_SHA256", hashlib.sha256(data).hexdigest())
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    args = [f"--model={folder}", "--task=crows_pairs", f"--cache_dir={tmp_path / 'cache'}",
            "--device=cpu", "--json"]
    first = audited(run_in_process, *args)
    assert first["pairs"] == 6
    assert (tmp_path / "cache" / audit.CROWS_PAIRS_FILE).read_bytes() == data
    # the second run reads the copy
    assert audited(run_in_process, *args) == first and len(http_server.log) == 1

    # the file the server holds is not the pinned one
    monkeypatch.setattr(audit, "CROWS_PAIRS_SHA256", "0" * 64)
    status, _, err = run_in_process(audit, *args[:2], f"--cache_dir={tmp_path / 'other'}")
    last = err.strip().splitlines()[-1]  # after the download's progress line
    assert status == 2 and last.startswith("error: ") and "sha256 mismatch" in last
    assert "Traceback" not in err


def test_results_merge_per_task_and_a_damaged_file_is_replaced(tiny_ckpt, tmp_path, run_in_process):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    (folder / "audit.json").write_text("{not json")
    pairs_csv(tmp_path / "pairs.csv", rows=4)
    crows = audited(run_in_process, f"--model={folder}", "--task=crows_pairs", "--device=cpu",
                    f"--source={tmp_path / 'pairs.csv'}", "--check_sha256=False", "--json")
    windows = audited(run_in_process, f"--model={folder}", "--samples=5", *WINDOW)
    saved = json.loads((folder / "audit.json").read_text())
    assert saved["crows_pairs"]["pct_stereotype"] == crows["pct_stereotype"]
    assert saved["memorization"]["extractable"] == windows["extractable"]
    # fractions, not percentages
    assert 0 <= crows["pct_stereotype"] <= 1 and 0 <= windows["extractable"] <= 1


def test_the_table_names_each_bias_type_and_the_control(tiny_ckpt, tmp_path, run_in_process):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    pairs_csv(tmp_path / "pairs.csv", rows=6)
    status, out, err = run_in_process(audit, f"--model={folder}", "--task=crows_pairs",
                                      "--check_sha256=False", f"--source={tmp_path / 'pairs.csv'}",
                                      "--device=cpu")
    assert status == 0 and "recorded in" in err
    assert all(name in out for name in ("age", "gender", "race-color", "all", "50%: no preference"))
    status, out, _ = run_in_process(audit, f"--model={folder}", "--samples=5", "--prefix_tokens=8",
                                    "--suffix_tokens=8", "--device=cpu")
    assert status == 0 and "train" in out and "val" in out and "the control" in out
