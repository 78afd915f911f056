"""The image modality: readers (folders, shards, device-side JPEG decoding), transforms, the
packer, classification and pretraining tasks, UperNet segmentation, Fashion-MNIST, the demo and
attention maps. Its tokenizer is ``unipred.tokenizers.image``; its recipes ``configs/image``."""

from unipred.tasks.image import debug, fashion_mnist, segment, tasks  # noqa: F401 (registrations)

from unipred.base.registry import COMMANDS

COMMANDS.add("demo image", "unipred.tasks.image.demo")
COMMANDS.add("data pack-images", "unipred.tasks.image.pack")
COMMANDS.add("data pack-segmentation", "unipred.tasks.image.seg_data")
COMMANDS.add("visualize", "unipred.tasks.image.visualize")
