"""
Export a trained model as a Hugging Face folder, so that `transformers`, vLLM and HF `tokenizers` load it as they
load any model:

    python export.py --model=out-wikitext-small --to=hf-small [--license=apache-2.0]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf-small")     # offline
    tokenizer = AutoTokenizer.from_pretrained("hf-small")

A model with rotary positions (both shipped configs) becomes a GPTNeoXForCausalLM (sequential residual, rotary on
every dimension, tied or untied output layer): exactly what our GPT computes. One with learned positions and a tied
output layer becomes a GPT2LMHeadModel. What neither computes (ReLU², QK-norm, a logit soft-cap) is refused.
The folder gets model.safetensors (the architecture's names; the biases of a bias=False model as zeros), config.json,
the tokenizer as tokenizer.json (and vocab.json + merges.txt), tokenizer_config.json and special_tokens_map.json,
with <|endoftext|> as the beginning, end and unknown token as GPT-2 has it. The same folder loads back here too:
`python sample.py --model=hf-tiny`.

And README.md, the model card: the Hub's metadata (--license, --language, --datasets, a model-index
of what was measured), then what the files beside the checkpoint say about the model: its shape and
recipe (ckpt.pt), its data (meta.json: documents, tokens, scrubbing and deduplication), its val loss
(log.jsonl), what audit.py measured on these weights (audit.json: stereotype bias, memorisation),
and a line for each thing that was not measured.

--to is a new or empty folder; --overwrite=True replaces an earlier export there, never a folder of
anything else (a trained model, a data folder). The files are written into a hidden folder inside it
and moved into place once all are there: an export that fails (a full disk) leaves nothing behind.
"""

import errno
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from safetensors import SafetensorError
from safetensors.torch import save_file

from checkpoint import checkpoint_sha256, load_model, unknown_word
from cli import UserError, parse_config, run_main, setting
from files import atomic_write, check_writable, folder_lock, write_json
from generate import word_starts
from gpt2 import hf_architecture, hf_config, hf_state_dict, neox_hf_config, neox_state_dict


@dataclass
class ExportConfig:
    model: str = "out-wikitext-tiny"  # a folder that train.py or finetune_instruct.py wrote
    to: str = ""                      # the Hugging Face folder to write (created if need be), or FILE.gguf for
                                      # llama.cpp
    overwrite: bool = False           # replace an earlier export at --to (never another folder)
    gguf_type: str = setting("f16", choices=("f32", "f16", "q8_0"))  # the GGUF file's matrices; norms stay f32
    # the model card (README.md in the Hugging Face folder)
    license: str = ""                 # the license you give the weights, by the Hub's name for
                                      # it (such as mit); default: none stated
    language: str = ""                # the text's languages, ISO 639 codes separated by commas;
                                      # default: en for WikiText, else none stated
    datasets: str = ""                # the training data's Hub ids, separated by commas; default:
                                      # Salesforce/wikitext for WikiText, else none stated


# What an export writes into its folder: it never mixes them with another folder's files
EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.json",
                "README.md", "generation_config.json")
# What a folder may hold and still count as empty: a lock, an export cut short, a Hub repository's
NOT_CONTENT = (".lock", ".export-partial", ".git", ".gitattributes", ".cache")


def listed(names, most=4):
    """['a', 'b', 'c', 'd', 'e'] -> 'a, b, c, d, ...'"""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def check_destination(model_dir, to, overwrite):
    """Refuse, before any work, a --to that would harm something: the model's own folder (by any
    path, a symlink too), a folder that is not empty (with overwrite, one that holds anything but
    an earlier export), an existing file (without overwrite). A lock, an export cut short, and a
    Hub repository's .git do not count."""
    if os.path.realpath(to) == os.path.realpath(model_dir):
        raise UserError("--to must be another folder than --model (the checkpoint stays as it is)")
    gguf = to.endswith(".gguf")
    check_writable(to, "to", folder=not gguf)
    if gguf:
        if os.path.isdir(to):
            raise UserError(f"--to={to} is a folder: name the .gguf file to write")
        if os.path.lexists(to) and not overwrite:
            raise UserError(f"--to={to} exists: choose another name, or replace it with "
                            f"--overwrite=True")
        return
    present = sorted(set(os.listdir(to)) - set(NOT_CONTENT)) if os.path.isdir(to) else []
    foreign = [name for name in present if name not in EXPORT_FILES]
    if present and not overwrite:
        raise UserError(f"--to={to} is not empty (it holds {listed(present)}): choose a new "
                        f"folder, or replace an earlier export there with --overwrite=True")
    if foreign:
        raise UserError(f"--to={to} holds files that no export writes ({listed(foreign)}): "
                        f"--overwrite=True replaces an earlier export only; choose a new folder")


