"""``PromptDataModule``: prompts (with ground truths) for training, validation and testing.

Batches are plain lists of :class:`Example`; the module renders them with its own tokenizer's chat template.
The training stream is deterministic from the seed, split across ranks by prompt (so all rollouts of a
prompt stay on one rank), and resumable mid-epoch: the number of batches consumed is saved in checkpoints.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset

from .domains import get_domain
from ..config import ConfigError
from .example import DataError, Example, UnusedRow
from .sources import check_source, iter_rows

log = logging.getLogger(__name__)


class PromptStream(IterableDataset):
    """Yields this rank's batches of one epoch, continuing from ``consumed`` global batches.

    Epoch ``e`` is a permutation of the examples seeded by ``seed + e``; each global batch holds
    ``batch_size * world_size`` prompts, and rank ``r`` takes the ``r``-th slice.
    """

    def __init__(self, examples: List[Example], batch_size: int, seed: int, shuffle: bool,
                 rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.consumed = 0
        self.batches_per_epoch = len(examples) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"data.batch_size={batch_size} on {world_size} device(s) needs at least "
                            f"{batch_size * world_size} training prompts; the training set has {len(examples)}")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[List[Example]]:
        epoch, offset = divmod(self.consumed, self.batches_per_epoch)
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        global_batch = self.batch_size * self.world_size
        for b in range(offset, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            yield [self.examples[i] for i in order[start:start + self.batch_size]]


@dataclass
class SourceCounts:
    """What became of the rows of one split's source, so that no row is left out without being reported."""

    source: str
    used: int = 0
    invalid: int = 0  # malformed rows left out under data.skip_invalid
    first_invalid: str = ""  # where and why the first of them failed, so the user can look
    unused: Counter = field(default_factory=Counter)  # well-formed rows the verifier cannot score, by kind

    def describe(self) -> str:
        text = f"{self.source}: {self.used} rows used"
        if self.unused:
            by_count = sorted(self.unused.items(), key=lambda item: (-item[1], item[0]))
            kinds = ", ".join(f"{kind} {n}" for kind, n in by_count)
            text += f", {sum(self.unused.values())} of kinds this domain does not use ({kinds})"
        if self.invalid:
            text += f", {self.invalid} invalid rows skipped (data.skip_invalid; the first: {self.first_invalid})"
        return text


def _collate(batch: List[Example]) -> List[Example]:
    return batch


