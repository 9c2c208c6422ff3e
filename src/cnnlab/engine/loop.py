"""The training loop for every task, read top to bottom in ``fit``.

What differs between tasks lives in a task object (``cnnlab.engine.task.Task``; the model's
registry entry names the task). Everything a run produces goes to its run folder, each
file written atomically, so a crash or a SIGKILL never leaves a half-written file and
``resume`` continues exactly where the last completed epoch left off.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler

import cnnlab.engine.distributed as distributed
import cnnlab.engine.state as state
from cnnlab import __version__, checkpoint, plots, transfer
from cnnlab.config import DEFAULT_WEIGHT_DECAY, TrainConfig, default_of, make_config
from cnnlab.device import CpuPlan, cpu_plan, pick_device, threads_for
from cnnlab.engine.optim import amp_dtype, ema_model, make_optimizer, warmup_cosine
from cnnlab.engine.progress import Reporter, short_float
from cnnlab.engine.step import Step, train_epoch
from cnnlab.engine.task import Task
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.files import read_yaml, sha256_of, write_json, write_yaml
from cnnlab.models.factory import create_model, model_info
from cnnlab.registry import check_input_size
from cnnlab.tasks import task_class

_RANK_SEED_STRIDE = 1_000_003  # keeps the processes' per-epoch seeds apart (a prime)
RESUME_OVERRIDES = ("device", "threads", "workers", "quiet")  # what a resumed run may change
BATCH_PICTURES = 16  # training images shown in batch.png


# ---------------------------------------------------------------------------- entry points


def train(
    cfg: TrainConfig | str | Path,
    out: str | Path | None = None,
    *,
    task: str | None = None,
    **settings: Any,
) -> dict:
    """Train into the new run folder ``cfg.out`` and return the final report.

    ``cfg`` is a TrainConfig, or the data folder with ``out`` and TrainConfig fields as
    ``settings`` (``train("data/dogs", "runs/dogs", model="resnet18", epochs=20)``), over
    the task's defaults (``cnnlab.config.TASK_DEFAULTS``). The model's registry entry
    decides the task; with ``task`` given, a model of another task is refused.

    The folder receives config.yaml, split.json, model.json and batch.png (a training
    batch as the model sees it) first, then metrics.csv,
    last.pt and best.safetensors after every epoch, and at the end report.json (test
    split, or val when there is none), curves.png and the task's own plots. Ctrl-C stops
    training and still reports on the best weights when an epoch has completed. Launched
    by torchrun as several processes, they train together (see
    ``cnnlab.engine.distributed``) and every one of them returns the report.
    """
    if not isinstance(cfg, TrainConfig):
        if out is None:
            raise CnnlabError("train needs the data folder and out, the run folder to create")
        model = settings.get("model") or default_of(task or "classify", "model")
        cfg = make_config(task or model_info(model).task, data=str(cfg), out=str(out), **settings)
    elif out is not None or settings:
        raise CnnlabError("train takes a TrainConfig alone, or a data folder with settings")
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise CnnlabError(f"{run_dir} is a file; --out needs a folder")
    data = Path(cfg.data).absolute()
    if run_dir.absolute().resolve().is_relative_to(data.resolve()):
        raise CnnlabError(f"{run_dir}: --out lies inside the data folder {data}; choose another")
    kind = _task_of(cfg.model, task)
    created = not run_dir.exists()
    try:
        return _train_new(cfg, run_dir, data, kind)
    except BaseException:
        # A run refused before it wrote anything leaves no empty folder behind.
        main = distributed.is_main_process()
        if main and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise


def _train_new(cfg: TrainConfig, run_dir: Path, data: Path, kind: Any) -> dict:
    # One process owns the folder from here on (under torchrun, the main one): two runs
    # started together on one --out cannot both pass the checks below.
    with state.run_lock(run_dir) if distributed.is_main_process() else nullcontext():
        if checkpoint.is_run_dir(run_dir):
            raise CnnlabError(f"{run_dir} already holds a run; use --resume or another --out")
        if run_dir.is_dir() and any(p.name != state.LOCK_NAME for p in run_dir.iterdir()):
            raise CnnlabError(
                f"{run_dir} is not empty and holds no run; --out takes a new or empty folder"
            )
        # An absolute data path keeps config.yaml and split.json valid from any directory.
        cfg = replace(cfg, data=str(data))
        if cfg.weight_decay is None:
            cfg = replace(cfg, weight_decay=DEFAULT_WEIGHT_DECAY[cfg.optimizer])
        cfg, job = kind.setup(cfg)
        given = cfg.model_args.get("num_classes", len(job.classes))
        if given != len(job.classes):
            raise CnnlabError(
                f"num_classes is {given} but {job.splits.root} has {len(job.classes)} classes;"
                " leave num_classes out (it follows the data)"
            )
        if cfg.weights is not None:
            path = transfer.resolve_weights(cfg.model, cfg.weights)
            cfg = replace(cfg, weights_file=str(path), weights_sha256=sha256_of(path))
        # Joining the group waits for every process, so all have checked --out before the
        # main one writes into it.
        with distributed.session(pick_device(cfg.device).type):
            return fit(cfg, run_dir, job, None)


def resume(run_dir: str | Path, task: str | None = None, **overrides: Any) -> dict:
    """Continue the run in ``run_dir`` from its last completed epoch and return the report.

    Uses RUN/config.yaml, RUN/split.json (never re-splits) and RUN/last.pt (model,
    optimizer, scheduler, scaler, best, patience counter, RNG states, per-epoch history).
    ``overrides`` may change the settings that do not define the run (``RESUME_OVERRIDES``;
    None keeps the saved value, as an unset command-line flag). With ``task`` given, a run
    of another task is refused.
    """
    run_dir = checkpoint.require_run_dir(run_dir)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if set(overrides) - set(RESUME_OVERRIDES):
        raise CnnlabError(f"resume can only change {', '.join(RESUME_OVERRIDES)}")
    meta = checkpoint.read_model_json(run_dir)
    if task is not None and meta.task != task:
        raise CnnlabError(f"{run_dir} holds a {meta.task} run, not a {task} run")
    config = run_dir / "config.yaml"
    saved = read_yaml(config)
    if not isinstance(saved, dict):
        raise CnnlabError(f"{config}: not a mapping of settings")
    try:
        cfg = TrainConfig.from_dict({**saved, **overrides, "out": str(run_dir)})
    except CnnlabError as error:
        raise CnnlabError(f"{config}: {error}") from None
    with state.run_lock(run_dir) if distributed.is_main_process() else nullcontext():
        cfg, job = task_class(meta.task).setup(cfg, run_dir / "split.json")
        last = run_dir / "last.pt"
        saved_state = checkpoint.load_state(last) if last.is_file() else None
        with distributed.session(pick_device(cfg.device).type):
            return fit(cfg, run_dir, job, saved_state)


def _task_of(model: str, wanted: str | None) -> Any:
    info = model_info(model)
    if wanted is not None and info.task != wanted:
        raise CnnlabError(
            f"{model} is a {info.task} model, not a {wanted} model (`cnnlab models` lists"
            " each model's task)"
        )
    return task_class(info.task)


def build_model(cfg: TrainConfig, task: Task, pretrained: bool) -> tuple[nn.Module, dict]:
    """The model for ``task``'s classes and the create_model arguments that rebuild it
    (model.json's ``model_args``).

    ``weights`` and the ``backbone_weights`` of ``model_args`` are read for a fresh run
    only (``pretrained``) and left out of the arguments: best.safetensors holds every
    weight. The image size is checked against what the built model accepts."""
    info = model_info(cfg.model)
    args: dict[str, Any] = {"num_classes": len(task.classes), "in_channels": cfg.in_channels}
    if info.takes_img_size:
        args["img_size"] = cfg.img_size
    args.update(cfg.model_args)
    backbone_weights = args.pop("backbone_weights", None)
    weights = {"weights": cfg.weights_file or cfg.weights, "backbone_weights": backbone_weights}
    model = create_model(cfg.model, **(weights if pretrained else {}), **args)
    check_input_size(model, cfg.img_size, cfg.img_size, "images (img_size)")
    return model, args


def model_meta(cfg: TrainConfig, task: Task, model_args: dict) -> checkpoint.ModelMeta:
    """What model.json records: the model, its classes, input size and normalisation."""
    return checkpoint.ModelMeta(
        task=task.name,
        architecture=cfg.model,
        model_args=model_args,
        classes=list(task.classes),
        input_size=[cfg.in_channels, cfg.img_size, cfg.img_size],
        mean=list(task.mean),
        std=list(task.std),
        cnnlab_version=__version__,
    )


# ---------------------------------------------------------------------------- the loop


def fit(cfg: TrainConfig, run_dir: Path, task: Task, saved: dict | None) -> dict:
    """Train ``task`` with ``cfg`` into ``run_dir``, from scratch or from the ``saved``
    last.pt state, and return the report of the best weights. Torch's thread count is the
    CPU rule's (``cnnlab.device.cpu_plan``) while it trains, the caller's again after."""
    ctx = distributed.context()
    device_type = pick_device(cfg.device).type
    plan = cpu_plan(cfg.threads, cfg.workers, device_type, local_processes(ctx))
    with threads_for(plan.threads):
        return _fit(cfg, run_dir, task, saved, plan)


def _fit(cfg: TrainConfig, run_dir: Path, task: Task, saved: dict | None, plan: CpuPlan) -> dict:
    ctx = distributed.context()
    main = ctx.main  # only the main process evaluates, writes the run folder and prints
    device = distributed.local_device(pick_device(cfg.device), ctx)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if not task.splits.val:
        raise CnnlabError(f"{cfg.data}: no validation images; raise val_split or add val/")
    state.seed_everything(cfg.seed)
    generator = torch.Generator()  # reseeded every epoch: shuffling is epoch-determined
    # config.yaml keeps the user's threads/workers (None: the rule, decided again on resume).
    train_loader, val_data, test_data = task.loaders(
        replace(cfg, workers=plan.workers), generator, device, ctx.rank, ctx.world_size
    )

    # Model, optimizer, schedule, mixed precision.
    model, model_args = build_model(cfg, task, pretrained=saved is None)
    model.to(device)
    memory_format = torch.preserve_format
    if cuda and task.channels_last:
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
    if cfg.freeze_backbone:
        transfer.freeze_backbone(model)  # before the optimizer, which takes trainable ones
    optimizer = make_optimizer(model, cfg)
    per_step = cfg.lr_interval == "step"
    steps = len(train_loader) if per_step else 1  # scheduler steps per epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, cfg.warmup_epochs * steps, cfg.epochs * steps),
    )
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # With --ema the average is the model that is evaluated, kept as best and reported.
    ema = ema_model(model, cfg.ema) if cfg.ema is not None else None
    evaluated = ema.module if ema is not None else model

    # Where we start: a fresh run writes its description, a resumed one restores its state.
    start_epoch, best, stale, history = 0, None, 0, []
    if saved is None:
        if main:
            write_yaml(run_dir / "config.yaml", asdict(cfg))
            write_json(run_dir / "split.json", task.splits.to_json())
            checkpoint.save_model_json(run_dir, model_meta(cfg, task, model_args))
    else:
        state.restore(saved, run_dir / "last.pt", model, optimizer, scheduler, scaler, ema=ema)
        start_epoch, best = saved["epoch"], saved["best"]
        stale, history = saved["epochs_without_improvement"], saved["history"]
        if main:
            state.sync_epoch_files(run_dir, history, best, evaluated, task.columns)
    # Trains through the wrapper (which averages gradients over processes); saves, loads and
    # evaluates ``model`` itself, whose parameters it shares.
    net = distributed.wrap(model, device, ctx)
    step = Step(net, task, optimizer, scaler, device, dtype, cfg.grad_clip, memory_format, ema)

    if saved is None and main:
        # Each epoch reseeds every generator, so looking at a batch here changes nothing.
        images, targets = next(iter(train_loader))
        plots.plot_pictures(
            task.batch_pictures(images[:BATCH_PICTURES], targets),
            run_dir / "batch.png",
            f"a training batch as the model sees it ({', '.join(batch_recipe(cfg))})",
        )
    say = Reporter(cfg.quiet or not main, task.score_label)
    say.line(setup_line(cfg, task, model, device, ctx.world_size, plan))
    if start_epoch:
        say.line(f"resuming {run_dir} after epoch {start_epoch} of {cfg.epochs}")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience is not None and stale >= cfg.patience:
                say.line(f"early stop: no better {task.best_label} for {stale} epochs")
                break
            # Each process augments its shard with its own random numbers.
            state.seed_everything(cfg.seed * 1000 + epoch + _RANK_SEED_STRIDE * ctx.rank)
            generator.manual_seed(cfg.seed * 1000 + epoch)
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)  # a new shuffle, the same on every rank
            model.train()
            if cfg.freeze_backbone:
                transfer.backbone_norms_eval(model)
            started = time.perf_counter()
            say.start(f"epoch {epoch + 1}/{cfg.epochs}", len(train_loader))
            seen, loss_sum, right, scored, lr = train_epoch(
                step, train_loader, scheduler if per_step else None, say
            )
            if not per_step:
                scheduler.step()
            say.stop()
            # The whole data's numbers: sums over every process's shard.
            seen_all, loss_sum, right, scored = distributed.sum_across(
                torch.tensor(seen, device=device), loss_sum, right, scored
            )
            seen = int(seen_all.item())
            if seen == 0:
                raise CnnlabError(f"{cfg.data}: no readable training images")
            train_loss = (loss_sum / seen).item()
            if not math.isfinite(train_loss):
                raise CnnlabError(
                    f"the training loss became {train_loss} in epoch {epoch + 1};"
                    " lower the learning rate (--lr) and start again"
                )
            train_seconds = time.perf_counter() - started

            # The main process validates on the full set while the others wait.
            val = public(task.evaluate(evaluated, val_data, device, dtype)) if main else None
            val = distributed.from_main(val)
            improved = best is None or task.rank(val) > tuple(best["rank"])
            if improved:
                best = {"rank": list(task.rank(val)), "epoch": epoch + 1}
            stale = 0 if improved else stale + 1
            train_score = right.item() / scored.item() if task.score_label else None
            history.append(
                {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": train_loss,
                    **task.epoch_row(train_score, val),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            if main:
                with state.hold_ctrl_c():
                    checkpoint.save_state(
                        run_dir / "last.pt",
                        {
                            "epoch": epoch + 1,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "best": best,
                            "epochs_without_improvement": stale,
                            "history": history,
                            "rng": state.rng_state(),
                            **({"ema": ema.state_dict()} if ema is not None else {}),
                        },
                    )
                    state.sync_epoch_files(run_dir, history, best, evaluated, task.columns)
            row = history[-1]
            say.line(
                f"epoch {row['epoch']}/{cfg.epochs}  {task.epoch_line(row)}"
                f"  lr {short_float(row['lr'])}  {seen / train_seconds:.0f} img/s"
            )
    except KeyboardInterrupt:
        if not history:
            raise CnnlabError(
                f"interrupted before the first epoch finished; {run_dir} has no weights yet"
                " (start again with --resume)"
            ) from None
        say.stop()
        say.line(f"interrupted: reporting on the best weights (epoch {best['epoch']})")
        interrupted = True
    else:
        interrupted = False
    finally:
        say.stop()  # never leave a live progress display behind an error

    # Final report on the best weights, read back from the file a user will load.
    report = None
    if main:
        checkpoint.load_weights(run_dir / "best.safetensors", model)
        fitted = task.after_training(model, device, say.line)
        if fitted is not None:
            say.line(fitted)
            checkpoint.save_weights(
                run_dir / "best.safetensors", model, metadata={"epoch": str(best["epoch"])}
            )
        split, result = task.finish(model, val_data, test_data, device, dtype, run_dir)
        report = {"split": split, "best_epoch": best["epoch"], **public(result)}
        write_json(run_dir / "report.json", report)
        plots.plot_curves(
            run_dir / "metrics.csv", run_dir / "curves.png", task.curves, best["epoch"]
        )
        # The figures themselves are the caller's to print (the CLI: on stdout).
        say.line(f"best weights: epoch {best['epoch']}; report, weights and plots in {run_dir}")
    report = distributed.from_main(report)
    if interrupted:
        raise TrainingInterrupted(str(run_dir), history[-1]["epoch"], cfg.epochs, report)
    return report


def local_processes(ctx: distributed.Context) -> int:
    """How many training processes share this machine's cores (torchrun's
    LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


def setup_line(
    cfg: TrainConfig,
    task: Task,
    model: nn.Module,
    device: torch.device,
    processes: int,
    plan: CpuPlan | None = None,
) -> str:
    """What is about to train, before the first epoch: the split, the model, the device."""
    splits = task.splits
    sizes = [f"{len(splits.train):,} train", f"{len(splits.val):,} val"]
    if getattr(splits, "test", None):
        sizes.append(f"{len(splits.test):,} test")
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted = f"{params:,} parameters" + (
        f" ({trainable:,} trainable)" if trainable != params else ""
    )
    plan = plan or cpu_plan(cfg.threads, cfg.workers, device.type)
    where = f"{device.type if device.type == 'cpu' else device} ({plan.describe()})"
    if processes > 1:
        where = f"{processes} processes on {device.type}"
    line = (
        f"{' / '.join(sizes)} images, {len(task.classes)} classes; {cfg.model}, {counted};"
        f" {where}; {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
        f" of batches of {cfg.batch_size}"
    )
    if cfg.batch_size > len(splits.train):
        line += f" (more than the {len(splits.train)} training images: one step per epoch)"
    recipe = batch_recipe(cfg)[1:]
    if cfg.ema is not None:
        recipe.append(f"the weights' moving average (decay {cfg.ema:g}) evaluated")
    return line + "".join(f"; {part}" for part in recipe)


def batch_recipe(cfg: TrainConfig) -> list[str]:
    """What makes a training batch, in words: the augmentation, then any batch mixing."""
    mixes = (("mixup", cfg.mixup), ("cutmix", cfg.cutmix))
    return [f"augment {cfg.augment}", *(f"{name} {alpha:g}" for name, alpha in mixes if alpha)]


def public(result: dict) -> dict:
    """An evaluation result without its private (plot) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
