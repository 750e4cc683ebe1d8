"""Tests for sample.py and generation: KV cache vs none, sampling filters, streaming UTF-8, the command line."""

import copy
import json
import shutil

import pytest
import torch

import generate
import sample
from checkpoint import unknown_word
from cli import UserError
from model import GPT, GPTConfig, sample_next_token
from runtime import load_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    model, tokenizer, _ = load_for_inference(str(tiny_ckpt), device="cpu", dtype="float32")
    return model, tokenizer


# the tests that compare two ways of generating run in both dtypes (bfloat16 emulated where the CPU lacks it)
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module", params=DTYPES)
def loaded_in(request, tiny_ckpt):
    """(model, tokenizer, dtype) in each of DTYPES."""
    model, tokenizer, _ = load_for_inference(str(tiny_ckpt), device="cpu", dtype=request.param)
    return model, tokenizer, request.param


# ----------------------------------------------------------------------------- generation and the KV cache

def test_kv_cache_gives_the_same_tokens_as_no_cache_within_block_size(random_model):
    model = random_model()
    idx = torch.randint(97, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=27)  # 5 + 27 = block_size: the whole run fits the context
    greedy = [model.generate(idx, use_cache=c, temperature=0, **kw) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [model.generate(idx, use_cache=c, temperature=1.0, generator=torch.Generator().manual_seed(5), **kw)
               for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(greedy[0], sampled[0])


@pytest.fixture(params=["whole buffer", "written positions"])
def cache_reads(request, monkeypatch):
    """Both ways attention reads the KV cache: its whole buffer, masked (GPUs and compiled steps: forced here as
    inside torch.compile), and the positions written so far (CPUs). Returns a function that switches to the other."""
    def read(way):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: way == "whole buffer")

    read(request.param)
    return lambda: read("written positions" if request.param == "whole buffer" else "whole buffer")


def test_prefill_and_decode_give_the_logits_of_the_whole_sequence(random_model, cache_reads):
    """Cached decoding, step by step, against one uncached forward pass over the same tokens (float32)."""
    model = random_model(dtype=torch.float32)
    idx = torch.randint(97, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)[0]  # (2, 32, 97): every position's next-token logits
        model.setup_kv_cache(2)
        steps = [model.prefill(idx[:, :5])]
        steps += [model.decode_one_token(idx[:, p:p + 1], torch.tensor([p])) for p in range(5, 32)]
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5)


@pytest.mark.parametrize("variant", [dict(position="rope"), dict(position="rope", qk_norm=True, activation="relu2",
                                                                     tie_embeddings=False, logit_softcap=10.0)])
