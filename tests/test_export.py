"""export.py and tokenizer.json: a trained model exported as a Hugging Face GPT-2 folder loads in `transformers`
(same logits) and `AutoTokenizer` (same ids), offline; HF `tokenizers` reads the tokenizer.json prepare.py writes;
the folder's model card parses with huggingface_hub and says what was measured on these weights, and what not."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import export
import generate
from checkpoint import load_model, save_checkpoint
from data import load_tokenizer
from gpt2 import load_gpt2
from model import GPT, GPTConfig

# ASCII, accents, CJK, emoji, whitespace, the special token, nothing
TEXTS = ["The river valley was named after a café owner in 1887 .", "naïve crème brûlée , 日本 の 東京 🙂 🇫🇷",
         "  spaces   and\ttabs\n\nnew lines ", "one<|endoftext|>two", ""]


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    export.export(tiny_ckpt, folder)
    return folder


def test_transformers_loads_the_export_with_the_same_logits(tiny_ckpt, exported, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, tokenizer, _ = load_model(tiny_ckpt)
    assert not ours.config.bias  # trained without biases: exported as zeros
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(ours.config.vocab_size, (2, ours.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, ours(idx)[0], atol=1e-4)
    back, _ = load_gpt2(exported)  # and back into our GPT
    with torch.no_grad():
        assert torch.allclose(back(idx)[0], ours(idx)[0], atol=1e-5)


def test_the_weights_are_as_readable_as_the_other_files(exported):
    mode = lambda name: (exported / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json") == mode("README.md")


def test_auto_tokenizer_gives_our_ids(tiny_ckpt, exported, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = load_tokenizer(tiny_ckpt)
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    assert theirs.eos_token == theirs.bos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eot_id
    for text in TEXTS:
        ids = ours.encode(text, allowed_special="all")  # HF reads a special token's text as the token
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids, skip_special_tokens=True) == text.replace("<|endoftext|>", "")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 32 and config["tie_word_embeddings"]


def test_prepare_writes_a_tokenizer_json_that_hf_tokenizers_reads(tiny_data):
    tokenizers = pytest.importorskip("tokenizers")
    ours = load_tokenizer(tiny_data)
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert "tokenizer.json" in meta["tokenizer"]["files"]
    theirs = tokenizers.Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text, allowed_special="all")
        assert theirs.encode(text).ids == ids
        assert theirs.decode(ids, skip_special_tokens=True) == text.replace("<|endoftext|>", "")


@pytest.mark.parametrize("args, message", [(["--model=X"], "--to=DIR"), (["--model=X", "--to=X"], "another folder"),
                                           (["--model=/no/such/ckpt", "--to=Y"], "no checkpoint")])
def test_export_errors_are_one_line(args, message, run_in_process):
    status, out, err = run_in_process(export, *args)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_classifier_is_refused(tiny_classifier, tmp_path, run_in_process):
    status, _, err = run_in_process(export, f"--model={tiny_classifier}", f"--to={tmp_path / 'hf'}")
    assert status == 2 and "classifier" in err


def test_a_model_beyond_gpt2_is_refused(tiny_ckpt, tmp_path, run_in_process):
    saved = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    config = saved["model_config"] | {"position": "rope", "activation": "relu2"}
    folder = tmp_path / "rope"
    save_checkpoint({"model": GPT(GPTConfig(**config)).state_dict(), "model_config": config}, folder)
    load_tokenizer(tiny_ckpt).save(folder)
    status, _, err = run_in_process(export, f"--model={folder}", f"--to={tmp_path / 'hf'}")
    assert status == 2 and "neither GPT-2 nor GPT-NeoX computes activation=relu2" in err, err
    assert not (tmp_path / "hf").exists()


def recipe_model(recipe, tiny_ckpt, folder, **change):
    """A small model with the architecture a shipped config trains (its position, output layer, activation ...),
    every weight random (biases and LayerNorm gains too, so that a misplaced tensor shows), saved with the tiny
    tokenizer in folder."""
    from cli import read_config_file
    settings = read_config_file(f"config/{recipe}.py")
    arch = {k: settings[k] for k in ("position", "tie_embeddings", "activation", "qk_norm", "logit_softcap", "bias")
            if k in settings}
    config = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)["model_config"] | {"bias": True} | arch | change
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint({"model": model.state_dict(), "model_config": config}, folder)
    load_tokenizer(tiny_ckpt).save(folder)
    return model.eval()


@pytest.mark.parametrize("recipe, change", [("wikitext_small", {}), ("wikitext_tiny", {}),
                                            ("wikitext_small", {"tie_embeddings": True, "bias": False})])
def test_rotary_recipes_export_as_gpt_neox(recipe, change, tiny_ckpt, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = recipe_model(recipe, tiny_ckpt, tmp_path / "ckpt", **change)
    assert ours.config.position == "rope"
    export.export(tmp_path / "ckpt", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "GPTNeoXForCausalLM"
    assert theirs.config.tie_word_embeddings == ours.config.tie_embeddings
    idx = torch.randint(ours.config.vocab_size, (2, ours.config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, ours(idx)[0], atol=1e-4)
        prompt = idx[:1, :5]
        greedy = theirs.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, min_new_tokens=20)
        mine = [t.item() for t in ours.generate_tokens(prompt, 20, temperature=0.0)]
    assert greedy[0, 5:].tolist() == mine
    back, tok = load_gpt2(tmp_path / "hf")  # the folder loads back into our GPT
    with torch.no_grad():
        assert torch.allclose(back(idx)[0], ours(idx)[0], atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text, allowed_special="all")



@pytest.mark.parametrize("recipe, gguf_type", [("wikitext_small", "f32"), ("wikitext_small", "q8_0"),
                                               ("wikitext_tiny", "f16")])
def test_gguf_holds_the_weights_and_the_tokenizer(recipe, gguf_type, tiny_ckpt, tmp_path, run_in_process):
    gguf = pytest.importorskip("gguf")
    ours = recipe_model(recipe, tiny_ckpt, tmp_path / "ckpt")
    status, out, err = run_in_process(export, f"--model={tmp_path / 'ckpt'}", f"--to={tmp_path / 'm.gguf'}",
                                      f"--gguf_type={gguf_type}")
    assert status == 0, err
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    c = ours.config
    assert field("general.architecture") == "gptneox"
    assert field("gptneox.rope.dimension_count") == c.hidden_size // c.num_attention_heads
    assert field("gptneox.use_parallel_residual") is False and field("gptneox.block_count") == c.num_hidden_layers
    tok = load_tokenizer(tiny_ckpt)
    vocab, merges = tok._vocab_and_merges()
    assert field("tokenizer.ggml.tokens") == list(vocab) and field("tokenizer.ggml.merges") == merges
    assert field("tokenizer.ggml.eos_token_id") == tok.eot_id and field("tokenizer.ggml.pre") == "gpt-2"
    tensors = {t.name: t for t in reader.tensors}
    state = ours.state_dict()
    for ours_name, theirs in [("blocks.1.attn.qkv_proj.weight", "blk.1.attn_qkv.weight"),
                              ("lm_head.weight", "output.weight"), ("blocks.0.ln_2.bias", "blk.0.ffn_norm.bias")]:
        t = tensors[theirs]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(state[ours_name].shape)
        tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2}[gguf_type] if data.ndim == 2 else 0
        assert abs(data - state[ours_name].numpy()).max() <= tolerance, (theirs, gguf_type)


# ----------------------------------------------------------------------------- the model card

CROWS_CSV = """"",sent_more,sent_less,stereo_antistereo,bias_type
0,The old man walked to the river.,The young man walked to the river.,stereo,age
1,"She sold the farm, they said.","He sold the farm, they said.",stereo,gender
2,The café owner was rich.,The café owner was poor.,antistereo,socioeconomic
"""


def model_card(folder):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    return huggingface_hub.ModelCard.load(folder / "README.md")


@pytest.fixture
def model_copy(tiny_ckpt, tmp_path):
    """tiny_ckpt's folder, without the scores other tests' evaluations recorded in it."""
    folder = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    (folder / "audit.json").unlink(missing_ok=True)
    return folder


def test_the_model_card_says_what_was_measured_and_what_was_not(model_copy, tmp_path,
                                                                 run_in_process):
    status, out, err = run_in_process(export, f"--model={model_copy}", f"--to={tmp_path / 'hf'}")
    assert status == 0 and "README.md" in out, err
    card = model_card(tmp_path / "hf")
    step = torch.load(model_copy / "ckpt.pt", weights_only=True)["iter_num"]
    log = [json.loads(line) for line in (model_copy / "log.jsonl").read_text().splitlines()]
    val_loss = next(row["val_loss"] for row in log if row["iter"] == step and "val_loss" in row)
    # the perplexity that training measured on the val split, for these weights
    [result] = card.data.eval_results
    assert result.metric_type == "perplexity" and result.dataset_split == "validation"
    assert result.metric_value == pytest.approx(math.exp(val_loss), abs=1e-3)
    assert card.data.license is None and card.data.library_name == "transformers"
    text = card.text
    for heading in ("Model details", "Training data", "Evaluation", "Bias", "Risks and limitations",
                    "Intended use"):
        assert f"\n## {heading}\n" in text
    assert text.count("Not measured: run `python audit.py") == 2  # bias and memorisation
    assert "Test perplexity, bits per byte and word perplexity: not measured" in text
    model, _, _ = load_model(model_copy)
    assert f"Parameters: {model.num_params(non_embedding=False):,}" in text
    for split, s in json.loads((model_copy / "meta.json").read_text())["splits"].items():
        assert f"| {split} | {s['documents']:,} | {s['tokens']:,} | {s['bytes']:,} |" in text
    assert "Personal data and secrets: not scrubbed" in text and "Duplicates: not removed" in text


def test_the_model_card_carries_the_audit_of_these_weights_only(model_copy, tmp_path,
                                                                run_in_process):
    import audit
    (tmp_path / "pairs.csv").write_text(CROWS_CSV, encoding="utf-8")
    status, out, err = run_in_process(audit, f"--model={model_copy}", "--task=crows_pairs",
                                      f"--source={tmp_path / 'pairs.csv'}", "--check_sha256=False",
                                      "--device=cpu", "--json")
    assert status == 0, err
    crows = json.loads(out)
    status, out, err = run_in_process(audit, f"--model={model_copy}", "--samples=20",
                                      "--prefix_tokens=8", "--suffix_tokens=8", "--device=cpu",
                                      "--json")
    assert status == 0, err
    train, val = json.loads(out)["splits"].values()
    hf = tmp_path / "hf"
    status, _, err = run_in_process(export, f"--model={model_copy}", f"--to={hf}",
                                    "--license=apache-2.0", "--language=en,fr",
                                    "--datasets=someone/corpus")
    assert status == 0, err
    card = model_card(hf)
    assert card.data.license == "apache-2.0" and card.data.language == ["en", "fr"]
    assert card.data.datasets == ["someone/corpus"]
    bias = next(r for r in card.data.eval_results if r.metric_type == "pct_stereotype")
    assert bias.metric_value == pytest.approx(crows["pct_stereotype"], abs=1e-4)
    assert bias.dataset_type == "nyu-mll/crows_pairs"
    text = card.text
    assert "Not measured" not in text
    for name, row in crows["by_bias_type"].items():
        assert f"| {name} | {row['pairs']} | {100 * row['pct_stereotype']:.1f}% |" in text
    assert (f"for {100 * train['extractable']:.2f}% of {train['windows']} training windows, and "
            f"for {100 * val['extractable']:.2f}% of {val['windows']} validation") in text

    # new weights in the folder: what was measured on the old ones is left out, and says so
    saved = torch.load(model_copy / "ckpt.pt", weights_only=True)
    saved["model"]["ln_f.weight"] += 1
    torch.save(saved, model_copy / "ckpt.pt")
    status, _, err = run_in_process(export, f"--model={model_copy}", f"--to={hf}",
                                    "--overwrite=True")
    assert status == 0, err
    text = model_card(hf).text
    assert "measured on other weights than these" in text and text.count("Not measured: run") == 2


@pytest.mark.parametrize("arg", ["--license=Apache 2.0", "--language=English", "--datasets=a b"])
def test_card_settings_the_hub_would_not_read_are_one_line(arg, tiny_ckpt, tmp_path,
                                                          run_in_process):
    status, _, err = run_in_process(export, f"--model={tiny_ckpt}", f"--to={tmp_path / 'hf'}", arg)
    assert status == 2 and arg.split("=")[0] in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_the_card_shows_what_prepare_did_to_the_text():
    """Whatever meta.json records under a key that names scrubbing or deduplication is shown, in
    words; without such keys the card says the text was neither scrubbed nor deduplicated."""
    meta = {"dataset": "corpus", "vocab_size": 8192, "tokenizer": {"kind": "bpe"},
            "splits": {"train": {"documents": 1001, "tokens": 20000, "bytes": 90000}},
            "scrub_pii": {"EMAIL": 3, "PHONE": 1},
            "dedup": {"mode": "exact", "documents": 1100, "kept": 1001, "removed_exact": 99}}
    text = export.data_section(meta)
    assert "- Personal data and secrets: scrub_pii: EMAIL 3, PHONE 1." in text
    assert "- Duplicates: dedup: mode exact, documents 1,100, kept 1,001, removed_exact 99." in text
    assert "| train | 1,001 | 20,000 | 90,000 |" in text and "8,192 ids (bpe)" in text
    plain = export.data_section({key: meta[key] for key in ("dataset", "vocab_size", "splits")})
    assert "not scrubbed" in plain and "not removed" in plain
    assert "Not recorded" in export.data_section(None)


def test_the_export_never_starts_the_data_s_unknown_word(model_copy, tmp_path, monkeypatch):
    """transformers' generate() keeps the marker for rare words out, as sample.py and serve.py do:
    the export's generation_config.json suppresses the tokens that start it."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export.export(model_copy, tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()
    meta = json.loads((model_copy / "meta.json").read_text())
    (model_copy / "meta.json").write_text(json.dumps({**meta, "unknown_word": "the"}))
    export.export(model_copy, tmp_path / "hf")
    tokenizer = load_tokenizer(model_copy)
    banned = generate.word_starts(tokenizer, "the")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").suppress_tokens == banned
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode_document("river")])
    kept_out = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.size(1):].tolist()
    free = model.generate(ids, max_new_tokens=20, do_sample=False, suppress_tokens=None)[0, ids.size(1):].tolist()
    assert set(banned) & set(free) and not set(banned) & set(kept_out)


