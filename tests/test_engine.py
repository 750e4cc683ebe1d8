"""engine.py: continuous batching. Sequences decoded together give the tokens each gives alone (and model.generate
gives), past block_size too; seeds fix samples whatever the batch; rows are freed by finishing or leaving. Each test
runs in float32 and in bfloat16 (emulated where the CPU lacks it)."""

import contextlib
import threading

import pytest
import torch

from engine import FOLLOWERS_AFTER, BatchEngine
from generate import generate_ids


# a dtype the engine decodes in, and how close a row's logits are to those of its sequence alone
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(params=list(DTYPES), ids=str)
def model(request, random_model):
    return random_model(dtype=request.param)


def prompts(n=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(97, (length,), generator=g).tolist() for length in (3, 7, 1, 12, 5, 9, 2, 30)][:n]


@contextlib.contextmanager
def in_line(engine):
    """Within the block the engine runs no prompt (the first it takes waits), so what the test
    submits there waits in line together, however late the test's thread runs; after it,
    PROMPTS_PER_STEP of them start in one step."""
    model, go = engine.model, threading.Event()
    real, patched = model.prefill, "prefill" in vars(model)
    model.prefill = lambda *a, **kw: go.wait(timeout=60) and real(*a, **kw)
    try:
        yield
    finally:
        go.set()
        if patched:
            model.prefill = real
        else:
            del model.prefill


def together(engine, prompts, seeded=False, settings=None, **kw):
    """Every prompt in line at once (prompt i with seed=i if seeded, and settings[i] if given); each
    one's new tokens."""
    settings = settings or [{}] * len(prompts)
    with in_line(engine):
        sequences = [engine.submit(p, **({"seed": i} if seeded else {}), **settings[i], **kw)
                     for i, p in enumerate(prompts)]
    return [list(sequence) for sequence in sequences]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_position_per_row_gives_each_sequence_its_own_logits(position, dtype, random_model):
    """Sequences of different lengths in one decode step: each row's logits are those of its sequence alone, with
    learned and with rotary positions (config/wikitext_tiny.py trains rotary ones)."""
    model = random_model(dtype=dtype, position=position)
    seqs = [torch.randint(97, (n,)) for n in (4, 9, 1)]
    with torch.no_grad():
        model.setup_kv_cache(3)
        caches = [block.attn.kv_cache for block in model.blocks]
        for row, seq in enumerate(seqs):  # each prompt but its last token alone, into its own row
            for block, cache in zip(model.blocks, caches):
                block.attn.kv_cache = cache[:, row:row + 1]
            if len(seq) > 1:
                model.prefill(seq[None, :-1])
        for block, cache in zip(model.blocks, caches):
            block.attn.kv_cache = cache
        logits = model.decode_one_token(torch.stack([s[-1:] for s in seqs]),
                                        torch.tensor([[len(s) - 1] for s in seqs]))
        alone = [model(s[None])[0][0, -1] for s in seqs]
    assert torch.allclose(logits, torch.stack(alone), atol=DTYPES[dtype])


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
def test_batched_greedy_tokens_equal_generate_alone(model, max_batch_size):
    engine = BatchEngine(model, max_batch_size)
    got = together(engine, prompts(), max_new_tokens=50, temperature=0)  # 30 + 50 > block_size: rebuilds
    engine.close()
    expected = [model.generate(torch.tensor([p]), 50, temperature=0)[0, len(p):].tolist() for p in prompts()]
    assert got == expected and 1 <= engine.peak_batch <= max_batch_size


def test_seeded_samples_do_not_depend_on_the_batch(model):
    engine = BatchEngine(model, 8)
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.9)
    alone = [list(engine.submit(p, seed=i, **kw)) for i, p in enumerate(prompts())]
    results = together(engine, prompts(), seeded=True, **kw)
    engine.close()
    assert results == alone and len({tuple(r) for r in results}) > 1


def test_a_seed_gives_the_tokens_generate_ids_gives(random_model):
    """Sampled in a batch with other settings (greedy, others' filters), a seeded sequence gets the
    tokens generate_ids gives it alone: its noise is drawn with its own generator, as
    torch.multinomial draws it (float64: no near-ties between the two ways of computing logits)."""
    model = random_model()
    engine = BatchEngine(model, 8)
    settings = [dict(temperature=1.0), dict(temperature=0), dict(temperature=0.8, top_k=30),
                dict(temperature=1.2, top_p=0.9), dict(temperature=0.8, top_k=30)]
    results = together(engine, prompts(len(settings)), seeded=True, settings=settings,
                       max_new_tokens=40)
    engine.close()
    alone = [list(generate_ids(model, p, 40, seed=i, **kw))
             for i, (p, kw) in enumerate(zip(prompts(), settings))]
    assert results == alone and engine.peak_batch > 1


