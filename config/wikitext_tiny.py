"""A model that trains on 2 CPU cores in about 11 minutes (bf16) and already writes recognisable English.

    python prepare.py --dataset=wikitext-2 && python train.py config/wikitext_tiny.py
"""
data_dir = "data/wikitext-2"
out_dir = "out-wikitext-tiny"
device = "cpu"

# 4 layers of 256: ~5M parameters, about 2M of them the 8192-token embedding table
num_hidden_layers = 4
num_attention_heads = 4
hidden_size = 256
block_size = 128
batch_size = 16
dropout = 0.0     # 1500 x 2,048 tokens is about one pass over the 2.7M train tokens: too short to overfit

learning_rate = 2e-3   # small models take a large step size
max_iters = 1500
lr_decay_iters = max_iters
min_lr = learning_rate / 10
warmup_iters = 100
weight_decay = 0.1

eval_interval = 250
eval_iters = 40
log_interval = 50
