"""GPT-2 small's shape (124M parameters), for several GPUs and a corpus far larger than WikiText-2.

    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --data_dir=data/your-corpus

About 0.5M tokens per step: 16 sequences x 1024 tokens x 32 micro-steps (spread over the processes).
"""
out_dir = "out-gpt2-124m"

num_hidden_layers = 12
num_attention_heads = 12
hidden_size = 768
block_size = 1024
dropout = 0.0
bias = True

batch_size = 16
gradient_accumulation_steps = 32

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95

eval_interval = 1000
eval_iters = 200
log_interval = 10
