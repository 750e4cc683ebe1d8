"""Tests for evaluate.py: sliding windows, the per-token / per-byte / per-word figures, splits and text files, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from cli import UserError
from data import load_meta
from runtime import load_for_inference
from tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    """(model in float32, tokenizer, data folder): what int8 is compared with."""
    model, tokenizer, checkpoint = load_for_inference(str(tiny_ckpt), device="cpu", dtype="float32")
    return model, tokenizer, checkpoint["train_config"]["data_dir"]


# the tests that score one text two ways run in both dtypes (bfloat16 emulated where the CPU
# lacks it): both ways put the same windows through the same batches, so they agree in either
@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def loaded_in(request, tiny_ckpt):
    """(model in each dtype, tokenizer, data folder)."""
    model, tokenizer, checkpoint = load_for_inference(str(tiny_ckpt), device="cpu",
                                                      dtype=request.param)
    return model, tokenizer, checkpoint["train_config"]["data_dir"]


def nll_of_each_target(model, ids, stride):
    """{position: negative log-likelihood} of each target, scored alone with exactly the context its window gives."""
    T = min(model.config.block_size, len(ids) - 1)
    nll = {}
    for start, first in evaluate.window_spans(len(ids), model.config.block_size, stride):
        for p in range(first, start + T + 1):
            logits = model(torch.tensor([ids[start:p]]))[0][0, -1]
            nll[p] = -F.log_softmax(logits, -1)[ids[p]].item()
    return nll


# ----------------------------------------------------------------------------- sliding windows

@pytest.mark.parametrize("n, block, stride", [(2, 8, 4), (9, 8, 4), (10, 8, 4), (100, 8, 3), (100, 8, 8),
                                              (100, 8, 1), (57, 16, 16), (5, 16, 7)])
def test_windows_score_every_target_once_with_enough_context(n, block, stride):
    spans = evaluate.window_spans(n, block, stride)
    T = min(block, n - 1)
    scored = []
    for start, first in spans:
        assert 0 <= start < first <= start + T <= n - 1  # the window's inputs and targets lie inside the text
        for p in range(first, start + T + 1):
            assert p - start >= min(p, T - stride + 1)  # context: everything before, or at least T - stride + 1
            scored.append(p)
    assert scored == list(range(1, n))
    assert len(spans) == 1 + max(0, math.ceil((n - 1 - T) / stride))


def test_sliding_window_equals_full_context_when_the_text_fits(random_model):
    model = random_model(block_size=32)
    ids = torch.randint(97, (30,), generator=torch.Generator().manual_seed(0))
    logits = model(ids[None, :-1])[0][0]
    full = F.cross_entropy(logits, ids[1:], reduction="sum").item()
    for stride in (1, 7, 16, 32):
        nll, count = evaluate.score_tokens(model, ids.numpy(), stride=stride)
        assert count == 29 and nll == pytest.approx(full, rel=1e-12)


def test_sliding_window_matches_scoring_each_token_alone(random_model):
    model = random_model(block_size=16)
    ids = torch.randint(97, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    each = nll_of_each_target(model, ids, stride=5)
    for skip_id in (None, ids[40]):
        kept = [nll for p, nll in each.items() if ids[p] != skip_id]
        for batch_size in (1, 3, 100):
            nll, count = evaluate.score_tokens(model, np.array(ids), 5, batch_size, skip_id=skip_id)
            assert (nll, count) == (pytest.approx(sum(kept), rel=1e-10), len(kept))
    assert len(kept) < 59  # the skipped id occurs among the targets
    nll_wide, _ = evaluate.score_tokens(model, np.array(ids), stride=16)
    assert nll_wide != pytest.approx(sum(each.values()), rel=1e-6)  # another stride, other contexts, another score


# ----------------------------------------------------------------------------- counts and figures

def test_counts_and_figures_on_a_known_text(loaded_in):
    model, tokenizer, _ = loaded_in
    text = " the café in Zürich\n 日本 の 東京 .\n\n river\n"
    for convention, words in (("whitespace", 9), ("classic", 13)):
        r = evaluate.evaluate_text(model, tokenizer, text, convention, progress=False)
        assert (r["bytes"], r["words"], r["word_convention"]) == (len(text.encode("utf-8")), words, convention)
        assert r["tokens"] == len(tokenizer.encode(text))  # every token, the first one after end-of-text
        nll = r["loss"] * r["tokens"]
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / r["bytes"])
        assert r["word_perplexity"] == pytest.approx(math.exp(nll / words))
    ids = tokenizer.encode_document(text)
    assert r["loss"] * r["tokens"] == pytest.approx(evaluate.score_tokens(model, ids)[0])


def test_split_uses_meta_counts_and_skips_document_separators(loaded_in):
    model, tokenizer, data_dir = loaded_in
    meta = load_meta(data_dir)
    stats = meta["splits"]["val"]
    r = evaluate.evaluate_split(model, tokenizer, data_dir, "val", progress=False)
    assert (r["bytes"], r["words"], r["word_convention"]) == (stats["bytes"], stats["words_whitespace"], "whitespace")
    assert r["tokens"] == stats["tokens"] - stats["documents"]  # each document's leading end-of-text is context
    # counting from the decoded tokens (what --max_tokens does) gives meta.json's numbers back
    whole = evaluate.evaluate_split(model, tokenizer, data_dir, "val", max_tokens=stats["tokens"], progress=False)
    assert whole == pytest.approx(r)
    part = evaluate.evaluate_split(model, tokenizer, data_dir, "val", max_tokens=500, progress=False)
    assert part["tokens"] == 499 and part["bytes"] < stats["bytes"]


def test_int8_costs_little_perplexity(loaded, tiny_ckpt):
    model, tokenizer, data_dir = loaded
    q, _, _ = load_for_inference(str(tiny_ckpt), device="cpu", quantize="int8")
    fp32 = evaluate.evaluate_split(model, tokenizer, data_dir, "val", progress=False)["perplexity"]
    int8 = evaluate.evaluate_split(q, tokenizer, data_dir, "val", progress=False)["perplexity"]
    assert abs(int8 / fp32 - 1) < 0.02


def test_gpt2_tokenizer_works_alike(shared_data, random_model):
    tokenizer = BPETokenizer.load(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")
    model = random_model(vocab_size=50257, block_size=16, dtype=torch.float32)
    text = "Hello world, the café in Zürich\nis 日本 🙂\n"
    r = evaluate.evaluate_text(model, tokenizer, text, "classic", stride=4, progress=False)
    assert tokenizer.eot_id == 50256 and tokenizer.encode_document(text)[0] == 50256
    assert r["tokens"] == len(tokenizer.encode(text)) > 16  # longer than the context: several windows
    assert (r["bytes"], r["words"]) == (len(text.encode("utf-8")), 9 + 2)
    assert 10 < r["perplexity"] < 10 * 50257  # a random model: near-uniform over the vocabulary


# ----------------------------------------------------------------------------- the command line

def test_cli_split_json_and_text_file(loaded, tiny_ckpt, tmp_path, run_script):
    _, tokenizer, data_dir = loaded
    run = run_script("evaluate.py", f"--model={tiny_ckpt}", "--split=val", "--json", "--device=cpu")
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)  # stdout holds the JSON alone; the progress bar is on stderr
    stats = load_meta(data_dir)["splits"]["val"]
    assert (r["tokens"], r["bytes"], r["stride"], r["block_size"]) == (
        stats["tokens"] - stats["documents"], stats["bytes"], 16, 32)
    assert r["first_token"] == "scored after an end-of-text token" and "scoring val" in run.stderr
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))

    text_file = tmp_path / "some.txt"
    text_file.write_text("the café in Zürich\nriver valley\n", encoding="utf-8")
    run = run_script("evaluate.py", f"--model={tiny_ckpt}", f"--text_file={text_file}",
                     "--word_convention=classic", "--stride=8", "--device=cpu")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "8 words (classic:" in out and "bits per byte" in out and "word perplexity" in out and "stride 8" in out


def test_cli_missing_checkpoint_is_one_line_error(tmp_path, run_script):
    r = run_script("evaluate.py", f"--model={tmp_path}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: no checkpoint at") and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_bad_settings_are_user_errors(loaded, tmp_path):
    model, tokenizer, data_dir = loaded
    for stride in (0.5, 33, -1):
        with pytest.raises(UserError, match="--stride must be between 1 and block_size=32"):
            evaluate.score_tokens(model, np.arange(40), stride=stride)
    with pytest.raises(UserError, match="too short"):
        evaluate.score_tokens(model, np.arange(1))
    with pytest.raises(UserError, match="--word_convention must be"):
        evaluate.check_convention("lines")
    with pytest.raises(UserError, match="has no dev split"):
        evaluate.evaluate_split(model, tokenizer, data_dir, "dev")
    evaluate.check_same_tokenizer(tokenizer, data_dir)  # the data it was trained on: fine
    BPETokenizer.train("other words entirely, other merges " * 50, vocab_size=280).save(tmp_path)
    with pytest.raises(UserError, match="another tokenizer"):
        evaluate.check_same_tokenizer(tokenizer, tmp_path)


# ----------------------------------------------------------------------------- dynamic evaluation

def test_dynamic_evaluation_without_learning_is_static_scoring(random_model):
    ids = torch.randint(97, (150,), generator=torch.Generator().manual_seed(2)).numpy()
    static = evaluate.score_tokens(random_model(block_size=32), ids, stride=8)
    dynamic = evaluate.score_tokens_dynamic(random_model(block_size=32), ids, segment=8, lr=0.0)
    assert dynamic[1] == static[1] and dynamic[0] == pytest.approx(static[0], rel=1e-10)


def test_dynamic_evaluation_scores_each_token_before_learning_from_it(random_model):
    """One segment: every token is scored before the only update, so any lr gives the static score; and a text that
    repeats itself is predicted better the second time once the model learns as it reads."""
    ids = torch.randint(97, (17,), generator=torch.Generator().manual_seed(3)).numpy()
    static = evaluate.score_tokens(random_model(block_size=32), ids, stride=16)
    assert evaluate.score_tokens_dynamic(random_model(block_size=32), ids, segment=16, lr=10.0)[0] == \
        pytest.approx(static[0], rel=1e-10)
    repeated = np.tile(torch.randint(97, (24,), generator=torch.Generator().manual_seed(4)).numpy(), 6)
    static_nll, n = evaluate.score_tokens(random_model(block_size=32), repeated, stride=8)
    dynamic_nll, m = evaluate.score_tokens_dynamic(random_model(block_size=32), repeated, segment=8, lr=0.5)
    assert n == m and dynamic_nll < 0.9 * static_nll


def test_gradient_rms_is_the_root_summed_square_of_each_segments_gradient(random_model):
    """gradient_rms over 2 segments of a text: per weight, sqrt(g_1^2 + g_2^2), g_i the gradient of
    segment i's mean loss (what a dynamic step descends), worked out here a segment at a time; the
    weights stay as they were."""
    ids = torch.randint(97, (40,), generator=torch.Generator().manual_seed(5)).numpy()
    model, reference = random_model(block_size=32), random_model(block_size=32)
    rms = evaluate.gradient_rms(model, ids, segment=8, count=2)
    grads = []
    for first in (1, 9):  # the first two segments' targets: ids[1:9], ids[9:17]
        x, y = torch.tensor(ids[:first + 7])[None], torch.tensor(ids[1:first + 8])[None]
        y[:, :first - 1] = -100
        reference(x, y)[1].backward()
        grads.append([p.grad.clone() for p in reference.parameters()])
        reference.zero_grad()
    for r, g1, g2 in zip(rms, *grads):
        torch.testing.assert_close(r, (g1.square() + g2.square()).sqrt())
    untouched = random_model(block_size=32).parameters()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), untouched))


def test_rms_normalised_dynamic_evaluation_divides_each_step_by_the_rms(random_model):
    """With rms given, a weight steps by lr * grad / (rms + its tensor's mean rms): an rms of ones
    at lr * 2 is plain SGD at lr, and an rms of 1 for some weights and 3 for others is not."""
    ids = np.tile(torch.randint(97, (24,), generator=torch.Generator().manual_seed(4)).numpy(), 4)
    plain = evaluate.score_tokens_dynamic(random_model(block_size=32), ids, segment=8, lr=0.5)
    model = random_model(block_size=32)
    ones = [torch.ones_like(p) for p in model.parameters()]
    rms = evaluate.score_tokens_dynamic(model, ids, segment=8, lr=0.5 * 2, rms=ones)
    assert rms[1] == plain[1] and rms[0] == pytest.approx(plain[0], rel=1e-9)
    model = random_model(block_size=32)
    mixed = [torch.full_like(p, 1.0 if i % 2 else 3.0) for i, p in enumerate(model.parameters())]
    mixed_nll = evaluate.score_tokens_dynamic(model, ids, segment=8, lr=0.5, rms=mixed)[0]
    assert mixed_nll != pytest.approx(plain[0])


def test_rms_normalised_dynamic_evaluation_steps_a_row_never_seen_as_its_table_does(random_model):
    """The rows of the tokens that the train segments never held have rms 0: one segment's step
    moves them by lr * grad / (the table's mean rms), not by an unbounded lr * grad / 0; a tensor
    with rms 0 throughout stays."""
    ids = np.arange(10, 19)  # one segment of 8 targets, tokens 10..18
    plain = random_model(block_size=32)
    before = [p.detach().clone() for p in plain.parameters()]
    evaluate.score_tokens_dynamic(plain, ids, segment=8, lr=0.5)
    sgd_step = [p.detach() - b for p, b in zip(plain.parameters(), before)]
    model = random_model(block_size=32)
    rms = [torch.ones_like(p) for p in model.parameters()]
    table = [p is model.token_emb.weight for p in model.parameters()].index(True)
    rms[table][10:19] = 0.0  # these tokens' rows never moved; the table's mean rms is 88 / 97
    rms[-1] = torch.zeros_like(rms[-1])
    evaluate.score_tokens_dynamic(model, ids, segment=8, lr=0.5, rms=rms)
    step = [p.detach() - b for p, b in zip(model.parameters(), before)]
    assert torch.allclose(step[table][10:19], sgd_step[table][10:19] * 97 / 88)
    assert sgd_step[table][10:19].abs().max() > 0
    assert torch.allclose(step[table][:10], sgd_step[table][:10] / (1 + 88 / 97))
    assert torch.all(step[-1] == 0) and sgd_step[-1].abs().max() > 0


def test_cli_dynamic(tiny_ckpt, run_in_process):
    status, out, err = run_in_process(evaluate, f"--model={tiny_ckpt}", "--split=val", "--dynamic", "--json",
                                      "--dynamic_segment=8", "--dynamic_lr=0.01", "--device=cpu")
    assert status == 0, err
    result = json.loads(out)
    assert result["scoring"] == "dynamic" and result["dynamic_segment"] == 8 and result["perplexity"] > 1
    assert result["dynamic_rms"] == 0
    status, out, err = run_in_process(evaluate, f"--model={tiny_ckpt}", "--split=val", "--dynamic",
                                      "--json", "--dynamic_segment=8", "--dynamic_lr=1e-4",
                                      "--dynamic_rms=4", "--device=cpu")
    assert status == 0, err
    rms = json.loads(out)
    assert rms["dynamic_rms"] == 4 and rms["tokens"] == result["tokens"]
    assert rms["loss"] != result["loss"]
    status, _, err = run_in_process(evaluate, f"--model={tiny_ckpt}", "--dynamic", "--quantize=int8")
    assert status == 2 and "needs float weights" in err
