"""Tests for finetune_classifier.py and finetune_instruct.py on tiny models and data: splits, the head, freezing,
LoRA, loss masking, a run that learns, the command lines end to end, and one-line errors."""

import hashlib
import io
import json
import random
import zipfile
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import finetune
import finetune_classifier as fc
import finetune_instruct as fi
from checkpoint import save_checkpoint
from cli import UserError
from lora import add_lora, merge_lora, merged_state_dict
from model import GPT, GPTConfig
from tokenizer import BPETokenizer

HAM_WORDS = "see you at lunch tomorrow ok thanks mum home later love dinner sorry call back going bus".split()
SPAM_WORDS = "win free prize cash claim now urgent txt reply stop award guaranteed mobile offer".split()


def messages(words, n, seed):
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize())
    return sorted(out)


@pytest.fixture(scope="module")
def tokenizer():
    template = fi.format_prompt({"instruction": "", "input": "x"})  # so that prompts take few tokens
    text = " ".join(messages(HAM_WORDS, 200, 1) + messages(SPAM_WORDS, 200, 2) + [template] * 20)
    return BPETokenizer.train(text, vocab_size=500)


def tiny_gpt(vocab_size, seed=0, block_size=64, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, dropout=dropout, bias=False))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    """A folder as train.py leaves it: ckpt.pt and the tokenizer files."""
    folder = tmp_path_factory.mktemp("lm")
    gpt = tiny_gpt(tokenizer.vocab_size)
    save_checkpoint({"model": gpt.state_dict(), "model_config": asdict(gpt.config)}, folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def sms_file(tmp_path_factory):
    """SMS-collection-shaped data: label TAB text, no header, quotes as plain text, spam the rarer label."""
    path = tmp_path_factory.mktemp("data") / "SMSSpamCollection"
    rows = [("ham", t) for t in messages(HAM_WORDS, 90, 3)] + [("spam", t) for t in messages(SPAM_WORDS, 50, 4)]
    rows[0] = ("ham", 'He said "see you" at 5')
    random.Random(0).shuffle(rows)
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- data


def test_balanced_split_sizes_no_overlap_and_seeded():
    examples = [(f"ham {i}", "ham") for i in range(4827)] + [(f"spam {i}", "spam") for i in range(747)]
    (train, val, test), labels = fc.balanced_split(examples, seed=123)
    assert labels == ["ham", "spam"]
    assert (len(train), len(val), len(test)) == (1044, 148, 302)  # 747 per label: 522 / 74 / 151
    for split, n in ((train, 522), (val, 74), (test, 151)):
        assert sum(label == 1 for _, label in split) == n and sum(label == 0 for _, label in split) == n
    texts = [{text for text, _ in split} for split in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert fc.balanced_split(examples, seed=123)[0][2] == test
    assert fc.balanced_split(examples, seed=7)[0][2] != test
    unbalanced, _ = fc.balanced_split(examples, seed=123, balance=False)
    assert sum(map(len, unbalanced)) == len(examples)


def test_read_labelled_tsv_and_csv(tmp_path, sms_file):
    rows = fc.read_labelled(sms_file)
    assert len(rows) == 140 and {label for _, label in rows} == {"ham", "spam"}
    assert ('He said "see you" at 5', "ham") in rows  # quotes in a TSV are text
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('id,text,sentiment\n1,"good, really good",pos\n2,bad,neg\n', encoding="utf-8")
    assert fc.read_labelled(csv_path, label_column="sentiment") == [("good, really good", "pos"), ("bad", "neg")]
    with pytest.raises(UserError, match="column"):
        fc.read_labelled(csv_path, label_column="stars")
    (tmp_path / "short.tsv").write_text("ham\tfine\nspam\n", encoding="utf-8")
    with pytest.raises(UserError, match="short.tsv:2"):
        fc.read_labelled(tmp_path / "short.tsv")


def test_sms_download_checks_the_member(tmp_path, monkeypatch, http_server):
    member = b"ham\tok\nspam\twin\n"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SMSSpamCollection", member)
        z.writestr("readme", b"about")
    http_server.files["/sms.zip"] = archive.getvalue()
    monkeypatch.setattr(fc, "SMS_URL", f"{http_server.url}/sms.zip")
    monkeypatch.setattr(fc, "SMS_SHA256", hashlib.sha256(member).hexdigest())
    assert fc.download_sms_spam(tmp_path).read_bytes() == member
    monkeypatch.setattr(fc, "SMS_SHA256", "0" * 64)  # the server's file is not the published one
    with pytest.raises(UserError, match="sha256"):
        fc.download_sms_spam(tmp_path / "other")
    assert len(http_server.log) == 3  # the first download, then two tries of the bad one

# ----------------------------------------------------------------------------- the classifier model


def test_head_reads_the_last_real_token():
    model = finetune.GPTClassifier(tiny_gpt(300), ["ham", "spam"], max_length=64).eval()
    short, long = [5, 17, 42], [7, 8, 9, 10, 11, 12, 13]
    alone = model(torch.tensor([short]), torch.tensor([3]))
    for pad in (0, 299):
        ids, lengths = finetune.pad_batch([short, long], pad)
        assert torch.allclose(model(ids, lengths)[0], alone[0], atol=1e-5)
    changed_last = model(torch.tensor([[5, 17, 43]]), torch.tensor([3]))
    assert not torch.allclose(changed_last, alone, atol=1e-3)


@pytest.mark.parametrize("mode", fc.TRAINABLE)
def test_trainable_freezes_what_it_says(mode):
    torch.manual_seed(0)
    gpt = tiny_gpt(300)
    model = finetune.GPTClassifier(gpt, ["a", "b"], max_length=64)
    finetune.set_trainable(gpt, mode, lora_rank=2, lora_alpha=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("head.") or mode == "all"
                or (mode == "last_block" and n.startswith(("gpt.blocks.1.", "gpt.ln_f.")))
                or (mode == "lora" and "lora_" in n)}
    assert names == expected and any(n.startswith("head.") for n in names)
    if mode == "lora":
        assert len([n for n in names if "lora_" in n]) == 2 * 4 * 2  # A and B, 4 projections, 2 blocks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = (torch.randint(0, 300, (4, 10)), torch.tensor([10, 7, 3, 10]), torch.tensor([0, 1, 0, 1]))
    loss_fn = lambda m, b: (F.cross_entropy(m(b[0], b[1]), b[2]), 0, 4)  # noqa: E731
    optimizer = GPT.configure_optimizer(model, 0.1, 1e-2, (0.9, 0.999), "cpu")
    finetune.run_epoch(model, [batch, batch], loss_fn, optimizer)  # two steps: LoRA's A has a gradient from the second
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n


def test_lora_merged_equals_unmerged():
    gpt = tiny_gpt(300, seed=1)
    add_lora(gpt, rank=4, alpha=8)
    for name, p in gpt.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # as after training: B is no longer zero
    idx = torch.randint(0, 300, (2, 12))
    gpt.eval()
    unmerged = gpt(idx)[0]
    plain = tiny_gpt(300, seed=2).eval()
    plain.load_state_dict(merged_state_dict(gpt))  # what a checkpoint holds
    assert torch.allclose(plain(idx)[0], unmerged, atol=1e-5)
    merge_lora(gpt)
    assert not any("lora" in n for n, _ in gpt.named_parameters())
    assert torch.allclose(gpt(idx)[0], unmerged, atol=1e-5)


def test_classify_and_load_classifier(tmp_path, tokenizer):
    model = finetune.GPTClassifier(tiny_gpt(tokenizer.vocab_size), ["ham", "spam"], max_length=16)
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.gpt.config),
                     "labels": model.labels, "max_length": 16}, tmp_path)
    tokenizer.save(tmp_path)
    loaded, tok = finetune.load_classifier(tmp_path)
    results = finetune.classify(loaded, tok, ["win cash now", "see you at lunch " * 20, ""])
    assert [label for label, _ in results] == [label for label, _ in finetune.classify(model, tokenizer, [
        "win cash now", "see you at lunch " * 20, ""])]
    assert all(label in ("ham", "spam") and 0.5 <= p <= 1 for label, p in results)

