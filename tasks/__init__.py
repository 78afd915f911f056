"""Tasks: each names its tokenizer, model, head, data pipeline and metrics."""