def test_cached_decoding_of_the_variants(variant, cache_reads):
    """Rotary positions and the other choices keep cached decoding equal to the uncached forward pass."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          **variant)).eval()
    idx = torch.randint(97, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)[0]
        model.setup_kv_cache(2)
        steps = [model.prefill(idx[:, :5])]
        steps += [model.decode_one_token(idx[:, p:p + 1], torch.tensor([p])) for p in range(5, 32)]
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5)
    assert model.generate(idx[:, :4], 60, temperature=0).shape == (2, 64)  # past block_size: rebuilt


def test_both_ways_of_reading_the_cache_generate_the_same_tokens(random_model, cache_reads):
    model = random_model()
    idx = torch.randint(97, (2, 5), generator=torch.Generator().manual_seed(4))
    plain = model.generate(idx, 60, temperature=0, use_cache=False)  # 60 > block_size: two rebuilds
    cached = model.generate(idx, 60, temperature=0)
    assert torch.equal(cached[:, :32], plain[:, :32])
    cache_reads()  # the other way
    assert torch.equal(model.generate(idx, 60, temperature=0), cached)


def test_every_decode_step_hands_attention_the_same_shapes(random_model, monkeypatch):
    model = random_model()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as in a compiled step, or on a GPU
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape, k.shape, v.shape, None if attn_mask is None else attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    list(model.generate_tokens(torch.randint(97, (1, 7)), 20, temperature=0))
    layers = model.config.num_hidden_layers
    prefill, decode = seen[:layers], seen[layers:]
    assert len(decode) == 19 * layers and len(set(decode)) == 1  # 19 one-token steps, one shape
    q, k, v, mask = decode[0]
    assert q == (1, 4, 1, 8) and k == v == (1, 4, 32, 8) and mask == (1, 1, 32)  # the whole buffer, masked
    assert prefill[0][0] == (1, 4, 7, 8) and prefill[0][1] == (1, 4, 32, 8)


def test_generation_past_block_size_keeps_working(random_model):
    model = random_model(block_size=16)
    idx = torch.randint(97, (1, 4), generator=torch.Generator().manual_seed(2))
    cached = model.generate(idx, 60, temperature=0, use_cache=True)  # several cache rebuilds
    plain = model.generate(idx, 60, temperature=0, use_cache=False)
    assert cached.shape == plain.shape == (1, 64)
    assert torch.equal(cached[:, :16], plain[:, :16])  # identical while the context fits
    assert int(cached.min()) >= 0 and int(cached.max()) < 97


def multinomial_sample(logits, temperature, top_k, top_p, generator):
    """How generation sampled before its sampling moved into the decode step: these filters, then
    torch.multinomial (the reference that sample_next_token must match, token for token)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) >= top_p
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sampling_draws_what_torch_multinomial_draws(dtype):
    """A seed gives the tokens torch.multinomial gave it: the noise drawn ahead (as generation
    draws it, outside a compiled step) or inside sample_next_token."""
    logits = (torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    settings = [(1.0, None, None), (0.8, 20, None), (1.2, None, 0.9), (0.7, 50, 0.8)]
    for seed in range(20):
        for filters in settings:
            expected = multinomial_sample(logits, *filters, torch.Generator().manual_seed(seed))
            got = sample_next_token(logits, *filters, torch.Generator().manual_seed(seed))
            seeded = torch.Generator().manual_seed(seed)
            noise = torch.empty(3, 300).exponential_(1, generator=seeded)
            assert torch.equal(got, expected)
            assert torch.equal(sample_next_token(logits, *filters, noise=noise), expected)


SETTINGS = [dict(temperature=0), dict(temperature=0, suppress_ids=[5, 7]),
            dict(temperature=0.9, top_k=20, top_p=0.9, suppress_ids=[3, 4])]


@pytest.mark.parametrize("sampling", SETTINGS, ids=["greedy", "greedy, suppressed", "sampled"])
def test_several_tokens_per_call_give_the_same_tokens(random_model, sampling):
    """Decoding tokens_per_call tokens per call of the decode step, past block_size (rebuilds):
    the tokens of one a call, and within block_size those of decoding without the cache."""
    model = random_model(position="rope")
    idx = torch.randint(97, (2, 5), generator=torch.Generator().manual_seed(1))
    runs = {}
    for per_call, cache, length in [(1, True, 60), (3, True, 60), (1, False, 27), (4, True, 27)]:
        model.tokens_per_call = per_call
        seeded = torch.Generator().manual_seed(5)
        runs[per_call, cache, length] = model.generate(idx, length, use_cache=cache, **sampling,
                                                        generator=seeded)
    assert torch.equal(runs[1, True, 60], runs[3, True, 60])
    assert torch.equal(runs[1, True, 60][:, :32], runs[1, False, 27])
    assert torch.equal(runs[1, False, 27], runs[4, True, 27])
    if "suppress_ids" in sampling:
        assert not set(sampling["suppress_ids"]) & set(runs[1, True, 60][:, 5:].flatten().tolist())


def test_the_compiled_decode_step_samples_as_the_eager_one(random_model, capsys):
    """torch.compile (inductor, on the CPU) of the decode step with sampling inside: the tokens of
    the eager step, seeded, past block_size."""
    from runtime import compile_decoding
    model = random_model(dtype=torch.float32, position="rope", tie_embeddings=False, bias=False)
    sampling = SETTINGS[-1]
    idx = torch.randint(97, (1, 5), generator=torch.Generator().manual_seed(1))
    eager = model.generate(idx, 60, **sampling, generator=torch.Generator().manual_seed(3))
    compile_decoding(model, "cpu", **sampling)
    assert "warning" not in capsys.readouterr().err  # compiled, not fallen back to eager
    compiled = model.generate(idx, 60, **sampling, generator=torch.Generator().manual_seed(3))
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_step_in_cuda_graphs_decodes_as_the_eager_one(random_model):
    """On a GPU: sampling draws torch.multinomial's there too, and the decode step compiled into a
    CUDA graph ("reduce-overhead", sampling inside) gives the eager step's tokens, greedy and
    seeded, several tokens per call or one."""
    from runtime import compile_decoding
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)).cuda() * 3
    for seed in range(20):
        for filters in [(1.0, None, None), (0.8, 20, 0.9)]:
            expected = multinomial_sample(logits, *filters, torch.Generator("cuda").manual_seed(seed))
            got = sample_next_token(logits, *filters, torch.Generator("cuda").manual_seed(seed))
            assert torch.equal(got, expected)
    model = random_model(dtype=torch.float32, position="rope", tie_embeddings=False).cuda()
    idx = torch.randint(97, (1, 5), generator=torch.Generator().manual_seed(1)).cuda()
    for per_call, sampling in [(1, SETTINGS[0]), (1, SETTINGS[-1]), (4, SETTINGS[0])]:
        compiled = copy.deepcopy(model)
        compile_decoding(compiled, "cuda", tokens_per_call=per_call, **sampling)
        runs = [m.generate(idx, 60, **sampling, generator=torch.Generator("cuda").manual_seed(3))
                for m in (model, compiled)]
        assert torch.equal(runs[0], runs[1]), (per_call, sampling)


