"""A GPU-sized model for WikiText-2 (tokenized release, 2.1M words): ~20M parameters with strong regularisation,
since a transformer this size overfits 2M words within a few epochs.

    python prepare.py --dataset=wikitext-2 && python train.py config/wikitext_small.py
"""
data_dir = "data/wikitext-2"
out_dir = "out-wikitext-small"

num_hidden_layers = 6
num_attention_heads = 8
hidden_size = 512
block_size = 512
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.3          # heavy dropout: the corpus is small for a model this size
weight_decay = 0.2

learning_rate = 1e-3
max_iters = 6000
lr_decay_iters = max_iters
min_lr = learning_rate / 10
warmup_iters = 200
beta2 = 0.99

eval_interval = 500
eval_iters = 100
log_interval = 50
always_save_checkpoint = False   # keep the checkpoint with the best validation loss