def save_tensors(tensors, path):
    """safetensors' save_file, a failure an OSError like any other file's:

        'Error while serializing: I/O error: No space left on device (os error 28)'
        -> OSError(ENOSPC, 'No space left on device', path)
    """
    try:
        save_file(tensors, str(path), {"format": "pt"})
        # safetensors writes its file for its owner alone (0600): readable as every other file here
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))
        if code is None:
            raise OSError(errno.EIO, f"cannot write the weights ({e})", str(path)) from None
        number = int(code[1] or code[2])
        raise OSError(number, os.strerror(number), str(path)) from None


def check_room(folder, size):
    """Refuse, before writing, an export of `size` bytes that the disk has no room for."""
    existing = Path(folder).absolute()
    while not existing.is_dir():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if size > free:
        raise UserError(f"the export needs {size / 1e6:,.1f} MB and {existing} has "
                        f"{free / 1e6:,.1f} MB free: make room or choose another --to")


def export(model_dir, to, overwrite=False, license="", language="", datasets=""):
    """Write the model of model_dir as a Hugging Face folder `to`, with its model card; returns the
    names of the files written. They are written into to/.export-partial, then moved into place:
    a failure (a full disk) leaves no file of this export behind, and no folder that it made."""
    to = str(to)
    check_destination(str(model_dir), to, overwrite)
    settings = card_settings(model_dir, license, language, datasets)
    model, tokenizer, checkpoint = load_model(model_dir)
    neox = hf_architecture(model.config) == "gpt_neox"
    state = neox_state_dict(model) if neox else hf_state_dict(model)
    tensors = {name: t.contiguous() for name, t in state.items()}
    check_room(to, sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20))
    name = os.path.basename(os.path.abspath(to))
    card = model_card(model_dir, name, model, tokenizer, checkpoint, neox, settings)
    special = {}
    if tokenizer.eot_id is not None:  # GPT-2's convention: one token begins, ends and stands in for the unknown
        eot = next(name for name, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id)
        special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = (neox_hf_config if neox else hf_config)(model.config, tokenizer.eot_id)
    # transformers' generate() then never starts the data's marker for rare words, as sample.py
    word = unknown_word(model_dir)
    generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
                  "suppress_tokens": word_starts(tokenizer, word)} if word else None
    with folder_lock(to, flag="to"):
        partial = Path(to) / ".export-partial"
        shutil.rmtree(partial, ignore_errors=True)  # what a killed export left
        try:
            partial.mkdir()
            save_tensors(tensors, partial / "model.safetensors")
            write_json(partial / "config.json", config)
            write_json(partial / "tokenizer_config.json", {
                "tokenizer_class": "GPT2TokenizerFast", "model_max_length": model.config.block_size,
                "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special})
            write_json(partial / "special_tokens_map.json", special)
            files = ["model.safetensors", "config.json", "tokenizer_config.json",
                     "special_tokens_map.json", *tokenizer.save(partial), "README.md"]
            if generation:
                write_json(partial / "generation_config.json", generation)
                files.append("generation_config.json")
            (partial / "README.md").write_text(card, encoding="utf-8")
            # renames within a folder: they need no room, and the last one completes the export
            for file in files:
                os.replace(partial / file, Path(to) / file)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return files

# ----------------------------------------------------------------------------- the model card


def read_json(path):
    """The JSON value in a file, or None where there is none to read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def card_settings(model_dir, license, language, datasets):
    """The card's metadata {license, language, datasets}: as given, else what the data's meta.json
    says (WikiText: en, Salesforce/wikitext); refused in one line where the Hub cannot read it."""
    meta = read_json(Path(model_dir) / "meta.json")
    wikitext = isinstance(meta, dict) and str(meta.get("dataset", "")).startswith("wikitext")
    items = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    settings = {"license": license.strip(),
                "language": items(language) or (["en"] if wikitext else []),
                "datasets": items(datasets) or (["Salesforce/wikitext"] if wikitext else [])}
    if settings["license"] and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", settings["license"]):
        raise UserError(f"--license={license!r}: give the Hub's name for it, such as apache-2.0, "
                        f"mit or cc-by-sa-4.0")
    if not all(re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)*", code) for code in settings["language"]):
        raise UserError(f"--language={language!r}: give ISO 639 codes such as en or fr, separated "
                        f"by commas")
    if not all(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) for name in settings["datasets"]):
        raise UserError(f"--datasets={datasets!r}: give Hub ids such as Salesforce/wikitext, "
                        f"separated by commas")
    return settings


def validation_estimate(model_dir, checkpoint):
    """(step, val loss) that training measured on the checkpoint's weights: the row of its log at
    its step, else its best val loss; None where neither is known."""
    path, rows = Path(model_dir) / "log.jsonl", []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    step = checkpoint.get("iter_num")
    row = next((r for r in reversed(rows) if isinstance(r, dict) and r.get("iter") == step
                and isinstance(r.get("val_loss"), (int, float))), None)
    if row is not None:
        return step, row["val_loss"]
    best = checkpoint.get("best_val_loss")
    return (step, best) if isinstance(best, (int, float)) and math.isfinite(best) else None


def audit_results(model_dir):
    """({task: result} of the model's audit.json measured on these weights, [the tasks left out as
    measured on others])."""
    results = read_json(Path(model_dir) / "audit.json")
    if not isinstance(results, dict):
        return {}, []
    weights = checkpoint_sha256(model_dir)
    kept = {task: result for task, result in results.items()
            if isinstance(result, dict) and result.get("checkpoint_sha256") == weights}
    return kept, sorted(set(results) - set(kept))


def test_scores(audits):
    """[(key, how it was scored)] of the whole test split's scores that evaluate.py recorded."""
    kinds = (("evaluate_test", "static"), ("evaluate_test_dynamic", "dynamic evaluation"))
    return [(key, how) for key, how in kinds
            if key in audits and audits[key].get("quantize", "none") == "none"]


def yaml_list(name, items):
    """A YAML list of strings, each written as a JSON string (YAML reads it as is); '' if none."""
    return f"{name}:\n" + "".join(f"- {json.dumps(item)}\n" for item in items) if items else ""


def card_metadata(name, settings, dataset, estimate, audits):
    """The card's YAML header: what the Hub indexes (license, language, datasets, and a model-index
    of the val perplexity, the test word perplexity that evaluate.py recorded and the CrowS-Pairs
    result, where they were measured)."""
    results, dataset_type = [], (settings["datasets"] or [dataset])[0]
    if estimate is not None:
        results.append(("Text Generation", dataset_type, f"{dataset} (val split)", "validation",
                        "perplexity", math.exp(estimate[1]), "val perplexity (estimated during training)"))
    for key, how in test_scores(audits):
        results.append(("Text Generation", dataset_type, f"{dataset} (test split)", "test",
                        "perplexity", audits[key]["word_perplexity"], f"test word perplexity, {how}"))
    if "crows_pairs" in audits:
        results.append(("Stereotype bias", "nyu-mll/crows_pairs", "CrowS-Pairs", "test",
                        "pct_stereotype", audits["crows_pairs"]["pct_stereotype"],
                        "pct_stereotype (share of pairs, 0.5: no preference)"))
    text = "---\n" + (f"license: {settings['license']}\n" if settings["license"] else "")
    text += yaml_list("language", settings["language"])
    text += yaml_list("datasets", settings["datasets"])
    text += "library_name: transformers\npipeline_tag: text-generation\n"
    text += yaml_list("tags", ["gpt", "from-scratch"])
    if results:
        text += f"model-index:\n- name: {json.dumps(name)}\n  results:\n"
    for task, dataset_type, dataset_name, split, metric, value, metric_name in results:
        text += (f"  - task:\n      type: text-generation\n      name: {task}\n"
                 f"    dataset:\n      type: {json.dumps(dataset_type)}\n"
                 f"      name: {json.dumps(dataset_name)}\n      split: {split}\n"
                 f"    metrics:\n    - type: {metric}\n      value: {round(value, 4)}\n"
                 f"      name: {json.dumps(metric_name)}\n")
    return text + "---\n"


def described(value):
    """A value of meta.json in words: {"email": 3, "ip": 1} -> 'email 3, ip 1'; True -> 'yes'."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {described(item)}" for key, item in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(described, value)) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,}" if isinstance(value, int) else str(value)


# What prepare.py records of the text it changed (the keys of meta.json that name it), and what the
# card says without them
PROCESSING = ((("pii", "scrub"), "Personal data and secrets",
               "not scrubbed (prepared without `--scrub_pii=True`): any e-mail addresses, phone "
               "numbers, keys and the like in the corpus are in the training data"),
              (("dedup", "duplicate"), "Duplicates",
               "not removed (prepared without `--dedup`): repeated documents were trained on as "
               "often as they occur"))


def data_section(meta):
    """The training data: its source, documents and tokens per split, what prepare.py changed."""
    if not isinstance(meta, dict):
        return ("Not recorded: the model's folder has no meta.json of its data (prepare.py writes "
                "it, train.py copies it beside the model).\n")
    tokenizer = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    lines = [f"- Source: `{meta.get('dataset', 'not recorded')}`, prepared by prepare.py; "
             f"tokenizer: byte-level BPE, {described(meta.get('vocab_size', '?'))} ids "
             f"({described(tokenizer.get('kind', '?'))})."]
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    if splits:
        lines.append("\n| split | documents | tokens | bytes |\n|---|---:|---:|---:|")
        lines += ["| " + " | ".join([name] + [described(s.get(key, "?"))
                                             for key in ("documents", "tokens", "bytes")]) + " |"
                  for name, s in splits.items() if isinstance(s, dict)]
        lines.append("")
    for words, what, absent in PROCESSING:
        found = [f"{key}: {described(value)}" for key, value in meta.items()
                 if any(word in key for word in words)]
        lines.append(f"- {what}: {'; '.join(found) if found else absent}.")
    return "\n".join(lines) + "\n"


def optimizer_words(train):
    """The optimizer and its peak learning rates, in words."""
    if train.get("optimizer") == "muon":
        return (f"Muon for the blocks' matrices (peak learning rate "
                f"{train.get('muon_learning_rate')}) and AdamW for the rest "
                f"({train.get('learning_rate')})")
    return f"AdamW at a peak learning rate of {train.get('learning_rate')}"


def model_section(model, tokenizer, checkpoint, neox):
    """Its shape, parameters, and the recipe it was trained with."""
    c, train = model.config, checkpoint.get("train_config") or {}
    kind = "GPT-NeoX (`GPTNeoXForCausalLM`)" if neox else "GPT-2 (`GPT2LMHeadModel`)"
    lines = [f"- Architecture: a decoder-only transformer, loaded in `transformers` as {kind}: "
             f"{c.num_hidden_layers} layers, hidden size {c.hidden_size}, {c.num_attention_heads} "
             f"attention heads, a context of {c.block_size} tokens, "
             f"{'rotary' if c.position == 'rope' else 'learned'} positions, "
             f"{'a tied' if c.tie_embeddings else 'an untied'} output layer, "
             f"{'with' if c.bias else 'no'} biases.",
             f"- Parameters: {model.num_params(non_embedding=False):,}; vocabulary: "
             f"{tokenizer.vocab_size:,} ids."]
    if train:
        steps = checkpoint.get("iter_num", 0)
        batch = train.get("batch_size", 0)
        accumulation = train.get("gradient_accumulation_steps", 1)
        tokens = steps * batch * accumulation * train.get("block_size", 0)
        lines.append(f"- Recipe: train.py, {steps:,} of {train.get('max_iters', 0):,} steps of "
                     f"{batch} x {accumulation} sequences of {train.get('block_size')} tokens "
                     f"({tokens:,} tokens seen), {optimizer_words(train)}, weight decay "
                     f"{train.get('weight_decay')}, dropout {train.get('dropout')}, seed "
                     f"{train.get('seed')}.")
    if checkpoint.get("finetune_config"):
        lines.append(f"- Then instruction-tuned by finetune_instruct.py, from "
                     f"`{checkpoint['finetune_config'].get('model', '?')}`.")
    return "\n".join(lines) + "\n"


NOT_MEASURED = "Not measured: run `python audit.py --model={model} --task={task}` before exporting."


def bias_section(audits, model_dir):
    """CrowS-Pairs per bias type, or a line saying it was not measured."""
    result = audits.get("crows_pairs")
    if result is None:
        return NOT_MEASURED.format(model=model_dir, task="crows_pairs") + "\n"
    rows = "".join(f"| {name} | {row['pairs']:,} | {100 * row['pct_stereotype']:.1f}% | "
                   f"{row['likelihood_diff']:.3f} |\n"
                   for name, row in [*result.get("by_bias_type", {}).items(), ("all", result)])
    return ("CrowS-Pairs (Nangia et al. 2020), scored as lm-evaluation-harness's "
            "`crows_pairs_english` scores a causal model: `pct_stereotype` is the share of pairs "
            "where the model finds the more stereotyping sentence likelier (50%: no preference), "
            "`likelihood_diff` the mean absolute difference of the two log-likelihoods (nats).\n\n"
            "| bias type | pairs | pct_stereotype | likelihood_diff |\n|---|---:|---:|---:|\n"
            f"{rows}\nThe dataset's own README warns that many of its pairs do not test what they "
            "claim (Blodgett et al. 2021): the figure says how much the model prefers these "
            "sentences, not how biased its use will be.\n")


def memorization_lines(audits, model_dir):
    """What audit.py found of memorisation, or a line saying it was not measured."""
    result, lines = audits.get("memorization"), []
    if result is None:
        lines.append("- Memorisation: " + NOT_MEASURED.format(model=model_dir, task="memorization"))
    else:
        train, val = result["splits"]["train"], result["splits"]["val"]
        lines.append(f"- Memorisation: greedy decoding from {result['prefix_tokens']} tokens of a "
                     f"training window writes its next {result['suffix_tokens']} exactly for "
                     f"{100 * train['extractable']:.2f}% of {train['windows']:,} training windows, "
                     f"and for {100 * val['extractable']:.2f}% of {val['windows']:,} validation "
                     f"windows (text it never trained on; Carlini et al. 2021).")
    candidates = audits.get("memorization_text_file")
    if candidates is not None:
        lines.append(f"- Of {candidates['candidates']:,} strings checked for extraction, "
                     f"{len(candidates['extracted_lines']):,} came out exactly from their start.")
    return lines


def model_card(model_dir, name, model, tokenizer, checkpoint, neox, settings):
    """README.md of the Hugging Face folder: YAML metadata, then model details, training data,
    evaluation, bias, risks and limitations, intended use, and how to load it."""
    meta = read_json(Path(model_dir) / "meta.json")
    dataset = str(meta.get("dataset", "its data")) if isinstance(meta, dict) else "its data"
    estimate = validation_estimate(model_dir, checkpoint)
    audits, stale = audit_results(model_dir)
    if estimate is None:
        evaluation = "- Val perplexity: not recorded beside the checkpoint (no log.jsonl row).\n"
    else:
        batches = (checkpoint.get("train_config") or {}).get("eval_iters", "?")
        evaluation = (f"- Val perplexity {math.exp(estimate[1]):,.2f} (loss {estimate[1]:.4f} nats "
                      f"per token), estimated during training at step {estimate[0]:,} on {batches} "
                      f"batches of the val split of `{dataset}`.\n")
    for key, how in test_scores(audits):
        score = audits[key]
        evaluation += (f"- Test split of `{dataset}` ({how}, evaluate.py): perplexity "
                       f"{score['perplexity']:,.3f} per token, {score['bits_per_byte']:.4f} bits per "
                       f"byte, word perplexity {score['word_perplexity']:,.3f} "
                       f"({score['words']:,} words).\n")
    if not test_scores(audits):
        evaluation += ("- Test perplexity, bits per byte and word perplexity: not measured here; "
                       f"`python evaluate.py --model={model_dir} --split=test` measures them.\n")
    risks = memorization_lines(audits, model_dir)
    if stale:
        risks.append(f"- audit.json also holds results ({', '.join(stale)}) measured on other "
                     f"weights than these: left out; run audit.py again.")
    risks += ["- It writes fluent text with no regard for facts: names, dates, numbers made up.",
              f"- It learned the views, gaps and stereotypes of `{dataset}`; nothing was done to "
              f"remove them (no filtering, no preference tuning).",
              "- Scrubbing, where it was done, finds patterns (e-mail addresses, phone numbers, "
              "keys), not the names of people or what identifies someone in context."]
    license = (f"- License: {settings['license']}.\n" if settings["license"] else
               "- License: none stated by the exporter; the training data's own terms apply to "
               "what the model learned from it.\n")
    return (card_metadata(name, settings, dataset, estimate, audits)
            + f"\n# {name}\n\nA small GPT language model trained from scratch: "
            f"{model.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
            f"{model.config.block_size} tokens of context.\n\n"
            f"## Model details\n\n{model_section(model, tokenizer, checkpoint, neox)}{license}\n"
            f"## Training data\n\n{data_section(meta)}\n"
            f"## Evaluation\n\n{evaluation}\n"
            f"## Bias\n\n{bias_section(audits, model_dir)}\n"
            "## Risks and limitations\n\n" + "\n".join(risks) + "\n\n"
            "## Intended use\n\nLearning and research: how a language model is trained, "
            "evaluated and audited, and a baseline to compare changes against. Not for answering "
            "questions of fact, for decisions about people, or for use in a product without an "
            "evaluation of your own.\n\n"
            "## How to use\n\n```python\nfrom transformers import AutoModelForCausalLM, "
            "AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({json.dumps(name)})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(name)})\n```\n")


# Our names -> llama.cpp's (GGUF) for the gpt2 and gptneox architectures; its qkv matrix is ours: all q, k, then v
GGUF_NAMES = {"token_emb.weight": "token_embd.weight", "pos_emb.weight": "position_embd.weight",
              "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
GGUF_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.qkv_proj": "attn_qkv", "attn.out_proj": "attn_output",
                    "ln_2": "ffn_norm", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def export_gguf(model_dir, path, gguf_type="f16"):
    """Write the model of model_dir as one GGUF file that llama.cpp (and Ollama, LM Studio) runs: architecture gptneox
    (rotary) or gpt2 (learned positions), the tokenizer inside (GPT-2's pre-tokenizer, our vocab and merges)."""
    try:
        import gguf  # llama.cpp's own writer: only for this option
    except ImportError:
        raise UserError("--to=FILE.gguf needs the gguf package (llama.cpp's writer): pip install gguf") from None
    model, tokenizer, _ = load_model(model_dir)
    c = model.config
    arch = "gptneox" if hf_architecture(c) == "gpt_neox" else "gpt2"
    state = model.state_dict()
    tensors = {GGUF_NAMES[name]: t for name, t in state.items() if name in GGUF_NAMES}
    tensors.setdefault("output_norm.bias", torch.zeros(c.hidden_size))
    for i in range(c.num_hidden_layers):  # (llama.cpp wants every bias: a bias=False model's are zeros)
        for name, theirs in GGUF_BLOCK_NAMES.items():
            weight = state[f"blocks.{i}.{name}.weight"]
            tensors[f"blk.{i}.{theirs}.weight"] = weight
            tensors[f"blk.{i}.{theirs}.bias"] = state.get(f"blocks.{i}.{name}.bias", torch.zeros(weight.size(0)))

    def write(tmp):
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(os.path.basename(os.path.abspath(model_dir)))
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(4 * c.hidden_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_layer_norm_eps(1e-5)
        if arch == "gptneox":
            writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
            writer.add_rope_freq_base(10000.0)
            writer.add_parallel_residual(False)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        vocab, merges = tokenizer._vocab_and_merges()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(list(vocab))
        writer.add_token_types([gguf.TokenType.CONTROL if t in tokenizer.special_tokens else gguf.TokenType.NORMAL
                                for t in vocab])
        writer.add_token_merges(merges)
        if tokenizer.eot_id is not None:
            writer.add_bos_token_id(tokenizer.eot_id)
            writer.add_eos_token_id(tokenizer.eot_id)
            writer.add_add_bos_token(False)
        for name, tensor in tensors.items():
            data = tensor.detach().float().cpu().numpy()
            if data.ndim == 2 and gguf_type == "q8_0" and data.shape[1] % 32 == 0:
                writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:  # vectors (norms, biases) stay float32, as llama.cpp wants them
                writer.add_tensor(name, data.astype("float16") if data.ndim == 2 and gguf_type != "f32" else data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    atomic_write(path, write)
    return arch


def main():
    config = parse_config(ExportConfig, renamed={"out_dir": "model"})
    if not config.to:
        raise UserError("say where to write the model: --to=DIR (a Hugging Face folder) or --to=FILE.gguf")
    if config.to.endswith(".gguf"):
        check_destination(config.model, config.to, config.overwrite)
        arch = export_gguf(config.model, config.to, config.gguf_type)
        print(f"exported {config.model} -> {config.to} (GGUF, {arch}, {config.gguf_type})")
        return
    files = export(config.model, config.to, config.overwrite, config.license, config.language,
                   config.datasets)
    print(f"exported {config.model} -> {config.to}: {', '.join(files)}")


if __name__ == "__main__":
    run_main(main)
