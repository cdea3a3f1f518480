"""LightningDataModule that streams fixed token windows from prepared litdata shards.

Each item is a window of `seq_len + 1` tokens: inputs are window[:-1], targets window[1:].
The train loader is a `StreamingDataLoader`; Lightning stores its state in the checkpoint's
fit loop, so a resumed run continues at the next unseen window (none repeated, none skipped).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

from tinyreason.data.conversations import ConversationsCorpus, SFTConfig
from tinyreason.data.pairs import DPOConfig, PairsCorpus
from tinyreason.data.prepare import PreparedData, prepare_data
from tinyreason.data.sources import Corpus, ReasoningCorpus


class ResumableStreamingDataLoader(StreamingDataLoader):
    """StreamingDataLoader that resumes across an epoch boundary correctly.

    After `load_state_dict`, litdata 0.2.76 keeps `restore=True` until an epoch's iterator is
    exhausted. Lightning ends an epoch after `len(loader)` batches without exhausting it, so the
    next epoch would replay the restored tail (seen: resuming at batch 5 of 7 showed batches 5-6
    twice). Once the restored epoch has yielded a batch, the next `iter()` is a fresh epoch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._restored_epoch_ran = False

    def __iter__(self):
        if self._restored_epoch_ran:
            self.restore = False
        self._restored_epoch_ran = False
        resuming = self.restore
        for batch in super().__iter__():
            self._restored_epoch_ran = resuming
            yield batch


class PretrainDataModule(L.LightningDataModule):
    def __init__(
        self,
        shard_root: str,
        seq_len: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.shard_root = Path(shard_root)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.prepared: PreparedData | None = None

    @classmethod
    def from_run(cls, run) -> PretrainDataModule:
        """The pretraining stage's data for a `RunConfig`: its tokenizer and token shards, built
        or reused from the cache (the stream, or packed conversations with loss_on=assistant)."""
        d = run.data
        corpus, window = cls.corpus_of(run), cls.window_of(run)
        prepared = prepare_data(
            corpus, run.tokenizer, run.cache_dir, window, cls.pairs, d.rebuild_damaged
        )
        datamodule = cls(str(prepared.shard_root), d.seq_len, d.batch_size, d.num_workers, run.seed)
        datamodule.prepared = prepared
        for split, stats in prepared.manifest["splits"].items():
            if stats.get("skipped_too_long") and isinstance(corpus, ReasoningCorpus):
                longest = stats["longest"]  # every v3 corpus' shards record it
                raise ValueError(
                    f"data.seq_len={d.seq_len}: {stats['skipped_too_long']} of {stats['documents']} "
                    f"conversations of the {split} split are longer than a window of "
                    f"data.seq_len + 1 = {window} tokens (the longest: {longest} tokens); set "
                    f"data.seq_len >= {longest - 1}, or shorten the "
                    "solutions (data.corpus.max_digits, data.corpus.format)"
                )
            windows = datamodule.num_windows(split)
            if windows < d.batch_size:  # the loaders drop an incomplete last batch
                raise ValueError(
                    f"the {split} split has {stats['tokens']:,} tokens: {windows} window(s) of "
                    f"data.seq_len + 1 = {d.seq_len + 1}, fewer than one batch of "
                    f"data.batch_size = {d.batch_size}; lower data.seq_len or data.batch_size, or "
                    "give it more text (data.corpus.val_fraction: the validation share)"
                )
        return datamodule

    pairs = False  # one item per window; DPODataModule: a preference pair per item

    @staticmethod
    def corpus_of(run) -> Corpus:
        return run.data.corpus

    @staticmethod
    def window_of(run) -> int | None:
        return run.data.window

    def _dataset(self, split: str, shuffle: bool) -> StreamingDataset:
        return StreamingDataset(
            str(self.shard_root / split),
            item_loader=TokensLoader(block_size=(self.seq_len + 1) * (2 if self.pairs else 1)),
            shuffle=shuffle,
            drop_last=True,
            seed=self.seed,
        )

    def num_windows(self, split: str) -> int:
        return len(self._dataset(split, shuffle=False))

    def train_dataloader(self) -> StreamingDataLoader:
        return ResumableStreamingDataLoader(
            self._dataset("train", shuffle=True),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> StreamingDataLoader:
        return StreamingDataLoader(
            self._dataset("validation", shuffle=False),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )


class SFTDataModule(PretrainDataModule):
    """`stage=sft`: conversations (`ConversationsCorpus`: the embedded corpus and `sft.files`)
    packed whole into windows of seq_len + 1, the assistant tokens flagged for the loss."""

    @staticmethod
    def corpus_of(run) -> Corpus:
        options: SFTConfig = run.stage_options
        return ConversationsCorpus(options, _stage_base(run, options))

    @staticmethod
    def window_of(run) -> int | None:
        return run.data.seq_len + 1


class DPODataModule(PretrainDataModule):
    """`stage=dpo`: preference pairs (`PairsCorpus`: the embedded corpus and `dpo.files`), each
    item [chosen window | rejected window] of seq_len + 1 tokens each, responses flagged."""

    pairs = True

    @staticmethod
    def corpus_of(run) -> Corpus:
        options: DPOConfig = run.stage_options
        return PairsCorpus(options, _stage_base(run, options))

    @staticmethod
    def window_of(run) -> int | None:
        return run.data.seq_len + 1


def _stage_base(run, options: SFTConfig | DPOConfig) -> ReasoningCorpus | None:
    """The embedded corpus a post-training stage draws on (`<stage>.corpus`), checked: it needs
    data=reasoning, and the stage needs it or `<stage>.files`."""
    name = run.stage.name
    base = run.data.corpus if options.corpus else None
    if base is not None and not isinstance(base, ReasoningCorpus):
        raise ValueError(
            f"{name}.corpus=true draws on data=reasoning, not data={run.data.name}: set "
            f"{name}.corpus=false and give {name}.files"
        )
    if base is None and not options.files:
        raise ValueError(f"stage={name} has no data: {name}.corpus=false and {name}.files=[]")
    return base
