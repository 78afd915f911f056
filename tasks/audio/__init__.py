"""The audio modality: clip readers (folders, CSV lists, shards), the packer, pretraining and
classification tasks, generated sound events for segmentation, the spoken-digit data and
demo. Its tokenizer is ``unipred.tokenizers.audio``; its recipes ``configs/audio``. Decoding
needs the ``audio`` extra (torchaudio, torchcodec), imported only when audio is used."""

from unipred.tasks.audio import events, tasks  # noqa: F401 (registrations)

from unipred.base.registry import COMMANDS

COMMANDS.add("demo audio", "unipred.tasks.audio.demo")
COMMANDS.add("data pack-audio", "unipred.tasks.audio.pack")
