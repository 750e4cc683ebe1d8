"""A GPU-sized model for WikiText-2 (tokenized release, 2.1M words): ~27M parameters with strong regularisation,
since a transformer this size overfits 2M words within a few epochs. Meant for one GPU and at most 8 minutes of
training.

    python prepare.py --dataset=wikitext-2 && python train.py config/wikitext_small.py

The previous recipe (learned positions, tied head, AdamW, no embedding dropout) reached test word perplexity 110.5 and
110.8 on one H100 (two runs, 83-99 s of training). On one H200 this recipe with Muon at 0.02 diverged (NaN) at
iteration 900, in bfloat16 and float32 alike; at 0.01 it trained stably to iteration 2,949 in a 200 s test run (val
loss 3.657), so 0.01 it is. Its full run is not measured yet (docs/RESULTS.md).
"""
data_dir = "data/wikitext-2"
out_dir = "out-wikitext-small"

num_hidden_layers = 6
num_attention_heads = 8
hidden_size = 512
block_size = 512
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.3            # heavy dropout: the corpus is small for a model this size
embedding_dropout = 0.1  # drop whole words too: reported as the biggest single gain on WikiText-2 (Dettmers)
weight_decay = 0.2

# what paid on the CPU (the ablation table in docs/RESULTS.md): rotary positions, an untied output layer, Muon
position = "rope"
tie_embeddings = False
optimizer = "muon"

learning_rate = 1e-3     # AdamW's, for the embeddings and output layer
muon_learning_rate = 0.01  # 0.02 diverged at iteration 900 on a GPU (docs/RESULTS.md)
max_iters = 6000
lr_decay_iters = max_iters
min_lr = learning_rate / 10
warmup_iters = 200
beta2 = 0.99

eval_interval = 500
eval_iters = 100
log_interval = 50
always_save_checkpoint = False   # keep the checkpoint with the best validation loss