def test_suppressed_ids_are_never_sampled_and_the_rest_is_as_generate_ids(random_model):
    """The engine's suppress_ids (the tokens that start a data's <unk>, in serve.py) are kept out
    of every row, greedy or sampled, as generate_ids keeps them out of one."""
    model = random_model()
    free = BatchEngine(model, 8)
    greedy = together(free, prompts(4), max_new_tokens=30, temperature=0)
    free.close()
    banned = sorted({tokens[0] for tokens in greedy})
    engine = BatchEngine(model, 8, suppress_ids=banned)
    got = together(engine, prompts(4), max_new_tokens=30, temperature=0)
    sampled = [list(engine.submit(p, 30, temperature=1.0, seed=i)) for i, p in enumerate(prompts(4))]
    engine.close()
    assert not set(banned) & {t for tokens in got + sampled for t in tokens}
    assert got == [list(generate_ids(model, p, 30, temperature=0, suppress_ids=banned)) for p in prompts(4)]
    assert sampled == [list(generate_ids(model, p, 30, temperature=1.0, seed=i, suppress_ids=banned))
                       for i, p in enumerate(prompts(4))]


def test_padded_batch_sizes_give_the_same_tokens(model):
    """The active rows padded up to the next of a few batch sizes (as when compiled, here eager):
    each sequence's tokens are those it gets unpadded."""
    kw = dict(max_new_tokens=40, temperature=0.8, top_k=40)
    engine = BatchEngine(model, 8)
    unpadded = [list(engine.submit(p, seed=i, **kw)) for i, p in enumerate(prompts())]
    engine.batch_sizes = [1, 2, 4, 8]
    padded = together(engine, prompts(), seeded=True, **kw)
    engine.close()
    assert padded == unpadded and engine.peak_batch > 1


def test_the_compiled_engine_decodes_as_the_eager_one(random_model, capsys):
    """compile=True (inductor on the CPU): a step compiled for batch sizes 1 and 2, the active rows
    padded; greedy tokens equal to model.generate's, past block_size."""
    model = random_model(dtype=torch.float32, position="rope")
    expected = [model.generate(torch.tensor([p]), 40, temperature=0)[0, len(p):].tolist()
                for p in prompts(3)]
    engine = BatchEngine(model, 2, compile=True)
    assert engine.batch_sizes == [1, 2] and "warning" not in capsys.readouterr().err  # compiled
    got = together(engine, prompts(3), max_new_tokens=40, temperature=0)
    engine.close()
    assert got == expected and engine.peak_batch == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_engine_in_cuda_graphs_decodes_as_the_eager_one(random_model):
    """On a GPU, compile=True: a CUDA graph per batch size (1, 2, 4), the rows padded; each
    sequence's tokens (greedy, and seeded samples) those of the eager engine."""
    model = random_model(dtype=torch.float32, position="rope").cuda()
    results = []
    for compile in (False, True):
        engine = BatchEngine(model, 4, compile=compile)
        greedy = together(engine, prompts(), max_new_tokens=40, temperature=0)
        seeded = [list(engine.submit(p, 30, temperature=0.9, top_k=40, seed=i))
                  for i, p in enumerate(prompts(3))]
        engine.close()
        results.append((greedy, seeded))
    assert engine.batch_sizes == [1, 2, 4] and results[0] == results[1]


def test_stop_id_and_length_finish_a_sequence(model):
    engine = BatchEngine(model, 4)
    first = list(engine.submit(prompts()[0], 5, temperature=0))
    sequence = engine.submit(prompts()[0], 5, temperature=0, stop_id=first[2])
    assert list(sequence) == first[:first.index(first[2])] and sequence.finish_reason == "stop"
    sequence = engine.submit(prompts()[0], 5, temperature=0)
    assert list(sequence) == first and sequence.finish_reason == "length" and sequence.generated == 5
    engine.close()


def test_a_sequence_that_leaves_frees_its_row(model):
    engine = BatchEngine(model, 1)  # one row: the second request waits for the first
    endless = engine.submit(prompts()[1], 10**9, temperature=0)
    tokens = iter(endless)
    next(tokens)
    waiting = engine.submit(prompts()[2], 4, temperature=0)
    endless.close()  # a client gone
    assert len(list(waiting)) == 4
    engine.close()


