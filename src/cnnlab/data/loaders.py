"""DataLoaders: the training loader every task uses, and evaluation loaders.

With several processes (torchrun), each loads its own shard of the training split in
batches of batch_size / processes, so ``batch_size`` stays the number of images per
optimizer step; only the main process evaluates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

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
    return DataLoader(
        dataset,
        batch_size=per_process,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


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