def test_top_k_and_top_p_never_pick_outside_the_allowed_set():
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 2.5, -2.0]])
    order = logits[0].argsort(descending=True).tolist()  # 3, 6, 0, 1, 2, 5, 4, 7
    probs = logits[0].softmax(-1)[order]
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next_token(logits, 1.5, top_k=3, generator=g)) for _ in range(500)}
    assert picks == set(order[:3])
    # top_p: the smallest set of most likely tokens whose probability reaches top_p
    top_p = float(probs[:3].sum()) - 0.01
    picks = {int(sample_next_token(logits, 1.0, top_p=top_p, generator=g)) for _ in range(500)}
    assert picks == set(order[:3])
    picks = {int(sample_next_token(logits, 1.0, top_k=2, top_p=0.99, generator=g)) for _ in range(300)}
    assert picks == set(order[:2])


def test_temperature_zero_is_greedy_whatever_the_seed(loaded_in):
    model, tokenizer, _ = loaded_in
    texts = {generate.generate_text(model, tokenizer, "the café", max_new_tokens=15, temperature=0, seed=s)
             for s in (1, 2, 3)}
    assert len(texts) == 1
    ids = tokenizer.encode_document("the café")
    greedy = model.generate(torch.tensor([ids]), 15, temperature=0)[0, len(ids):].tolist()
    if tokenizer.eot_id in greedy:
        greedy = greedy[:greedy.index(tokenizer.eot_id)]
    assert texts == {tokenizer.decode(greedy)}