def test_a_request_s_later_choices_wait_behind_another_s_first(model, monkeypatch):
    engine, real, admitted = BatchEngine(model, 1), model.prefill, []  # one row: one sequence at a time
    busy = engine.submit(prompts()[0], 10**9, temperature=0)
    tokens = iter(busy)  # (kept: a generator dropped would close busy)
    next(tokens)  # the row is taken: what follows waits
    monkeypatch.setattr(model, "prefill", lambda idx, **kw: admitted.append(idx[0].tolist()) or real(idx, **kw)
                        if "every_position" in kw else real(idx, **kw))  # a prompt let in, not a row rebuilt
    many = [engine.submit(prompts()[1], 2, temperature=0, rank=i) for i in range(3)]  # one request's 3 choices
    single = engine.submit(prompts()[2], 2, temperature=0)  # then another's only one
    busy.close()
    for sequence in [*many, single]:
        assert len(list(sequence)) == 2
    engine.close()
    assert admitted == [prompts()[1], prompts()[2], prompts()[1], prompts()[1]]


def test_an_error_reaches_the_client_and_the_engine_goes_on(model, monkeypatch):
    engine = BatchEngine(model, 4)
    real = engine.decode  # the engine's decode step (model.decode_one_token, or compiled)
    monkeypatch.setattr(engine, "decode", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        list(engine.submit(prompts()[0], 5, temperature=0))
    monkeypatch.setattr(engine, "decode", real)
    assert len(list(engine.submit(prompts()[0], 5, temperature=0))) == 5
    engine.close()


def prompts_run(model, monkeypatch):
    """The prompts the model runs from now on (not the rows it rebuilds when full), in order."""
    real, run = model.prefill, []
    monkeypatch.setattr(model, "prefill", lambda idx, **kw: run.append(idx[0].tolist())
                        or real(idx, **kw) if "every_position" in kw else real(idx, **kw))
    return run


def test_a_request_s_later_choices_start_once_its_first_has_decoded_two_tokens(model, monkeypatch):
    """Choices submitted after a request's first one join the line once it has decoded
    FOLLOWERS_AFTER tokens (a stream's reader has seen a client gone at once by then): no prompt of
    theirs runs before, whatever the pace of its reader."""
    engine, real, first_had = BatchEngine(model, 8), model.prefill, []

    def prefill(idx, **kw):  # the first choice's tokens when a later one's prompt runs
        if "every_position" in kw and idx[0].tolist() != prompts()[0]:
            first_had.append(first.generated)
        return real(idx, **kw)

    monkeypatch.setattr(model, "prefill", prefill)
    with in_line(engine):
        first = engine.submit(prompts()[0], 6, temperature=0)
        later = [engine.submit(prompts()[i], 4, temperature=0, rank=i, after=first)
                 for i in (1, 2, 3)]
    assert [len(list(sequence)) for sequence in [first, *later]] == [6, 4, 4, 4]
    engine.close()
    assert first_had == [FOLLOWERS_AFTER] * 3


def test_later_choices_closed_before_they_start_never_run(model, monkeypatch):
    """A request that ends (its client gone, an error) before its first choice has its tokens
    closes its choices: the later ones, held, never reach a row, and the engine holds nothing."""
    engine = BatchEngine(model, 1)  # one row: the request waits behind `busy`
    busy = engine.submit(prompts()[0], 10**9, temperature=0)
    tokens = iter(busy)
    next(tokens)
    run = prompts_run(model, monkeypatch)
    first = engine.submit(prompts()[1], 10**9, temperature=0)
    later = [engine.submit(prompts()[i], 10**9, temperature=0, rank=i, after=first)
             for i in (1, 2, 3)]
    for sequence in [first, *later]:  # as serve.py closes an answer's choices
        sequence.close()
    busy.close()
    assert len(list(engine.submit(prompts()[4], 3, temperature=0))) == 3
    engine.close()
    assert run == [prompts()[4]] and engine.waiting.qsize() == 0 and not engine.active


def test_choices_of_one_prompt_run_it_once_and_get_what_they_get_alone(model, monkeypatch):
    """n choices of one prompt, scored (echo with logprobs): the prompt runs once, the others copy
    its positions from its row (here not row 0); each gets the tokens and prompt scores it gets
    alone."""
    kw = dict(max_new_tokens=20, temperature=1.0, score_prompt=True, logprobs=2)
    one_row, alone = BatchEngine(model, 1), []
    for i in range(4):
        sequence = one_row.submit(prompts()[3], seed=i, **kw)
        alone.append((list(sequence), sequence.scored_prompt()))
    one_row.close()
    engine = BatchEngine(model, 8)
    busy = engine.submit(prompts()[0], 10**9, temperature=0)
    tokens = iter(busy)
    next(tokens)
    run = prompts_run(model, monkeypatch)
    with in_line(engine):
        first = engine.submit(prompts()[3], seed=0, **kw)
        later = [engine.submit(prompts()[3], seed=i, rank=i, after=first, **kw) for i in (1, 2, 3)]
    got = [(list(sequence), sequence.scored_prompt()) for sequence in [first, *later]]
    busy.close()
    engine.close()
    assert got == alone and run == [prompts()[3]] and engine.peak_batch == 5
