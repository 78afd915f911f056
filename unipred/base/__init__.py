"""Layer 0, the vocabulary every other layer shares: the registries (tokenizers, models, tasks,
data sources, decoders, commands, plugin loading), the contracts a plugin implements
(``Tokenizer``, ``DatasetBuilder``), the ``Tokens`` record, and small helpers (optional extras,
thread counts, quiet third-party logging). Imports nothing else of unipred."""
