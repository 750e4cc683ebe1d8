"""Tests for GPT-2 weights in Hugging Face's format: a tiny random GPT-2 built with `transformers` must give the same
logits in our GPT; the download path runs against a local HTTP server standing in for the Hub."""

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune
import finetune_classifier as fc
import finetune_instruct as fi
import gpt2
from cli import UserError
from tokenizer import BPETokenizer

WORDS = "the cat sat on a mat and saw free cash prize call now see you at lunch".split()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A folder as save_pretrained leaves it (config.json, model.safetensors) plus a tokenizer; inputs; HF logits."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    template = fi.format_prompt({"instruction": "", "input": "x"})
    tokenizer = BPETokenizer.train(" ".join(WORDS * 20 + [template] * 20), vocab_size=400)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=tokenizer.vocab_size, n_positions=64)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in gpt2.parameters():  # biases and LayerNorms start at 0 and 1: randomise them, so a slip shows
            p.normal_(0.0, 0.2)
    gpt2.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(folder)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        logits = gpt2(idx).logits
    return SimpleNamespace(folder=folder, idx=idx, logits=logits, tokenizer=tokenizer)


def our_logits(gpt, idx):
    with torch.no_grad():
        return gpt(idx)[0]


def test_loading_matches_transformers(hf):
    gpt, tokenizer = gpt2.load_gpt2(hf.folder)
    assert gpt.config.block_size == 64 and gpt.config.bias and not gpt.training
    assert torch.allclose(our_logits(gpt, hf.idx), hf.logits, atol=1e-4)
    assert tokenizer.encode("free cash") == hf.tokenizer.encode("free cash")


def test_original_file_layout_loads_too(hf, tmp_path):
    """OpenAI's converted files name tensors without 'transformer.' and keep the causal-mask buffers."""
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf.folder / "model.safetensors").items()}
    tensors.pop("lm_head.weight", None)
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((hf.folder / "config.json").read_bytes())
    gpt, _ = gpt2.load_gpt2(tmp_path, tokenizer_dir=hf.folder)
    assert torch.allclose(our_logits(gpt, hf.idx), hf.logits, atol=1e-4)


def test_bad_folders_are_user_errors(hf, tmp_path):
    with pytest.raises(UserError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        gpt2.load_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "config.json").write_bytes((hf.folder / "config.json").read_bytes())
    with pytest.raises(UserError, match="delete it"):
        gpt2.load_gpt2(tmp_path, tokenizer_dir=hf.folder)
    config = json.loads((hf.folder / "config.json").read_text()) | {"n_embd": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((hf.folder / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="does not match config.json"):
        gpt2.load_gpt2(tmp_path, tokenizer_dir=hf.folder)
    with pytest.raises(UserError, match="unknown model"):
        gpt2.load_gpt2("gpt3", cache_dir=tmp_path)


@pytest.fixture
def hub(hf, monkeypatch, http_server):
    """The Hub on 127.0.0.1: /gpt2/... redirects to /openai-community/gpt2/..., which serves the tiny model's files
    and, for a large file, its sha256 in X-Linked-Etag (HEAD answers it before any download)."""
    for name in gpt2.GPT2_FILES:
        data = (hf.folder / name).read_bytes()
        http_server.files[f"/openai-community/gpt2/resolve/main/{name}"] = data
        if name.endswith(".safetensors"):
            http_server.headers[f"/openai-community/gpt2/resolve/main/{name}"] = {
                "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"'}
    http_server.redirects["/gpt2/"] = "/openai-community/gpt2/"
    monkeypatch.setattr(gpt2, "HF_URL", f"{http_server.url}/{{name}}/resolve/main/{{file}}")
    monkeypatch.setattr(gpt2, "TOKENIZER_SHA256", {name: hashlib.sha256((hf.folder / name).read_bytes()).hexdigest()
                                                   for name in ("vocab.json", "merges.txt")})
    # the names of the files the Hub served (redirects left out), in order
    return SimpleNamespace(gets=lambda: [path.rsplit("/", 1)[-1] for path, _ in http_server.log
                                         if path.startswith("/openai-community/")])


def test_download_cache_and_refetch_of_a_corrupt_file(hf, hub, tmp_path):
    gpt, _ = gpt2.load_gpt2("gpt2", cache_dir=tmp_path)
    assert sorted(hub.gets()) == sorted(gpt2.GPT2_FILES)
    assert torch.allclose(our_logits(gpt, hf.idx), hf.logits, atol=1e-4)
    gpt2.load_gpt2("gpt2", cache_dir=tmp_path)
    assert len(hub.gets()) == 4  # cached: nothing fetched again
    weights = tmp_path / "gpt2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: only the checksum can tell
    weights.write_bytes(bytes(data))
    gpt, _ = gpt2.load_gpt2("gpt2", cache_dir=tmp_path)
    assert hub.gets()[4:] == ["model.safetensors"]
    assert torch.allclose(our_logits(gpt, hf.idx), hf.logits, atol=1e-4)


def test_cached_copy_works_offline(hf, tmp_path, monkeypatch):
    (tmp_path / "gpt2").mkdir()
    for name in gpt2.GPT2_FILES:
        (tmp_path / "gpt2" / name).write_bytes((hf.folder / name).read_bytes())
    monkeypatch.setattr(gpt2, "HF_URL", "http://127.0.0.1:9/{name}/resolve/main/{file}")  # nothing listens there
    monkeypatch.setattr(gpt2, "TOKENIZER_SHA256", {})
    gpt, _ = gpt2.load_gpt2("gpt2", cache_dir=tmp_path)
    assert torch.allclose(our_logits(gpt, hf.idx), hf.logits, atol=1e-4)
    with pytest.raises(UserError, match="could not download"):
        gpt2.load_gpt2("gpt2-medium", cache_dir=tmp_path)


def test_classifier_fine_tunes_from_a_gpt2_folder(hf, tmp_path, run_in_process):
    rows = [f"ham\t{' '.join(WORDS[i:i + 5])} {i}" for i in range(12)] + \
           [f"spam\tfree cash prize call now {i}" for i in range(12)]
    (tmp_path / "data.tsv").write_text("\n".join(rows) + "\n")
    status, out, err = run_in_process(fc, f"--model={hf.folder}", f"--data={tmp_path / 'data.tsv'}",
                                      f"--out_dir={tmp_path / 'out'}", "--trainable=last_block", "--num_epochs=1")
    assert status == 0, err
    assert "test accuracy" in out
    classifier, tokenizer = finetune.load_classifier(tmp_path / "out")
    assert classifier.gpt.config.bias and classifier.labels == ["ham", "spam"]
    assert len(finetune.classify(classifier, tokenizer, ["free cash", "the cat"])) == 2


def test_instruct_fine_tunes_from_a_gpt2_folder(hf, tmp_path, run_in_process):
    records = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"} for w in WORDS * 2]
    (tmp_path / "records.json").write_text(json.dumps(records))
    status, out, err = run_in_process(fi, f"--model={hf.folder}", f"--data={tmp_path / 'records.json'}",
                                      f"--out_dir={tmp_path / 'out'}", "--trainable=lora", "--num_epochs=1",
                                      "--max_new_tokens=3")
    assert status == 0, err
    assert "perplexity" in out
    answers = json.loads((tmp_path / "out" / "test_responses.json").read_text())
    assert len(answers) == len(fi.split_records(records, seed=123)[2])
