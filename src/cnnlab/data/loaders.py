"""DataLoaders: the training loader every task uses, and evaluation loaders.

With several processes (torchrun), each loads its own shard of the training split in
batches of batch_size / processes, so ``batch_size`` stays the number of images per
optimizer step; only the main process evaluates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from cnnlab.errors import CnnlabError

SMALL_LAST_BATCH = 0.1  # a partial last batch below this share of the epoch is dropped


def per_process_batch(batch_size: int, processes: int) -> int:
    """The batch each of ``processes`` loads so that together they make ``batch_size``."""
    if batch_size % processes:
        raise CnnlabError(
            f"batch_size {batch_size} does not split evenly over {processes} processes"
            " (it counts the images of one optimizer step, over all processes)"
        )
    return batch_size // processes


def train_loader(
    dataset: Dataset,
    batch_size: int,
    generator: torch.Generator,
    collate_fn: Callable,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """Shuffled by ``generator`` (or drawn by ``sampler``), sharded over the processes of a
    distributed run (``rank`` of ``world_size``, shuffled by ``seed`` and the epoch)."""
    per_process = per_process_batch(batch_size, world_size)
    if sampler is None and world_size > 1:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    # A partial last batch is dropped where it is a small share of the epoch (under a
    # tenth: a step on a few images is mostly noise, and the shuffle drops other images
    # next epoch) or a single image, which BatchNorm cannot train on. Otherwise it trains:
    # 93 images in batches of 64 make two steps, not one. Every process has as many
    # images (the sampler pads), hence as many steps.
    shard = len(sampler) if sampler is not None else len(dataset)
    rest = shard % per_process
    drop_last = shard > per_process and (rest == 1 or rest < SMALL_LAST_BATCH * shard)
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=per_process,
        sampler=SeededSampler(sampler, generator, rank),
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=SeededCollate(collate_fn),
    )


# Repeatable augmentation. Each training sample draws its random numbers from a generator
# seeded for it alone (the seed drawn in the main process from the epoch's generator, with
# the shuffle), and each batch's collate (MixUp, CutMix) from the seed of its first sample.
# Which worker process loads a sample, and how many there are, then changes no number:
# --workers 0 and --workers 2 train to the same weights, and the main process's generator
# (dropout, initialisation) never sees the augmentation's draws.


def seed_cpu(seed: int) -> None:
    """Seed torch's CPU generator, the one augmentation draws from (``fork_rng(devices=[])``
    restores only it). Not ``torch.manual_seed``: that also seeds the CUDA, XPU and MTIA
    generators, and before CUDA is initialised each of those records the caller's stack
    (``traceback.format_stack``) for a lazy call: 0.2-0.6 ms a sample, 13 s of the demo's
    25,000 samples, against 7 us for the CPU generator alone."""
    torch.default_generator.manual_seed(seed)


class SeededSampler(Sampler):
    """``(index, seed)`` for each index ``sampler`` yields, the seeds drawn from
    ``generator`` once the epoch's order is drawn (``rank`` keeps processes' seeds apart)."""

    def __init__(self, sampler: Sampler, generator: torch.Generator, rank: int = 0) -> None:
        self.sampler, self.generator, self.rank = sampler, generator, rank

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """A distributed sampler's shuffle of ``epoch`` (the same on every rank)."""
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        seeds = torch.randint(0, 2**62, (len(indices),), generator=self.generator).tolist()
        for index, seed in zip(indices, seeds, strict=True):
            yield index, seed + self.rank


class SeededDataset(Dataset):
    """``dataset[index]`` made under torch's generator seeded with ``seed``, as
    ``(seed, item)``; the caller's generator state is left as it was."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            seed_cpu(seed)
            return seed, self.dataset[index]


class SeededCollate:
    """``collate_fn`` of a batch of ``SeededDataset`` items, under torch's generator seeded
    with its first item's seed. A class, not a closure, so worker processes can unpickle
    it."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch: list[tuple[int, Any]]) -> Any:
        with torch.random.fork_rng(devices=[]):
            seed_cpu(batch[0][0] if batch else 0)
            return self.collate_fn([item for _, item in batch])


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """In order, every sample. Evaluation draws no random numbers, so ``persistent``
    workers can live across epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=persistent and workers > 0,
    )