def test_the_model_card_reports_the_test_scores_evaluate_py_recorded(model_copy, tiny_data,
                                                                     tmp_path, run_in_process):
    """evaluate.py records a whole split's score beside the weights (audit.json); the card reports
    the test split's, static and dynamic, in its text and its model-index, and leaves out a
    score of a split's first tokens only (not a figure for the card)."""
    import evaluate
    scores = {}
    for scoring in ([], ["--dynamic", "--dynamic_segment=16"]):
        status, out, err = run_in_process(evaluate, f"--model={model_copy}", f"--data_dir={tiny_data}",
                                          "--split=test", "--device=cpu", "--dtype=float32",
                                          "--json", *scoring)
        assert status == 0 and "recorded in" in err, err
        scores[bool(scoring)] = json.loads(out)
    status, _, err = run_in_process(evaluate, f"--model={model_copy}", f"--data_dir={tiny_data}",
                                    "--split=val", "--max_tokens=50", "--device=cpu")
    assert status == 0 and "recorded in" not in err, err
    recorded = json.loads((model_copy / "audit.json").read_text())
    assert set(recorded) == {"evaluate_test", "evaluate_test_dynamic"}
    status, _, err = run_in_process(export, f"--model={model_copy}", f"--to={tmp_path / 'hf'}")
    assert status == 0, err
    card = model_card(tmp_path / "hf")
    tests = [r for r in card.data.eval_results if r.dataset_split == "test"]
    assert [r.metric_value for r in tests] == [round(scores[False]["word_perplexity"], 4),
                                               round(scores[True]["word_perplexity"], 4)]
    assert scores[True]["word_perplexity"] != scores[False]["word_perplexity"]
    for score in scores.values():
        assert f"word perplexity {score['word_perplexity']:,.3f} ({score['words']:,} words)" in card.text
    assert "Test perplexity, bits per byte and word perplexity: not measured" not in card.text
