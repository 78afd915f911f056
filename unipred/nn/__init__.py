"""Layer 1, the model's building blocks: k-D RoPE, the causal predictor, the next-embedding
loss and the pretraining objectives, heads, and ``NEPA`` itself (tokenizer + predictor +
objective). Plain PyTorch: no Lightning, no OmegaConf, no data."""
