"""
Export a trained model as a Hugging Face folder, so that `transformers`, vLLM and HF `tokenizers` load it as they
load any model:

    python export.py --model=out-wikitext-small --to=hf-small

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf-small")     # offline
    tokenizer = AutoTokenizer.from_pretrained("hf-small")

A model with rotary positions (both shipped configs) becomes a GPTNeoXForCausalLM (sequential residual, rotary on
every dimension, tied or untied output layer): exactly what our GPT computes. One with learned positions and a tied
output layer becomes a GPT2LMHeadModel. What neither computes (ReLU², QK-norm, a logit soft-cap) is refused.
The folder gets model.safetensors (the architecture's names; the biases of a bias=False model as zeros), config.json,
the tokenizer as tokenizer.json (and vocab.json + merges.txt), tokenizer_config.json and special_tokens_map.json,
with <|endoftext|> as the beginning, end and unknown token as GPT-2 has it. Every file is written atomically. The
same folder loads back here too: `python sample.py --model=hf-tiny`.
"""

import os
from dataclasses import dataclass

from safetensors.torch import save_file

from checkpoint import load_model
from cli import UserError, atomic_write, parse_config, run_main, write_json
from gpt2 import hf_architecture, hf_config, hf_state_dict, neox_hf_config, neox_state_dict


@dataclass
class ExportConfig:
    model: str = "out-wikitext-tiny"  # a folder that train.py or finetune_instruct.py wrote
    to: str = ""                      # the Hugging Face folder to write (created if need be)


def export(model_dir, to):
    """Write the model of model_dir as a Hugging Face folder `to`; returns the names of the files written."""
    model, tokenizer, _ = load_model(model_dir)
    neox = hf_architecture(model.config) == "gpt_neox"
    os.makedirs(to, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in (neox_state_dict(model) if neox else hf_state_dict(model)).items()}
    atomic_write(os.path.join(to, "model.safetensors"), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    special = {}
    if tokenizer.eot_id is not None:  # GPT-2's convention: one token begins, ends and stands in for the unknown
        eot = next(name for name, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id)
        special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    write_json(os.path.join(to, "config.json"), (neox_hf_config if neox else hf_config)(model.config, tokenizer.eot_id))
    write_json(os.path.join(to, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2TokenizerFast", "model_max_length": model.config.block_size, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, **special})
    write_json(os.path.join(to, "special_tokens_map.json"), special)
    files = tokenizer.save(to)
    return ["model.safetensors", "config.json", "tokenizer_config.json", "special_tokens_map.json", *files]


def main():
    config = parse_config(ExportConfig, renamed={"out_dir": "model"})
    if not config.to:
        raise UserError("say where to write the Hugging Face folder: --to=DIR")
    if os.path.abspath(config.to) == os.path.abspath(config.model):
        raise UserError("--to must be another folder than --model (the checkpoint stays as it is)")
    files = export(config.model, config.to)
    print(f"exported {config.model} -> {config.to}: {', '.join(files)}")


if __name__ == "__main__":
    run_main(main)