def test_generation_stops_at_end_of_text(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode_document("the")
    first = list(generate.generate_ids(model, ids, 5, temperature=0))[0]
    assert list(generate.generate_ids(model, ids, 5, temperature=0, eot_id=first)) == []


def test_tokens_read_back_a_few_at_a_time_stop_at_end_of_text(loaded):
    """As on a GPU, the ids read back check_every at a time: the same ids, up to end-of-text."""
    model, tokenizer = loaded
    ids = tokenizer.encode_document("the river")
    kw = dict(max_new_tokens=30, temperature=1.0, seed=4)
    alone = list(generate.generate_ids(model, ids, **kw))
    assert list(generate.generate_ids(model, ids, **kw, check_every=8)) == alone
    stop = alone[10]
    for every in (1, 3, 8):
        got = list(generate.generate_ids(model, ids, **kw, eot_id=stop, check_every=every))
        assert got == alone[:alone.index(stop)]


# ----------------------------------------------------------------------------- streaming text

def test_decode_stream_waits_for_whole_characters(loaded):
    _, tokenizer = loaded
    text = "é日🙂"
    byte_ids = [tokenizer.token_ids[bytes([b])] for b in text.encode("utf-8")]  # one byte per token
    pieces = list(generate.decode_stream(tokenizer, byte_ids))
    assert pieces == ["é", "日", "🙂"]
    cut = list(generate.decode_stream(tokenizer, byte_ids[:-1]))  # the emoji's last byte never comes
    assert "".join(cut) == tokenizer.decode(byte_ids[:-1]) == "é日\ufffd"


def test_streamed_pieces_equal_the_final_text_with_multibyte_output(loaded):
    model, tokenizer = loaded
    prompt, split_chars = "naïve 日本", 0
    for seed in range(12):
        kw = dict(max_new_tokens=25, temperature=1.5, top_k=0, seed=seed)
        pieces = list(generate.stream_text(model, tokenizer, prompt, **kw))
        ids = list(generate.generate_ids(model, tokenizer.encode_document(prompt), eot_id=tokenizer.eot_id,
                                         **kw))
        assert "".join(pieces) == tokenizer.decode(ids)  # decoding token by token would show U+FFFD for split bytes
        split_chars += sum(1 for i in ids if tokenizer.decode_bytes([i])[-1:] >= b"\xc0")  # a lead byte ends a token
    assert split_chars > 0, "no seed produced a character split across tokens: the check above proved nothing"


def test_int8_quantized_model_stays_close_to_float32(loaded, tiny_ckpt):
    model, tokenizer = loaded
    q, _, _ = load_for_inference(str(tiny_ckpt), device="cpu", dtype="float32", quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = torch.tensor([tokenizer.encode_document("the river valley was named after a café")])
    with torch.no_grad():
        a, b = model(ids)[0], q(ids)[0]
    assert (a - b).abs().max() < 0.1 * a.std()
    assert len(list(generate.generate_ids(q, ids[0].tolist(), 40, temperature=0))) == 40  # past block_size: a rebuild


# ----------------------------------------------------------------------------- the command line

def test_cli_stdout_holds_only_the_text(loaded_in, tiny_ckpt, run_script):
    model, tokenizer, dtype = loaded_in
    prompt = "the café 日本"
    r = run_script("sample.py", f"--model={tiny_ckpt}", f"--start={prompt}", "--max_new_tokens=20",
                   "--temperature=0.9", "--top_k=50", "--top_p=0.95", "--seed=3", "--device=cpu", f"--dtype={dtype}")
    assert r.returncode == 0, r.stderr
    text = generate.generate_text(model, tokenizer, prompt, max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95,
                                  seed=3)
    expected = prompt + text + ("" if text.endswith("\n") else "\n")
    assert r.stdout == expected
    assert "tokens/s" in r.stderr


def test_cli_prompt_file_several_samples_and_long_prompt(loaded, tiny_ckpt, tmp_path, run_script):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the old bridge " * 20, encoding="utf-8")  # far past block_size=32 tokens
    r = run_script("sample.py", f"--model={tiny_ckpt}", f"--start=FILE:{prompt_file}", "--num_samples=2",
                   "--max_new_tokens=8", "--quantize=int8", "--device=cpu")
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split(sample.SEPARATOR)
    assert len(samples) == 2 and all(s.startswith("the old bridge " * 20) for s in samples)
    assert "warning: the prompt is" in r.stderr and "only its last 32 tokens are used" in r.stderr


def test_cli_errors_are_one_line(tmp_path, run_script):
    r = run_script("sample.py", f"--model={tmp_path / 'nothing'}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: no checkpoint at") and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(UserError, match="cannot read the prompt file /no/such/prompt.txt"):
        sample.read_prompt("FILE:/no/such/prompt.txt")


def test_the_data_s_unknown_word_is_never_sampled(loaded, tiny_ckpt, tmp_path, run_in_process):
    """A folder whose meta.json names an unknown-word marker (the tokenized WikiText-2's <unk>): sample.py never lets
    the model start it, unless --allow_unk=True. Here the marker is a word the model writes often."""
    model, tokenizer = loaded
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    assert unknown_word(folder) is None  # its data names no marker
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "unknown_word": "the"}))
    assert unknown_word(folder) == "the"
    banned = generate.word_starts(tokenizer, "the")
    ids = tokenizer.encode_document("river")
    free = list(generate.generate_ids(model, ids, 300, temperature=1.0, seed=0))
    kept_out = list(generate.generate_ids(model, ids, 300, temperature=1.0, seed=0, suppress_ids=banned))
    assert set(banned) & set(free) and not set(banned) & set(kept_out) and len(kept_out) == 300
    status, out, _ = run_in_process(sample, f"--model={folder}", "--max_new_tokens=20", "--device=cpu")
    assert status == 0 and out.strip()


def test_the_old_out_dir_flag_still_reads_the_model(tiny_ckpt, run_in_process):
    status, out, err = run_in_process(sample, f"--out_dir={tiny_ckpt}", "--max_new_tokens=3", "--device=cpu")
    assert status == 0 and err.startswith(f"notice: --out_dir is now --model; taking it as --model={tiny_ckpt}\n")
