"""The text modality: UTF-8 bytes or any integer-id sequence. Readers (class folders of text
files, JSONL/CSV records, shards) that skip and count bad input, windows for long documents,
corpora built from Debian packages (word lists, translated man pages), generated stand-in
text, the character n-gram naive Bayes baseline, the packer and the demo. Its tokenizer is
``unipred.tokenizers.text``; its recipes ``configs/text``."""

from unipred.tasks.text import tasks  # noqa: F401 (registrations)

from unipred.base.registry import COMMANDS

COMMANDS.add("data pack-text", "unipred.tasks.text.pack")
COMMANDS.add("demo text", "unipred.tasks.text.demo")
