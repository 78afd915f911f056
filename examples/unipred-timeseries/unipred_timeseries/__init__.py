"""unipred-timeseries: a fourth modality for unipred, 1-D signals, as an external plugin.

Installing this package makes unipred import it (entry point group ``unipred.plugins``), which
registers the "timeseries" tokenizer, the ``timeseries_pretrain`` / ``timeseries_classify``
tasks and the ``nepa_ts_*`` model sizes.
"""

from unipred_timeseries import tasks, tokenizer  # noqa: F401  (their imports register)
