"""The video modality: clip readers (video files, frame folders, shards), the packer,
pretraining and classification tasks, the demo. Its tokenizer is ``unipred.tokenizers.video``;
its recipes ``configs/video``. Decoding video files needs the ``video`` extra (torchcodec)."""

from unipred.tasks.video import tasks  # noqa: F401 (registrations)

from unipred.base.registry import COMMANDS

COMMANDS.add("demo video", "unipred.tasks.video.demo")
COMMANDS.add("data pack-video", "unipred.tasks.video.pack")
