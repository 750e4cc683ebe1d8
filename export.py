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

import torch

from safetensors.torch import save_file

from checkpoint import load_model
from cli import UserError, atomic_write, check_writable, parse_config, run_main, setting, write_json
from gpt2 import hf_architecture, hf_config, hf_state_dict, neox_hf_config, neox_state_dict


@dataclass
class ExportConfig:
    model: str = "out-wikitext-tiny"  # a folder that train.py or finetune_instruct.py wrote
    to: str = ""                      # the Hugging Face folder to write (created if need be), or FILE.gguf for
                                      # llama.cpp
    gguf_type: str = setting("f16", choices=("f32", "f16", "q8_0"))  # the GGUF file's matrices; norms stay f32


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
    if os.path.abspath(config.to) == os.path.abspath(config.model):
        raise UserError("--to must be another folder than --model (the checkpoint stays as it is)")
    check_writable(config.to, "to", folder=not config.to.endswith(".gguf"))
    if config.to.endswith(".gguf"):
        arch = export_gguf(config.model, config.to, config.gguf_type)
        print(f"exported {config.model} -> {config.to} (GGUF, {arch}, {config.gguf_type})")
        return
    files = export(config.model, config.to)
    print(f"exported {config.model} -> {config.to}: {', '.join(files)}")


if __name__ == "__main__":
    run_main(main)
