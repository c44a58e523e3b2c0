#!/usr/bin/env python
"""Fine-tune a timm model with robust attention: convert, train, watch attention health, export.

Builds any timm model (optionally from a local checkpoint file, or timm's
pretrained weights when they can be downloaded), swaps its attention modules
for a robust_attn variant with :func:`robust_attn.convert` (pretrained weights
kept; function-preserving initialisations where the variant has one) and
trains it:

  * data: an ImageFolder directory (``--data``, one folder per class;
    ``--val-data`` for held-out images), or by default a synthetic, learnable
    task generated on the fly (recipes/_synthetic_images.py: oriented gratings
    whose orientation and frequency give the class);
  * AdamW (no weight decay on biases, norms and other vectors), linear warmup
    then cosine decay, gradient clipping, mixed precision (``--amp``: bf16
    autocast on CPU or CUDA, fp16 with loss scaling on CUDA), the variants'
    auxiliary losses (spectral_qk) added;
  * adversarial training (``--adv fgsm|pgd --adv-eps 4/255``): the model trains
    on FGSM or PGD inputs (recipes/_adversarial.py), and the final evaluation
    reports adversarial accuracy too;
  * attention health every ``--log-every`` steps, sampled on the training
    forward by :class:`robust_attn.HealthMonitor` (all-reduced over the ranks):
    per layer and head in health.csv (health_from_step_<s>.csv for a run
    resumed at step s; steps counted from the run's start), worst-layer
    summaries in TensorBoard when
    installed, the monitor's early warnings in the summary; losses, accuracy,
    learning rate and gradient norm every step in train.csv; a progress bar;
    a summary table at the end;
  * checkpoints (``--save-every``, at ``--stop-at`` and at the end) that ``--resume``
    continues exactly (same batches, same schedule). The learning-rate schedule is the
    first segment's: a checkpoint records the ``--steps`` it was planned over, and a run
    resumed with a larger ``--steps`` keeps that schedule, so steps past its end train at
    its final rate (``--min-lr-ratio`` times ``--lr``) instead of the rate jumping back
    up onto a longer cosine. ``--stop-at s`` ends a segment at step s (a time-limited
    job) on the full schedule. A resumed run's summary.md covers the whole run: the
    start metrics, steps, time and health warnings of every segment (kept in the
    checkpoint);
  * export: the trained model reverted to plain timm attention
    (:func:`robust_attn.revert`, sigma_reparam folded), saved as a state dict
    that loads into ``timm.create_model(<model>, ...)`` with strict=True, when
    the variant is expressible in timm (else the summary says why not).

Data parallel: ``torchrun --nproc_per_node=2 recipes/finetune_timm.py ...``
splits each global batch over the ranks and follows the loss curve of one
process with the same ``--batch-size`` (recipes/_distributed.py).

Examples:
    python recipes/finetune_timm.py --variant sigma_reparam --steps 300
    python recipes/finetune_timm.py --model vit_small_patch16_224 --checkpoint vit_s.pth \\
        --data imagenette/train --val-data imagenette/val --img-size 224 --num-classes 10
    python recipes/finetune_timm.py --variant sink --adv pgd --adv-eps 0.0157 --adv-steps 3
    python recipes/finetune_timm.py --smoke --out /tmp/finetune_smoke
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _adversarial import adversarial_inputs
from _distributed import Distributed, init_distributed, shutdown
from _health import summarize
from _logging import MetricsLog, markdown_table, progress
from _optim import adamw, warmup_cosine_schedule
from _smoke import add_smoke_flag, parse_with_smoke
from _synthetic_images import SyntheticGratings
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

import robust_attn
from robust_attn.integrations import ConversionSummary

SMOKE = {"steps": 3, "batch_size": 4, "warmup": 1, "log_every": 2, "eval_size": 8,
         "img_size": 32, "workers": 0,
         "model_kwargs": [("patch_size", 8), ("embed_dim", 32), ("depth", 2), ("num_heads", 2)]}
HEALTH_COLUMNS = ("entropy_min", "max_logit", "residual_min", "sink_mass_max")


def _keyword(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_tiny_patch16_224", help="a timm model name")
    model.add_argument("--model-kwargs", nargs="*", type=_keyword, default=[],
                       metavar="NAME=VALUE", help="extra timm.create_model arguments")
    model.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    model.add_argument("--checkpoint", type=Path, help="a local checkpoint file to start from")
    model.add_argument("--variant", default="sigma_reparam",
                       help=f"robust_attn preset: {', '.join(robust_attn.list_variants())}")
    model.add_argument("--include", nargs="*", help="module name patterns to convert (fnmatch)")
    model.add_argument("--exclude", nargs="*", help="module name patterns to leave alone")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="ImageFolder directory (default: synthetic)")
    data.add_argument("--val-data", type=Path, help="ImageFolder directory for evaluation")
    data.add_argument("--img-size", type=int, default=64)
    data.add_argument("--num-classes", type=int, default=10)
    data.add_argument("--synthetic-size", type=int, default=50_000,
                      help="synthetic training images per epoch")
    data.add_argument("--eval-size", type=int, default=1000, help="synthetic eval images")
    data.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=64, help="global batch, over all ranks")
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    train.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr")
    train.add_argument("--clip-grad", type=float, default=1.0, help="global norm; 0: off")
    train.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                       help="auto: bf16 on CUDA when supported, else none")
    train.add_argument("--adv", choices=("none", "fgsm", "pgd"), default="none",
                       help="train on adversarial inputs")
    train.add_argument("--adv-eps", type=float, default=4 / 255,
                       help="L-inf radius, pixels in [0, 1]")
    train.add_argument("--adv-steps", type=int, default=3, help="PGD steps")
    train.add_argument("--adv-alpha", type=float, default=None, help="PGD step (2.5 eps / steps)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("runs/finetune"))
    output.add_argument("--log-every", type=int, default=20, help="health every k steps")
    output.add_argument("--save-every", type=int, default=100, help="checkpoint every k steps")
    output.add_argument("--resume", type=Path, help="a checkpoint.pt of this recipe")
    output.add_argument("--stop-at", type=int, default=None,
                        help="end this segment (with a checkpoint) at this step, on the "
                             "schedule of --steps; --resume continues it")
    output.add_argument("--no-export", action="store_true", help="skip the stock-timm export")
    add_smoke_flag(parser, SMOKE, "a tiny model and a few steps")
    args = parse_with_smoke(parser, argv, SMOKE)
    args.model_kwargs = dict(args.model_kwargs)
    return args


def build_model(args: argparse.Namespace) -> tuple[nn.Module, ConversionSummary]:
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                              img_size=args.img_size, **args.model_kwargs)
    if args.checkpoint:
        timm.models.load_checkpoint(model, str(args.checkpoint), strict=True)
    return robust_attn.convert(model, args.variant, include=args.include, exclude=args.exclude)


def image_folder(root: Path, size: int, train: bool) -> Dataset:
    from torchvision import datasets, transforms

    augment = [transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
               transforms.RandomHorizontalFlip()] if train else \
        [transforms.Resize(round(size * 1.14)), transforms.CenterCrop(size)]
    return datasets.ImageFolder(str(root), transforms.Compose([*augment, transforms.ToTensor()]))


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets of images in [0, 1]."""
    if args.data is None:
        return (SyntheticGratings(args.synthetic_size, args.num_classes, args.img_size,
                                  seed=args.seed),
                SyntheticGratings(args.eval_size, args.num_classes, args.img_size, seed=args.seed,
                                  offset=10**9))
    evaluation = image_folder(args.val_data or args.data, args.img_size, train=False)
    return image_folder(args.data, args.img_size, train=True), evaluation


