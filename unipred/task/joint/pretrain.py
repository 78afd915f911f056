"""``joint_pretrain``: the task that trains one predictor on several sources."""

from __future__ import annotations

import torch

from unipred.base.registry import TASKS
from unipred.task.joint.data import JointCollate, JointData, JointStream, build_sources
from unipred.task.pretrain import PretrainTask, collapse_stats


# ---------------------------------------------------------------------------------- task
@TASKS.register("joint_pretrain")
class JointPretrain(PretrainTask):
    """Joint next-embedding pretraining: several sources (modalities), one predictor."""

    data_config = JointData

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sources = build_sources(cfg)
        self._pending: set[str] = set()  # sources owed collapse statistics
        self._asked = False

    @classmethod
    def check_config(cls, cfg) -> None:
        d = cfg.data
        if d.interleave not in ("smooth", "random"):
            raise ValueError(f"data.interleave={d.interleave!r}: use smooth or random")
        if d.space < 1:
            raise ValueError(f"data.space={d.space} must be >= 1")
        if cfg.model.tokenizer or cfg.model.tokenizer_args:
            raise ValueError(
                "model.tokenizer / model.tokenizer_args: a joint model's tokenizers are its "
                "sources' (data.sources.NAME.model.tokenizer_args)"
            )
        if cfg.model.objective.target == "patch":
            raise ValueError(
                "model.objective.target=patch: raw patches differ in size between sources; "
                "joint pretraining predicts embeddings or layers"
            )
        t = cfg.trainer
        if t.strategy == "ddp" and not t.find_unused_parameters:
            raise ValueError(
                "joint_pretrain under DDP: set trainer.find_unused_parameters=true (a batch "
                "uses one source's tokenizer, the others get no gradient)"
            )
        if t.strategy == "fsdp":
            raise ValueError("joint_pretrain: trainer.strategy=fsdp is not supported; use ddp")
        build_sources(cfg)  # each source's own config and checks, errors naming the source

    @classmethod
    def smoke_config(cls):
        return {"data.sources": {"a": {"task": "fmnist_pretrain", "data": {"generated_samples": 8},
                                       "model": {"tokenizer_args": {"in_chans": 1, "patch_size": 7}}},
                                 "b": {"task": "video_pretrain", "data": {"image_size": 8, "num_frames": 4, "train_samples": 8, "val_samples": 4, "num_workers": 0},
                                       "model": {"name": "nepa_video_debug"}}},
                "model.name": "nepa_debug", "trainer.global_batch": 4}  # fmt: skip

    # -- model ------------------------------------------------------------------------------
    def tokenizer_specs(self) -> dict:
        """name -> {tokenizer, args, axes}: what each source task's own model would use (its
        build_model, so adjustments it makes, e.g. the audio sample rate, carry over)."""
        mc = self.model_config(head="none")
        pc = mc.predictor
        specs = {}
        for s in self.sources:
            scfg = s.task.cfg
            p = scfg.model.predictor
            p.dim, p.heads, p.depth = pc.dim, pc.heads, 1  # only the tokenizer is kept
            smc = s.task.build_model().cfg
            specs[s.name] = {"tokenizer": smc.tokenizer, "args": dict(smc.tokenizer_args),
                             "axes": s.axes}  # fmt: skip
        return specs

    def build_model(self):
        import dataclasses

        from unipred.nn.model import NEPA

        d = self.cfg.data
        mc = self.model_config(head="none")
        args = {"sources": self.tokenizer_specs(), "space": d.space,
                "modality_embedding": d.modality_embedding}  # fmt: skip
        mc = dataclasses.replace(mc, tokenizer="joint", tokenizer_args=args)
        mc.predictor = dataclasses.replace(mc.predictor, coord_dims=d.space)
        return NEPA(mc)

    # -- data -------------------------------------------------------------------------------
    def build_dataset(self, split):
        from unipred.train.config import batch_plan

        names, sets, weights = [], [], []
        for s in self.sources:
            ds = s.task.build_dataset(split)
            if ds is None:
                continue
            if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
                raise ValueError(
                    f"data.sources.{s.name}: its {split} data is a stream "
                    f"({type(ds).__name__}); joint pretraining reads map-style sources "
                    "(folders, CSVs, in-memory sets) so that every source resumes exactly"
                )
            names.append(s.name)
            sets.append(ds)
            weights.append(s.weight)
        if not sets:
            return None
        plan = batch_plan(self.cfg)
        d = self.cfg.data
        return JointStream(names, sets, weights, self.cfg.seed, plan["per_device_batch"],
                           d.batches_per_epoch,
                           plan["accumulate_grad_batches"], d.interleave, split == "train")  # fmt: skip

    def collate_fn(self, split):
        return JointCollate(
            {s.name: s.task for s in self.sources},
            {s.name: s.task.collate_fn(split) for s in self.sources},
        )

    def batch_size(self, batch) -> int:
        return int(batch[1])

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, model, batch):
        x = self.inputs(batch)
        name = x["source"]
        out = model(x)
        logs = {"loss": out.loss.detach(), f"{name}/loss": out.loss.detach()}
        if self.want_stats and not self._asked:  # a new monitoring period: every source owes
            self._pending = {s.name for s in self.sources}
        self._asked = self.want_stats
        if self.want_stats or name in self._pending:  # per modality: each source's first
            self._pending.discard(name)  # batch of the period (every batch on monitored steps)
            for pre, t in (("", out.predictions), ("target_", out.targets)):
                stats = collapse_stats(t, out.valid)
                logs.update({f"collapse/{name}/{pre}{k}": v for k, v in stats.items()})
        return out.loss, logs

    def validation_step(self, model, batch, metrics):
        x = self.inputs(batch)
        loss = model(x).loss
        return {"loss": loss, f"{x['source']}/loss": loss}