# ----------------------------------------------------------------------------- instruction data


def test_loss_masking_ignores_exactly_the_masked_positions(tokenizer):
    records = [{"instruction": "see you", "input": "", "output": "ok thanks"},
               {"instruction": "win", "input": "free prize cash", "output": "stop"}]
    items = [fi.encode_record(tokenizer, r, max_length=60) for r in records]
    inputs, targets = fi.make_batch(items, pad_id=0)
    for row, (ids, prompt_length) in enumerate(items):
        response = tokenizer.encode(records[row]["output"]) + [tokenizer.eot_id]
        assert ids == tokenizer.encode(fi.format_prompt(records[row])) + response
        graded = (targets[row] != -100).nonzero().flatten().tolist()
        # graded: exactly the positions whose next token is a response token (end-of-text included)
        assert graded == list(range(prompt_length - 1, len(ids) - 1))
        assert targets[row, graded].tolist() == response
    assert (fi.make_batch(items, 0, mask_prompt=False)[1] != -100).sum() == sum(len(ids) - 1 for ids, _ in items)
    gpt = tiny_gpt(tokenizer.vocab_size).eval()
    logits, loss = gpt(inputs, targets)
    keep = targets != -100
    assert torch.allclose(loss, F.cross_entropy(logits[keep], targets[keep]))
    assert "### Input:" in fi.format_prompt(records[1]) and "### Input:" not in fi.format_prompt(records[0])