class StepBatches(Sampler):
    """This rank's index lists for steps ``start`` .. ``steps - 1``.

    Step s takes the global batch at positions [i B, (i + 1) B) of epoch e's
    permutation (seeded by seed + e), with (e, i) = divmod(s, len // B), and this
    rank keeps its slice: the batches do not depend on the world size and a
    resumed run sees the same ones.
    """

    def __init__(self, length: int, global_batch: int, steps: int, start: int, seed: int,
                 local: slice):
        if length < global_batch:
            raise ValueError(f"the dataset has {length} images, fewer than one batch")
        self.length, self.batch, self.steps, self.start = length, global_batch, steps, start
        self.seed, self.local = seed, local

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        per_epoch = self.length // self.batch
        permutation, permutation_epoch = None, None
        for step in range(self.start, self.steps):
            epoch, index = divmod(step, per_epoch)
            if epoch != permutation_epoch:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                permutation, permutation_epoch = torch.randperm(self.length,
                                                                generator=generator), epoch
            yield permutation[index * self.batch:(index + 1) * self.batch][self.local].tolist()


def amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if args.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


class Classifier:
    """The model on [0, 1] images: timm's normalisation, autocast, and adversarial inputs."""

    def __init__(self, model: nn.Module, trained: nn.Module, args: argparse.Namespace,
                 device: torch.device):
        config = timm.data.resolve_data_config({}, model=model)
        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1)
        self.model, self.trained, self.args, self.device = model, trained, args, device
        self.dtype = amp_dtype(args, device)

    def logits(self, images: Tensor, module: nn.Module | None = None) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            return (module or self.trained)((images - self.mean) / self.std).float()

    def attack(self, images: Tensor, labels: Tensor, start: Tensor | None) -> Tensor:
        """FGSM or PGD inputs against the model in eval mode (dropout off).

        On a step the health monitor samples, the training forward runs after
        these and is the one it keeps.
        """
        was_training = self.model.training
        self.model.eval()
        steps = self.args.adv_steps if self.args.adv == "pgd" else 1
        adversarial = adversarial_inputs(lambda z: self.logits(z, self.model), images, labels,
                                         self.args.adv_eps, steps, self.args.adv_alpha, start)
        self.model.train(was_training)
        return adversarial