class PromptDataModule(pl.LightningDataModule):
    def __init__(
        self,
        domain: str = "sci",
        train: str = "embedded",
        val: Optional[str] = "embedded",
        test: Optional[str] = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        num_train: Optional[int] = None,
        num_val: Optional[int] = None,
        num_test: Optional[int] = None,
        batch_size: int = 4,
        val_batch_size: int = 8,
        system_prompt: Optional[str] = None,
        skip_invalid: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ):
        """
        Args:
            domain: task family (``sci``, ``math``, ``code``, ``tool``; ``facts``, ``facts_few`` and
                ``facts_named``, the invented-fact controls); picks the embedded data, the row format and the
                verifier. Rows in the verl layout (``prompt``, ``reward_model``) load in every domain.
            train: ``embedded`` (the generated data packaged with the domain), a local JSONL/JSON/parquet
                file or folder, or a Hugging Face hub dataset name (``name`` or ``name:config``).
            val: like ``train``; ``holdout`` takes ``num_val`` prompts out of the training data; null for none.
            test: like ``train``; used by ``mopd test``.
            train_split: split name for hub datasets (``train``).
            val_split: split name for hub datasets (``validation``).
            test_split: split name for hub datasets (``test``).
            num_train: keep at most this many training prompts (seeded choice); null keeps all.
            num_val: validation prompts (at most); with ``val: holdout`` the number held out (default 100).
            num_test: test prompts (at most); null keeps all.
            batch_size: prompts per optimizer step on each device; each prompt yields a group of rollouts.
            val_batch_size: prompts per validation batch on each device.
            system_prompt: optional system message put before every question.
            skip_invalid: leave out malformed dataset rows (counted and logged) instead of failing on the first.
                Well-formed rows of a kind the domain cannot score (SciKnowEval ``open-ended-qa``, ...) are always
                left out and counted by kind; see :meth:`summary`.
            shuffle: shuffle training prompts each epoch (seeded).
            seed: seed for shuffling and subsampling; the same seed gives the same order.
        """
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ConfigError("data.batch_size and data.val_batch_size must be at least 1")
        self.domain = get_domain(domain)
        for field, source in (("train", train), ("val", val), ("test", test)):
            if source not in (None, "embedded", "holdout"):
                check_source(f"data.{field}", source)
        for field, source in (("train", train), ("test", test)):
            if source == "holdout":
                raise ConfigError(f"data.{field} cannot be 'holdout'; only data.val can")
        self.train_source, self.val_source, self.test_source = train, val, test
        self.splits = {"train": train_split, "validation": val_split, "test": test_split}
        self.limits = {"train": num_train, "validation": num_val, "test": num_test}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.system_prompt, self.skip_invalid, self.shuffle, self.seed = system_prompt, skip_invalid, shuffle, seed
        self.datasets: Dict[str, List[Example]] = {}
        self.counts: Dict[str, SourceCounts] = {}
        self._train_stream: Optional[PromptStream] = None
        self._restored_consumed = 0

    # -- loading --------------------------------------------------------------------------------------------
    def load(self, split: str, source: str) -> List[Example]:
        """Examples of one split from ``source``. A malformed row raises, naming its file and line (or dataset,
        split and index), unless ``skip_invalid``; rows of kinds the domain cannot score are counted by kind."""
        if source == "embedded":
            return self.domain.embedded(split, self.seed, self.system_prompt)
        examples, counts = [], SourceCounts(source)
        for row_id, row in iter_rows(source, self.splits[split]):
            try:
                examples.append(self.domain.from_row(row, row_id, self.system_prompt))
            except UnusedRow as unused:
                counts.unused[unused.kind] += 1
            except DataError as error:
                if not self.skip_invalid:
                    raise DataError(f"{row_id}: {error} (to leave out such rows and count them, pass "
                                    f"--data.skip_invalid true)") from None
                counts.invalid += 1
                counts.first_invalid = counts.first_invalid or f"{row_id}: {error}"
        counts.used = len(examples)
        self.counts[split] = counts
        level = logging.WARNING if counts.unused or counts.invalid else logging.INFO
        log.log(level, "%s rows from %s", split, counts.describe())
        if not examples:
            raise DataError(f"{source} gave no usable {split} examples ({counts.describe()})")
        return examples

    @property
    def skipped(self) -> Dict[str, int]:
        """Invalid rows left out per split (``data.skip_invalid``)."""
        return {split: counts.invalid for split, counts in self.counts.items()}

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """Per split: the prompts it holds and, for a file or hub source, how its rows were used, left out as
        invalid, or counted as unused by kind. ``val: holdout`` prompts are counted in the train source's rows."""
        report = {}
        for split in self.splits:
            if split not in self.datasets:
                continue
            entry: Dict[str, Any] = {"prompts": len(self.datasets[split])}
            counts = self.counts.get(split)
            if counts is not None:
                entry.update(source=counts.source, rows_used=counts.used, rows_invalid=counts.invalid,
                             rows_unused=dict(counts.unused))
            report[split] = entry
        return report

    def _limit(self, examples: List[Example], limit: Optional[int]) -> List[Example]:
        if limit is None or limit >= len(examples):
            return examples
        return random.Random(self.seed).sample(examples, limit)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load what ``stage`` uses: training prompts for fit, validation prompts for fit, validate and predict
        (``mopd analyze``), test prompts for test. ``val: holdout`` carves validation out of the training data."""
        needs_val = stage in (None, "fit", "validate", "predict") and self.val_source is not None
        if "train" not in self.datasets and (stage in (None, "fit") or (needs_val and self.val_source == "holdout")):
            train = self.load("train", self.train_source)
            if self.val_source == "holdout":
                order = random.Random(self.seed).sample(range(len(train)), len(train))
                held = set(order[: self.limits["validation"] or 100])
                self.datasets["validation"] = [e for i, e in enumerate(train) if i in held]
                train = [e for i, e in enumerate(train) if i not in held]
            self.datasets["train"] = self._limit(train, self.limits["train"])
        if needs_val and "validation" not in self.datasets:
            examples = self.load("validation", self.val_source)
            self.datasets["validation"] = self._limit(examples, self.limits["validation"])
        if stage in (None, "test") and self.test_source and "test" not in self.datasets:
            self.datasets["test"] = self._limit(self.load("test", self.test_source), self.limits["test"])
        log.info("prompts: %s", ", ".join(f"{split} {len(self.datasets[split])}" for split in self.splits
                                          if split in self.datasets))

    # -- loaders --------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        world_size = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        self._train_stream = PromptStream(self.datasets["train"], self.batch_size, self.seed, self.shuffle,
                                          rank, world_size)
        self._train_stream.consumed = self._restored_consumed
        return DataLoader(self._train_stream, batch_size=None)

    def val_dataloader(self) -> DataLoader | List:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | List:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | List:
        """The validation prompts: ``mopd analyze`` informs choices, so it never looks at the test split."""
        return self._eval_loader("validation")

    def _eval_loader(self, split: str):
        if split not in self.datasets:
            return []
        return DataLoader(self.datasets[split], batch_size=self.val_batch_size, shuffle=False, collate_fn=_collate)

    def draw_prompts(self, count: int, key: str, exclude: Set[str]) -> List[Example]:
        """``count`` training prompts for an extra sampling round (dynamic sampling), seeded by ``key`` alone, so
        a resumed run draws the same. Each rank draws from its own share of the prompts (rollouts of a prompt stay
        on one rank); prompts already in the step (``exclude``, by id) are not drawn again."""
        world_size = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        share = [e for i, e in enumerate(self.datasets["train"]) if i % world_size == rank and e.id not in exclude]
        return random.Random(key).sample(share, min(count, len(share)))

    # -- resumable position ---------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self._train_stream is not None:
            self._train_stream.consumed += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"train_batches_consumed": self._train_stream.consumed if self._train_stream else 0}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._restored_consumed = int(state_dict.get("train_batches_consumed", 0))