def test_a_tiny_run_improves_val_loss(tokenizer):
    rng = random.Random(0)
    records = [{"instruction": f"reply to {w}", "input": "", "output": f"{w} {w} ok"}
               for w in rng.choices(HAM_WORDS, k=60)]
    train, val, _ = fi.split_records(records, seed=1)
    encode = lambda rs: [fi.encode_record(tokenizer, r, 63) for r in rs]  # noqa: E731
    collate = lambda items: fi.make_batch(items, tokenizer.eot_id)  # noqa: E731
    gpt = tiny_gpt(tokenizer.vocab_size, dropout=0.0)
    val_batches = [collate(encode(val))]
    before = finetune.run_epoch(gpt, val_batches, fi.lm_loss)["loss"]
    config = SimpleNamespace(weight_decay=0.0, learning_rate=3e-3, seed=0, batch_size=8, num_epochs=3, grad_clip=1.0,
                          dtype="auto")
    saved = []
    rows = finetune.fit(gpt, config, encode(train), encode(val), collate, fi.lm_loss, lambda v: -v["loss"],
                  lambda epoch, row: saved.append(epoch))
    assert rows[-1]["val_loss"] < before - 1.0
    assert saved[0] == 1 and saved == sorted(saved)

# ----------------------------------------------------------------------------- command lines


def test_classifier_cli_end_to_end(tmp_path, lm_dir, sms_file, run_in_process):
    out = tmp_path / "out"
    status, stdout, stderr = run_in_process(fc, f"--model={lm_dir}", f"--data={sms_file}", f"--out_dir={out}",
                                     "--num_epochs=2", "--learning_rate=2e-3", "--trainable=lora", "--device=cpu")
    assert status == 0, stderr
    assert "epoch 2/2" in stdout and "test accuracy" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == {"train": 70, "val": 10, "test": 20} and len(results["epochs"]) == 2
    assert {"ckpt.pt", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    status, stdout, stderr = run_in_process(fc, f"--model={out}", "--classify=win free cash now")
    assert status == 0, stderr
    label, probability = stdout.split()
    assert label in ("ham", "spam") and probability.startswith("(") and probability.endswith("%)")


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    records = [{"instruction": f"reply to {w}", "input": w if i % 2 else "", "output": f"{w} ok"}
               for i, w in enumerate(HAM_WORDS * 2)]
    path = tmp_path_factory.mktemp("data") / "records.json"
    path.write_text(json.dumps(records))
    return path


def test_instruct_cli_end_to_end(tmp_path, lm_dir, records_file, run_in_process):
    out = tmp_path / "out"
    status, stdout, stderr = run_in_process(fi, f"--model={lm_dir}", f"--data={records_file}", f"--out_dir={out}",
                                     "--num_epochs=1", "--max_new_tokens=4", "--device=cpu")
    assert status == 0, stderr
    assert "perplexity" in stdout and "answering the 5 test instructions" in stdout
    answers = json.loads((out / "test_responses.json").read_text())
    test_records = fi.split_records(json.loads(records_file.read_text()), seed=123)[2]
    assert [a["instruction"] for a in answers] == [r["instruction"] for r in test_records]
    assert all(isinstance(a["model_response"], str) for a in answers)
    assert json.loads((out / "results.json").read_text())["test_response_perplexity"] > 1
    status, stdout, stderr = run_in_process(fi, f"--out_dir={out}", "--prompt=reply to mum", "--max_new_tokens=3")
    assert status == 0, stderr


def test_instruct_answers_the_test_split_only_when_asked(tmp_path, lm_dir, records_file, run_in_process):
    out = tmp_path / "out"
    status, stdout, stderr = run_in_process(fi, f"--model={lm_dir}", f"--data={records_file}", f"--out_dir={out}",
                                            "--num_epochs=1", "--answer_test=False", "--device=cpu")
    assert status == 0, stderr
    assert "answering" not in stdout and not (out / "test_responses.json").exists()
    assert json.loads((out / "results.json").read_text())["test_response_perplexity"] > 1


@pytest.mark.parametrize("module,args", [
    (fc, ["--data=no/such/file.tsv"]),
    (fi, ["--data=no/such/file.json"]),
    (fc, ["--model=no/such/checkpoint"]),
    (fc, ["--model=no/such/out", "--classify=hello"]),
    (fi, ["--trainable=head"]),
    (fc, ["--max_length=65"]),
])
def test_errors_are_one_line(module, args, lm_dir, sms_file, records_file, run_in_process):
    data = sms_file if module is fc else records_file
    status, _, stderr = run_in_process(module, f"--model={lm_dir}", f"--data={data}", *args)
    assert status == 2
    assert stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1


def test_missing_data_from_the_shell_is_one_line(run_script):
    r = run_script("finetune_classifier.py", "--data=no/such/file.tsv", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --data=no/such/file.tsv: no such file")
    assert "Traceback" not in r.stderr