def pgd_start(args: argparse.Namespace, step: int, shape: torch.Size, local: slice,
              device: torch.device) -> Tensor | None:
    """PGD's U(-1, 1) start for the global batch of ``step`` (this rank's slice), else None."""
    if args.adv != "pgd":
        return None
    generator = torch.Generator().manual_seed(args.seed * 7919 + step)
    draw = torch.rand((args.batch_size, *shape[1:]), generator=generator) * 2 - 1
    return draw[local].to(device)


@torch.no_grad()
def _eval_sums(classifier: Classifier, images: Tensor, labels: Tensor) -> Tensor:
    logits = classifier.logits(images, classifier.model)
    return torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                        (logits.argmax(-1) == labels).sum().float(),
                        torch.tensor(float(len(labels)), device=labels.device)])


def evaluate(classifier: Classifier, dataset: Dataset, args: argparse.Namespace,
             distributed: Distributed) -> dict[str, float]:
    """Loss and accuracy on ``dataset`` (sharded over the ranks), and under attack with --adv."""
    model = classifier.model
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(distributed.rank, len(dataset),
                                                   distributed.world_size))
    sums = {"clean": torch.zeros(3, device=distributed.device)}
    if args.adv != "none":
        sums["adversarial"] = torch.zeros(3, device=distributed.device)
    for images, labels in DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers):
        images, labels = images.to(distributed.device), labels.to(distributed.device)
        sums["clean"] += _eval_sums(classifier, images, labels)
        if "adversarial" in sums:
            start = torch.rand_like(images) * 2 - 1 if args.adv == "pgd" else None
            sums["adversarial"] += _eval_sums(classifier,
                                              classifier.attack(images, labels, start), labels)
    model.train(was_training)
    results = {}
    for name, total in sums.items():
        total = distributed.mean(total) * distributed.world_size
        results[f"{name}_loss"] = (total[0] / total[2]).item()
        results[f"{name}_accuracy"] = (total[1] / total[2]).item()
    return results


