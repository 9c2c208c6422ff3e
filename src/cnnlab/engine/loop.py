"""The training loop for every task, read top to bottom in ``fit``.

What differs between tasks lives in a task object (``cnnlab.engine.task.TrainingTask``);
the caller says which task (``cnnlab.training`` resolves it from the model's registry
entry), so the engine never names one. Everything a run produces goes to its run folder,
each file written atomically, so a crash or a SIGKILL never leaves a half-written file
and ``resume`` continues exactly where the last completed epoch left off.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cnnlab.engine.distributed as distributed
import cnnlab.engine.state as state
from cnnlab import checkpoint, plots, transfer
from cnnlab.config import TrainConfig
from cnnlab.data.transforms import stats_line
from cnnlab.destinations import check_destination
from cnnlab.device import threads_for
from cnnlab.engine.messages import batch_recipe, early_stop, overfitting_hint, setup_line
from cnnlab.engine.optim import ema_model, warmup_cosine
from cnnlab.engine.prepare import Prepared, Resolved, model_meta, prepare, resolve
from cnnlab.engine.progress import Reporter, short_float
from cnnlab.engine.step import Step, compile_step, train_epoch
from cnnlab.engine.task import TrainingTask
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.files import (
    LOCK_NAME,
    read_yaml,
    run_lock,
    sha256_of,
    write_json,
    write_yaml,
)

_RANK_SEED_STRIDE = 1_000_003  # keeps the processes' per-epoch seeds apart (a prime)
# What a resumed run may change.
RESUME_OVERRIDES = ("device", "threads", "workers", "compile", "quiet")
BATCH_PICTURES = 16  # training images shown in batch.png


# ---------------------------------------------------------------------------- entry points


def train(cfg: TrainConfig, task: type[TrainingTask]) -> dict:
    """Train ``task`` (a class of ``cnnlab.tasks``) with ``cfg`` into the new run folder
    ``cfg.out`` and return the final report.

    The folder receives config.yaml, split.json, model.json and batch.png (a training
    batch as the model sees it) first, then metrics.csv, last.pt and best.safetensors
    after every epoch, and at the end report.json (test split, or val when there is
    none), curves.png and the task's own plots. Ctrl-C stops training and still reports
    on the best weights when an epoch has completed. Launched by torchrun as several
    processes, they train together (see ``cnnlab.engine.distributed``) and every one of
    them returns the report; a worker group that torchrun restarted after a failure
    (``--max-restarts``) finds the run its job started in ``cfg.out`` and resumes it.
    """
    run_dir = Path(cfg.out)
    data = Path(cfg.data).absolute()
    check_destination(run_dir, "--out", [data])
    if run_dir.exists() and not run_dir.is_dir():
        raise CnnlabError(f"{run_dir} is a file; --out needs a folder")
    if _restarted_job(cfg, run_dir, data):
        # torchrun started its worker group again after a worker died: go on from last.pt.
        return resume(run_dir, task, **{key: getattr(cfg, key) for key in RESUME_OVERRIDES})
    created = not run_dir.exists()
    try:
        return _train_new(cfg, run_dir, data, task)
    except BaseException as error:
        main = distributed.is_main_process()
        if main and created and run_dir.is_dir():
            if not any(run_dir.iterdir()):
                # A run refused before it wrote anything leaves no empty folder behind.
                run_dir.rmdir()
            elif isinstance(error, OSError) and not (run_dir / "last.pt").exists():
                # A full or read-only disk before the first epoch was saved: the folder
                # (made by this run, so all of it ours) holds no weights; it goes too.
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _restarted_job(cfg: TrainConfig, run_dir: Path, data: Path) -> bool:
    """Whether ``run_dir`` holds the run that this very torchrun job started, with these
    settings, before its worker group was restarted (``torchrun --max-restarts``).

    Every process must answer alike, before any of them joins the new group: the job id
    the run recorded (config.yaml's ``resolved``) is the same on every machine, where the
    restart count is only raised on the machine whose worker failed. Without a job id
    (``none``: torchrun's static rendezvous, one agent per machine) a restart is what
    tells. Settings are compared as given (an unset one was settled by the run); a run of
    other settings is refused as before, as is any run outside torchrun."""
    job = distributed.torchrun_job()
    if job is None or not checkpoint.is_run_dir(run_dir):
        return False
    try:
        saved = read_yaml(run_dir / "config.yaml")
    except CnnlabError:
        return False
    if not isinstance(saved, dict) or not isinstance(saved.get("resolved"), dict):
        return False
    if saved["resolved"].get("torchrun_job") != job:
        return False
    if job == "none" and not distributed.restarts():
        return False
    given = asdict(replace(cfg, data=str(data)))
    ignored = {"out", "resolved", *RESUME_OVERRIDES}
    return all(
        value is None or _plain(value) == _plain(saved.get(name))
        for name, value in given.items()
        if name not in ignored
    )


def _plain(value: Any) -> Any:
    """``value`` as config.yaml gives it back (tuples as lists)."""
    return json.loads(json.dumps(value))


def _train_new(cfg: TrainConfig, run_dir: Path, data: Path, kind: type[TrainingTask]) -> dict:
    # One process owns the folder from here on (under torchrun, the main one): two runs
    # started together on one --out cannot both pass the checks below.
    with run_lock(run_dir) if distributed.is_main_process() else nullcontext():
        if checkpoint.is_run_dir(run_dir):
            raise CnnlabError(f"{run_dir} already holds a run; use --resume or another --out")
        if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            raise CnnlabError(
                f"{run_dir} is not empty and holds no run; --out takes a new or empty folder"
            )
        # An absolute data path keeps config.yaml and split.json valid from any directory.
        cfg, resolved = resolve(replace(cfg, data=str(data)))
        cfg, job = kind.setup(cfg, Path(cfg.split_file) if cfg.split_file else None)
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
        with distributed.session(resolved.device.type):
            recorded = resolved.record()
            if distributed.torchrun_job() is not None:  # what a restarted group checks
                recorded["torchrun_job"] = distributed.torchrun_job()
            return fit(replace(cfg, resolved=recorded), run_dir, job, None, resolved)


def resume(run_dir: str | Path, task: type[TrainingTask], **overrides: Any) -> dict:
    """Continue the run of ``task`` in ``run_dir`` from its last completed epoch and return
    the report.

    Uses RUN/config.yaml, RUN/split.json (never re-splits) and RUN/last.pt (model,
    optimizer, scheduler, scaler, best, patience counter, RNG states, per-epoch history).
    ``overrides`` may change the settings that do not define the run (``RESUME_OVERRIDES``;
    None keeps the saved value, as an unset command-line flag).
    """
    run_dir = checkpoint.require_run_dir(run_dir)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if set(overrides) - set(RESUME_OVERRIDES):
        raise CnnlabError(f"resume can only change {', '.join(RESUME_OVERRIDES)}")
    config = run_dir / "config.yaml"
    saved = read_yaml(config)
    if not isinstance(saved, dict):
        raise CnnlabError(f"{config}: not a mapping of settings")
    # config.yaml, model.json and best.safetensors must agree before the model is built.
    checkpoint.check_run_files(run_dir, checkpoint.read_model_json(run_dir), saved)
    try:
        cfg = TrainConfig.from_dict({**saved, **overrides, "out": str(run_dir)})
    except CnnlabError as error:
        raise CnnlabError(f"{config}: {error}") from None
    with run_lock(run_dir) if distributed.is_main_process() else nullcontext():
        cfg, resolved = resolve(cfg)
        cfg, job = task.setup(cfg, run_dir / "split.json")
        last = run_dir / "last.pt"
        saved_state = checkpoint.load_state(last) if last.is_file() else None
        with distributed.session(resolved.device.type):
            return fit(cfg, run_dir, job, saved_state, resolved)


# ---------------------------------------------------------------------------- the loop


def fit(
    cfg: TrainConfig, run_dir: Path, task: TrainingTask, saved: dict | None, resolved: Resolved
) -> dict:
    """Train ``task`` with ``cfg`` into ``run_dir``, from scratch or from the ``saved``
    last.pt state, and return the report of the best weights. Torch's thread count is the
    resolved CPU plan's (``cnnlab.device.cpu_plan``) while it trains, the caller's again
    after. The processes of a group hold Ctrl-C and SIGTERM meanwhile and stop together
    (``cnnlab.engine.state.stop_together``)."""
    together = state.hold_ctrl_c() if distributed.context().active else nullcontext()
    with threads_for(resolved.plan.threads), together:
        return _fit(cfg, run_dir, task, saved, resolved)


def _fit(
    cfg: TrainConfig, run_dir: Path, task: TrainingTask, saved: dict | None, resolved: Resolved
) -> dict:
    ctx = distributed.context()
    main = ctx.main  # only the main process evaluates, writes the run folder and prints
    device = resolved.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not task.splits.val:
        raise CnnlabError(f"{cfg.data}: no validation images; raise val_split or add val/")
    state.seed_everything(cfg.seed)
    generator = torch.Generator()  # reseeded every epoch: shuffling is epoch-determined
    ready = prepare(
        cfg, task, resolved, generator, saved is None, rank=ctx.rank, world_size=ctx.world_size
    )
    train_loader, val_data = ready.train_loader, ready.val_data
    model, optimizer, dtype, scaler = (
        ready.model,
        ready.optimizer,
        ready.autocast_dtype,
        ready.scaler,
    )
    per_step = cfg.lr_interval == "step"
    steps = len(train_loader) if per_step else 1  # scheduler steps per epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, cfg.warmup_epochs * steps, cfg.epochs * steps),
    )
    # With --ema the average is the model that is evaluated, kept as best and reported.
    ema = ema_model(model, cfg.ema) if cfg.ema is not None else None
    evaluated = ema.module if ema is not None else model
    spec = task.metrics

    # Where we start: a fresh run writes its description, a resumed one restores its state.
    start_epoch, best, stale, history = 0, None, 0, []
    # Early stopping's reference: the first ranked figure when it last grew by more than
    # min_delta (Keras's rule); the best weights still follow every gain, however small.
    mark: float | None = None
    if saved is None:
        if main:
            write_yaml(run_dir / "config.yaml", asdict(cfg))
            write_json(run_dir / "split.json", task.splits.to_json())
            checkpoint.save_model_json(run_dir, model_meta(cfg, task, ready.model_args))
            checkpoint.save_initial_filters(run_dir, model)
    else:
        state.restore(saved, run_dir / "last.pt", model, optimizer, scheduler, scaler, ema=ema)
        start_epoch, best = saved["epoch"], saved["best"]
        stale, history = saved["epochs_without_improvement"], saved["history"]
        mark = saved.get("stop_mark", best["rank"][0] if best else None)
        if main:
            state.sync_epoch_files(run_dir, history, best, evaluated, spec.columns)
    # Trains through the wrapper (which averages gradients over processes); saves, loads and
    # evaluates ``model`` itself, whose parameters it shares.
    net = distributed.wrap(model, device, ctx)
    step = Step(
        net, task, optimizer, scaler, device, dtype, cfg.grad_clip, ready.memory_format, ema
    )

    if saved is None and main:
        # Each epoch reseeds every generator, so looking at a batch here changes nothing.
        images, targets = next(iter(train_loader))
        plots.plot_pictures(
            task.batch_pictures(images[:BATCH_PICTURES], targets),
            run_dir / "batch.png",
            f"a training batch as the model sees it ({', '.join(batch_recipe(cfg))})",
        )
    say = Reporter(cfg.quiet or not main, spec.score_label)
    say.line(setup_line(cfg, task, model, device, ctx.world_size, resolved.plan))
    if saved is None:  # a new run: say how its images are normalised, and why
        say.line(stats_line(task.in_channels, pretrained=cfg.weights is not None))
    if start_epoch:
        say.line(f"resuming {run_dir} after epoch {start_epoch} of {cfg.epochs}")
    if start_epoch < cfg.epochs:
        compile_step(step, cfg.compile, train_loader, ctx.world_size, say.line, main)
    stopped = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience is not None and stale >= cfg.patience:
                stopped = early_stop(cfg, spec.best_label, epoch, stale, best["epoch"])
                say.line(f"early stop after epoch {epoch} of {cfg.epochs}: {stopped['reason']}")
                break
            seen, train_loss, train_score, lr, train_seconds = _train_pass(
                epoch, cfg, model, step, train_loader, generator, scheduler, say
            )
            # The main process validates on the full set while the others wait.
            validated = time.perf_counter()
            val = public(task.evaluate(evaluated, val_data, device, dtype)) if main else None
            val = distributed.from_main(val)
            rank = spec.rank(val)
            improved = best is None or rank > tuple(best["rank"])
            if improved:
                best = {"rank": list(rank), "epoch": epoch + 1}
            if cfg.min_delta == 0:
                stale = 0 if improved else stale + 1
            elif mark is None or rank[0] > mark + cfg.min_delta:
                mark, stale = rank[0], 0
            else:
                stale += 1
            history.append(
                {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": train_loss,
                    **spec.row(train_score, val),
                    "seconds": round(train_seconds + time.perf_counter() - validated, 3),
                }
            )
            if main:
                latest = {
                    "epoch": epoch + 1,
                    "best": best,
                    "stale": stale,
                    "mark": mark,
                    "history": history,
                }
                state.save_epoch(run_dir, latest, model, step, scheduler, evaluated, spec.columns)
            row = history[-1]
            say.epoch(
                [
                    ("epoch", f"{row['epoch']}/{cfg.epochs}"),
                    *spec.epoch_cells(row),
                    ("lr", short_float(row["lr"])),
                    ("img/s", f"{seen / train_seconds:.0f}"),
                ]
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

    if main and history:
        hint = overfitting_hint(spec, history, cfg, len(task.splits.train))
        if hint:
            say.line(hint)
    # Final report on the best weights, read back from the file a user will load.
    if main:
        report = _report_best(run_dir, task, model, ready, device, best["epoch"], say, stopped)
    else:
        report = None
    report = distributed.from_main(report)
    if interrupted:
        raise TrainingInterrupted(str(run_dir), history[-1]["epoch"], cfg.epochs, report)
    return report


def _train_pass(
    epoch: int,
    cfg: TrainConfig,
    model: nn.Module,
    step: Step,
    train_loader: torch.utils.data.DataLoader,
    generator: torch.Generator,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    say: Reporter,
) -> tuple[int, float, float | None, float, float]:
    """One epoch's optimizer steps over every process's shard: (images seen, mean training
    loss, the running training score or None, the last lr, seconds). ``model`` is what
    ``step`` trains through its process-group wrapper."""
    rank = distributed.context().rank
    # Each process augments its shard with its own random numbers.
    state.seed_everything(cfg.seed * 1000 + epoch + _RANK_SEED_STRIDE * rank)
    generator.manual_seed(cfg.seed * 1000 + epoch)
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)  # distributed: a new shuffle, the same on every rank
    model.train()
    if cfg.freeze_backbone:
        transfer.backbone_norms_eval(model)
    started = time.perf_counter()
    per_step = cfg.lr_interval == "step"
    say.start(f"epoch {epoch + 1}/{cfg.epochs}", len(train_loader))
    seen, loss_sum, right, scored, lr = train_epoch(
        step, state.stop_together(train_loader), scheduler if per_step else None, say
    )
    if not per_step:
        scheduler.step()
    say.stop()
    # The whole data's numbers: sums over every process's shard.
    seen_all, loss_sum, right, scored = distributed.sum_across(
        torch.tensor(seen, device=step.device), loss_sum, right, scored
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
    score = right.item() / scored.item() if step.task.metrics.train else None
    return seen, train_loss, score, lr, time.perf_counter() - started


def _report_best(
    run_dir: Path,
    task: TrainingTask,
    model: nn.Module,
    ready: Prepared,
    device: torch.device,
    best_epoch: int,
    say: Reporter,
    stopped: dict | None = None,
) -> dict:
    """The best weights read back from best.safetensors, what is fitted after training
    (saved with them), the task's report and pictures, report.json (with ``stopped``, how
    early stopping ended the run, when it did) and curves.png."""
    checkpoint.load_weights(run_dir / "best.safetensors", model)
    fitted = task.after_training(model, device, say.line)
    if fitted is not None:
        say.line(fitted)
        checkpoint.save_weights(
            run_dir / "best.safetensors", model, metadata={"epoch": str(best_epoch)}
        )
    split, result = task.finish(
        model, ready.val_data, ready.test_data, device, ready.autocast_dtype, run_dir
    )
    report = {"split": split, "best_epoch": best_epoch, **public(result)}
    if stopped is not None:
        report["early_stop"] = stopped
    write_json(run_dir / "report.json", report)
    plots.plot_curves(
        run_dir / "metrics.csv", run_dir / "curves.png", task.metrics.curves, best_epoch
    )
    # The figures themselves are the caller's to print (the CLI: on stdout).
    say.line(f"best weights: epoch {best_epoch}; report, weights and plots in {run_dir}")
    return report


def public(result: dict) -> dict:
    """An evaluation result without its private (plot) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
