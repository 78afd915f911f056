"""The joint-pretraining demo (``unipred demo joint``): one predictor on images, audio and
video together vs each modality alone vs scratch. The task itself is modality-free and lives
in the core (``unipred.task.joint``); this package only holds the demo, which uses the image, audio
and video modalities' recipes and data builders."""

from unipred.base.registry import COMMANDS

COMMANDS.add("demo joint", "unipred.tasks.joint.demo")