def new_history(schedule_steps: int) -> dict:
    """What summary.md needs from earlier segments of a run, kept in its checkpoints."""
    return {"schedule_steps": schedule_steps, "first": {}, "seconds": 0.0, "warnings": [],
            "segments": []}


def save_checkpoint(path: Path, model: nn.Module, optimizer, scaler, step: int,
                    args: argparse.Namespace, history: dict) -> None:
    """Model, optimizer and loss-scaler states, the next step, and the run's history (the
    schedule's length, the start metrics, time and warnings so far)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "history": history,
             "args": json.dumps({k: str(v) for k, v in vars(args).items()})}
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def resume(path: Path, model: nn.Module, optimizer, scaler, device: torch.device,
           steps: int) -> tuple[int, dict]:
    """Load a checkpoint of :func:`save_checkpoint`: the step to continue from and the run's
    history (a checkpoint without one started a schedule of ``steps``)."""
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"], state.get("history") or new_history(steps)


def export_timm(model: nn.Module, path: Path) -> str:
    """Save the model reverted to plain timm attention; the reason when it cannot be."""
    try:
        reverted, _ = robust_attn.revert(copy.deepcopy(model))
    except ValueError as error:
        return f"not exported: {error}"
    torch.save(reverted.state_dict(), path)
    return f"saved {path} (loads into stock timm with strict=True)"


def summary_table(args, conversion, first: dict, last: dict, seconds: float, steps_run: int,
                  warnings: list, export: str, history: dict | None = None) -> str:
    def cell(values: dict, name: str) -> str:
        value = values.get(name)
        return "" if value is None else f"{value:.4g}"

    rows = [[name, cell(first, name), cell(last, name)] for name in
            ["train_loss", "clean_loss", "clean_accuracy", "adversarial_accuracy",
             *HEALTH_COLUMNS] if name in first or name in last]
    changed = sorted({option for changes in conversion.changes_function.values()
                      for option in changes})
    notes = [f"model {args.model}, variant {args.variant}: {len(conversion.swapped)} attention "
             f"modules swapped, {len(conversion.skipped)} skipped"
             + (f"; function changed at conversion by {changed}" if changed else
                "; function preserved at conversion"),
             f"{steps_run} steps in {seconds:.1f} s ({steps_run / max(seconds, 1e-9):.2f} steps/s)",
             f"health warnings: {len(warnings)}", *(f"  {w['code']} ({w['layer']}): {w['message']}"
                                                    for w in warnings),
             f"export: {export}"]
    if history and len(history["segments"]) > 1:
        notes.insert(2, "segments (first step, steps): "
                     + ", ".join(f"({s}, {n})" for s, n in history["segments"])
                     + f"; learning-rate schedule over {history['schedule_steps']} steps")
    return markdown_table(["metric", "start", "end"], rows) + "\n\n" + "\n".join(notes)


def train_step(classifier: Classifier, batch, step: int, args, distributed: Distributed,
               optimizer, schedule, scaler, monitor: robust_attn.HealthMonitor
               ) -> dict[str, float]:
    images, labels = (t.to(distributed.device) for t in batch)
    local = distributed.local_slice(args.batch_size)
    if args.adv != "none":
        images = classifier.attack(images, labels,
                                   pgd_start(args, step, images.shape, local, distributed.device))
    logits = classifier.logits(images)
    loss = F.cross_entropy(logits, labels)
    auxiliary = sum((m.auxiliary_loss() for m in classifier.model.modules()
                     if isinstance(m, robust_attn.RobustAttention)), loss.new_zeros(()))
    lr = optimizer.param_groups[0]["lr"]  # this step's learning rate
    scaler.scale(loss + auxiliary).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(classifier.model.parameters(),
                                               args.clip_grad or math.inf)
    monitor.step(loss.detach())  # after backward, before zero_grad: it reads gradient norms
    scaler.step(optimizer)
    scaler.update()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return {"step": step, "loss": distributed.mean(loss.detach()).item(),
            "accuracy": distributed.mean(accuracy).item(),
            "lr": lr, "grad_norm": grad_norm.item()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_distributed(args.device)
    torch.manual_seed(args.seed)
    model, conversion = build_model(args)
    model.to(distributed.device)
    trained = distributed.wrap(model)
    optimizer = adamw(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(distributed.device.type, enabled=args.amp == "fp16")
    start, history = resume(args.resume, model, optimizer, scaler, distributed.device,
                            args.steps) if args.resume else (0, new_history(args.steps))
    # The first segment's schedule, whatever this segment's --steps (module docstring).
    schedule = warmup_cosine_schedule(optimizer, args.warmup, history["schedule_steps"],
                                      args.min_lr_ratio, start)
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    classifier = Classifier(model, trained, args, distributed.device)
    train_set, eval_set = build_datasets(args)
    batches = StepBatches(len(train_set), args.batch_size, stop, start, args.seed,
                          distributed.local_slice(args.batch_size))
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=args.workers)
    log = MetricsLog(args.out) if distributed.is_main else None
    monitor = robust_attn.HealthMonitor(model, every=args.log_every,
                                        reduce_across_ranks=distributed.world_size > 1)
    health_file = "health.csv" if start == 0 else f"health_from_step_{start}.csv"
    if distributed.is_main:
        print(conversion)
    last = evaluate(classifier, eval_set, args, distributed)
    first = history["first"] or dict(last)  # the run's start: the first segment's
    history["first"] = first
    bar, began = progress(stop, start, "train", distributed.is_main), time.perf_counter()

    def history_now() -> dict:
        """The run's history as of now: this segment's time, steps and warnings added."""
        return {**history, "seconds": history["seconds"] + time.perf_counter() - began,
                "warnings": history["warnings"] + [
                    {"code": w.code, "layer": str(w.layer), "message": w.message}
                    for w in monitor.warnings()],
                "segments": history["segments"] + [(start, step + 1 - start)]}

    model.train()
    for step, batch in enumerate(loader, start):
        row = train_step(classifier, batch, step, args, distributed, optimizer, schedule, scaler,
                         monitor)
        last["train_loss"] = row["loss"]
        first.setdefault("train_loss", row["loss"])
        if log is not None:
            log.write("train", row)
            log.scalars(step, {f"train/{k}": v for k, v in row.items() if k != "step"})
            if (step - start) % args.log_every == 0:  # a step the monitor sampled
                last.update(summarize(monitor.latest_health()))
                log.scalars(step, {f"health/{name}": last[name] for name in HEALTH_COLUMNS})
                for name in HEALTH_COLUMNS:
                    first.setdefault(name, last[name])
        bar.update(1)
        bar.set_postfix_str(f"loss={row['loss']:.3f} acc={row['accuracy']:.2f}")
        if distributed.is_main and ((step + 1) % args.save_every == 0 or step + 1 == stop):
            save_checkpoint(args.out / "checkpoint.pt", model, optimizer, scaler, step + 1, args,
                            history_now())
            monitor.to_csv(args.out / health_file)
    bar.close()
    step = stop - 1  # for history_now, also when this segment ran no step
    whole = history_now()
    monitor.close()
    last.update(evaluate(classifier, eval_set, args, distributed))
    if distributed.is_main:
        export = "skipped (--no-export)" if args.no_export else \
            export_timm(model, args.out / "timm_model.pth")
        table = summary_table(args, conversion, first, last, whole["seconds"], stop,
                              whole["warnings"], export, whole)
        (args.out / "summary.md").write_text(table + "\n")
        print(table)
        log.close()
    shutdown(distributed)


if __name__ == "__main__":
    main()
