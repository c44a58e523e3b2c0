#!/usr/bin/env python
"""Learning-rate sensitivity of each attention variant: Wortsman et al. (2023)'s protocol, small.

Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer
training instabilities" (arXiv:2309.14322), Section 3: train the same model
over a grid of learning rates and summarise the final loss curve L(eta) by

    LR sensitivity = mean_eta [ min(L(eta), L_0) - min_eta' L(eta') ]

with L_0 the loss at initialisation (a run that ends worse than at init, or
diverges, counts as L_0): 0 means every learning rate reaches the best loss.

Here, per variant (robust_attn presets) and per learning rate (default the
half decades from 3e-4 to 3e-1), a small pre-LN causal transformer LM
(recipes/_causal_lm.py, every run of a variant from the same initialisation,
on the same batches) learns one of two tasks (``--task``):

* ``markov`` (the quick smoke): a k-th order Markov chain over V tokens
  (recipes/_markov.py) whose optimal loss, its entropy rate H, is known: the
  table reports each final eval loss as its distance to the floor, measured
  on the eval tokens themselves.
* ``text``: characters of the Python standard library's sources
  (recipes/_text.py, read at run time); the table reports the eval loss
  itself (nats/char), beside the unigram entropy of the text.

A run diverges when its training loss becomes non-finite (it stops there) or
its final loss exceeds L_0.

Training as in Wortsman et al.: AdamW (beta = (0.9, 0.95), eps = 1e-8),
weight decay independent of the learning rate (theta <- theta - s_t lambda
theta, lambda = 1e-4 by default; torch's AdamW decays by lr * wd, so wd =
lambda / eta), linear warmup then cosine decay to 0, gradient clipping at
global norm 1. Auxiliary losses of the variants (spectral_qk) are added.

Outputs in --out: results.json (every run: final and initial loss, loss
curve, health at the end), results.md (the table), loss_vs_lr.png and
health.json (:func:`health_file`: each variant's attention health at the end
of training, per learning rate). Health at the end: one forward of 16 eval
sequences under robust_attn.health_probe() (recipes/_health.py's worst-layer
summary).

Data parallel: ``torchrun --nproc_per_node=2 recipes/lr_sensitivity.py ...``
splits each global batch over the ranks (recipes/_distributed.py) and follows
the loss curve of one process.

Examples:
    python recipes/lr_sensitivity.py --out recipes/results/lr_sensitivity
    python recipes/lr_sensitivity.py --variants baseline qk_norm --lrs 1e-3 1e-1 --steps 100
    python recipes/lr_sensitivity.py --smoke --out /tmp/lr_smoke
    python recipes/lr_sensitivity.py --task text --threads 1 --out recipes/results/lr_sensitivity_text
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _causal_lm import CausalLM
from _distributed import Distributed, init_distributed, shutdown
from _health import attention_health, summarize
from _logging import markdown_table, progress
from _markov import MarkovChain
from _optim import adamw, warmup_cosine_schedule
from _smoke import add_smoke_flag, parse_with_smoke
from _text import VOCAB, TextCorpus
from torch import Tensor

import robust_attn
from robust_attn.health.distributed import forward_together

DEFAULT_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
# The text task's default sweep: Wortsman et al.'s comparison set plus the both-collapse preset
# ("robust", where this checkout has it: names not in robust_attn.list_variants() are skipped).
TEXT_VARIANTS = ("baseline", "qk_norm", "sigma_reparam", "softcap", "sink", "gated",
                 "outlier_removal", "sigmoid", "robust")
SMOKE = {"variants": ["baseline", "qk_norm"], "lrs": [1e-3, 3e-1], "steps": 4, "warmup": 1,
         "eval_size": 8, "batch_size": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("markov", "text"), default="markov",
                        help="markov: synthetic chain with a known floor; text: stdlib sources")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="preset names (default: markov, every preset; text, TEXT_VARIANTS "
                             "that exist)")
    parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS),
                        help="peak learning rates (default: half decades 3e-4 .. 3e-1)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="global batch (sequences), split over torchrun's ranks")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8)
    parser.add_argument("--order", type=int, default=2, help="Markov order k")
    parser.add_argument("--alpha", type=float, default=0.3,
                        help="Dirichlet concentration of the transition rows (small: peaked)")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="independent weight decay lambda (per step, scaled by the schedule)")
    parser.add_argument("--clip-grad", type=float, default=1.0, help="global norm; 0: off")
    parser.add_argument("--eval-size", type=int, default=256, help="eval sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                        help="bf16 autocast (CPU or CUDA)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("recipes/results/lr_sensitivity"))
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it goes to stderr, and only to a terminal)")
    add_smoke_flag(parser, SMOKE, "a few steps of a tiny sweep")
    args = parse_with_smoke(parser, argv, SMOKE)
    if args.variants is None:
        known = robust_attn.list_variants()
        args.variants = known if args.task == "markov" else [v for v in TEXT_VARIANTS if v in known]
    if args.task == "text":
        args.vocab, args.order = VOCAB, 1
    return args


@dataclass
class Run:
    """One (variant, learning rate) run."""

    variant: str
    lr: float
    loss_at_init: float
    final_loss: float = math.nan
    diverged: bool = False
    seconds: float = 0.0
    curve: list[float] = field(default_factory=list)
    health: dict[str, float] = field(default_factory=dict)

    @property
    def capped_loss(self) -> float:
        """min(L(eta), L_0), with a non-finite loss counted as L_0."""
        return min(self.final_loss, self.loss_at_init) if math.isfinite(self.final_loss) \
            else self.loss_at_init


def lr_sensitivity(runs: list[Run]) -> float:
    """mean over the runs of min(L, L_0) minus the best min(L, L_0) (Wortsman et al. 2023)."""
    capped = [run.capped_loss for run in runs]
    return sum(capped) / len(capped) - min(capped)


def next_token_loss(logits: Tensor, tokens: Tensor, order: int) -> Tensor:
    """Cross-entropy of the targets t >= k (position t - 1 predicts token t)."""
    return F.cross_entropy(logits[:, order - 1:-1].flatten(0, 1).float(),
                           tokens[:, order:].flatten())


def _autocast(args: argparse.Namespace, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")


@torch.no_grad()
def evaluate(model: CausalLM, tokens: Tensor, args: argparse.Namespace) -> float:
    losses = []
    for chunk in tokens.split(64):
        with _autocast(args, tokens.device):
            losses.append(next_token_loss(model(chunk), chunk, args.order) * len(chunk))
    return (torch.stack(losses).sum() / len(tokens)).item()


@torch.no_grad()
def end_health(model: CausalLM, tokens: Tensor) -> dict[str, float]:
    with robust_attn.health_probe():
        model(tokens)
    return summarize(attention_health(model))


@dataclass(frozen=True)
class Task:
    """What the runs learn: ``sample(batch, generator)`` draws (batch, seq_len) training tokens;
    ``floors["eval_floor"]`` is subtracted from every loss in the table (0 for text)."""

    sample: Callable[[int, torch.Generator], Tensor]
    eval_tokens: Tensor
    floors: dict[str, float | str]
    description: str


def markov_task(args: argparse.Namespace) -> Task:
    chain = MarkovChain.random(args.vocab, args.order, args.alpha, args.seed)
    eval_tokens = chain.sample(args.eval_size, args.seq_len,
                               torch.Generator().manual_seed(args.seed + 2))
    floor = chain.nll(eval_tokens).mean().item()
    return Task(lambda batch, generator: chain.sample(batch, args.seq_len, generator), eval_tokens,
                {"entropy_rate": chain.entropy_rate(), "eval_floor": floor},
                f"Final eval loss minus the floor (nats/token) per peak learning rate; floor = "
                f"{floor:.4f} on the eval tokens (entropy rate {chain.entropy_rate():.4f}, "
                f"log V = {math.log(args.vocab):.4f}).")


def text_task(args: argparse.Namespace) -> Task:
    corpus = TextCorpus.stdlib()
    eval_tokens = corpus.eval_batches(args.eval_size, args.seq_len, args.seed + 2)
    unigram = corpus.unigram_entropy()
    return Task(lambda batch, generator: corpus.batch(corpus.train, batch, args.seq_len, generator),
                eval_tokens, {"eval_floor": 0.0, "unigram_entropy": unigram,
                              "corpus_sha256": corpus.sha256},
                f"Final eval loss (nats/char) per peak learning rate on the Python standard "
                f"library's sources ({corpus.files} files, sha256 {corpus.sha256[:12]}); a model "
                f"that ignores the context scores the unigram entropy {unigram:.3f}, "
                f"log 128 = {math.log(VOCAB):.3f}.")


def train_run(variant: str, lr: float, args: argparse.Namespace, task: Task,
              eval_tokens: Tensor, distributed: Distributed, bar) -> Run:
    torch.manual_seed(args.seed)  # the same initialisation at every learning rate
    model = CausalLM(variant, args.vocab, args.seq_len, args.dim, args.depth, args.heads)
    model = model.to(distributed.device)
    trained = distributed.wrap(model)
    optimizer = adamw(model, lr, args.weight_decay / lr, betas=(0.9, 0.95))
    schedule = warmup_cosine_schedule(optimizer, args.warmup, args.steps)
    run = Run(variant, lr, evaluate(model, eval_tokens, args))
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batches in every run
    local = distributed.local_slice(args.batch_size)
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens = task.sample(args.batch_size, batches)[local].to(distributed.device)

        def forward(tokens=tokens):
            with _autocast(args, distributed.device):
                return next_token_loss(trained(tokens), tokens, args.order)

        loss = forward_together(forward)  # every rank agrees before any backward's all-reduce
        if loss is None:  # RobustAttention refused overflowing logits on some rank: diverged
            run.curve.append(math.nan)
            break
        (loss + model.auxiliary_loss()).backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        run.curve.append(distributed.mean(loss.detach().float()).item())
        bar.update(1)
        bar.set_postfix_str(f"{variant} lr={lr:.0e} loss={run.curve[-1]:.3f}")
        if not math.isfinite(run.curve[-1]):
            break
    if math.isfinite(run.curve[-1]):
        run.final_loss = evaluate(model, eval_tokens, args)
        run.health = end_health(model, eval_tokens[:16])
    run.diverged = not math.isfinite(run.final_loss) or run.final_loss > run.loss_at_init
    run.seconds = time.perf_counter() - start
    return run


def summary_rows(runs: list[Run], floor: float) -> list[list[str]]:
    rows = []
    for variant in dict.fromkeys(run.variant for run in runs):
        mine = [run for run in runs if run.variant == variant]
        best = min(mine, key=lambda run: run.capped_loss)
        last = max(mine, key=lambda run: run.lr)
        cells = [f"{run.final_loss - floor:.3f}" + (" (div)" if run.diverged else "")
                 for run in mine]
        rows.append([variant, *cells, f"{best.lr:g}", f"{best.capped_loss - floor:.3f}",
                     f"{lr_sensitivity(mine):.3f}", str(sum(run.diverged for run in mine)),
                     f"{last.health.get('entropy_min', math.nan):.2f}",
                     f"{last.health.get('max_logit', math.nan):.1f}"])
    return rows


def write_table(path: Path, runs: list[Run], args: argparse.Namespace, task: Task,
                seconds: float) -> str:
    header = ["variant", *(f"{lr:g}" for lr in args.lrs), "best LR", "best", "LR sensitivity",
              "diverged", f"H_min @ {max(args.lrs):g}", f"max logit @ {max(args.lrs):g}"]
    table = markdown_table(header, summary_rows(runs, task.floors["eval_floor"]))
    text = (f"{task.description} (div) = diverged. H_min, max logit: worst layer's mean "
            f"attention entropy and largest attention logit at the end, at the largest "
            f"learning rate.\n\n{table}\n\n"
            f"{len(runs)} runs of {args.steps} steps, {seconds:.0f} s in all.\n")
    path.write_text(text)
    return text


HEALTH_KEYS = ("entropy_min", "residual_min", "max_logit")


def health_file(runs: list[Run], config: dict, machine: dict) -> dict:
    """Each variant's attention health at the end of training, for tables "after training".

    Schema (version 1)::

        {"schema": "robust_attn.lr_sensitivity.health/1", "config": {...}, "machine": {...},
         "metrics": {"entropy_min": ..., "residual_min": ..., "max_logit": ...},  # meanings
         "variants": {variant: {
             "best_lr": float,                         # lowest min(L, L_0)
             "at_best_lr": {metric: float | None},     # the three metrics at best_lr
             "at_largest_lr": {metric: float | None},  # ... at the largest learning rate
             "runs": [{"lr": float, "final_loss": float | None, "diverged": bool,
                       metric: float | None, ...}]}}}

    Metrics (recipes/_health.py's worst-layer summary, one forward of 16 eval
    sequences after the last step): entropy_min, the lowest layer-mean normalised
    attention entropy (0 one-hot, 1 uniform); residual_min, the lowest res(X) of
    any layer's attention output; max_logit, the largest attention logit. None
    where the run diverged (no health was read) or the value is not finite.
    """
    def value(number: float | None) -> float | None:
        return number if number is not None and math.isfinite(number) else None

    def metrics(run: Run) -> dict[str, float | None]:
        return {key: value(run.health.get(key)) for key in HEALTH_KEYS}

    variants = {}
    for variant in dict.fromkeys(run.variant for run in runs):
        mine = [run for run in runs if run.variant == variant]
        best = min(mine, key=lambda run: run.capped_loss)
        variants[variant] = {
            "best_lr": best.lr, "at_best_lr": metrics(best),
            "at_largest_lr": metrics(max(mine, key=lambda run: run.lr)),
            "runs": [{"lr": run.lr, "final_loss": value(run.final_loss),
                      "diverged": run.diverged, **metrics(run)} for run in mine]}
    return {"schema": "robust_attn.lr_sensitivity.health/1", "config": config,
            "machine": machine,
            "metrics": {"entropy_min": "lowest layer-mean normalised attention entropy",
                        "residual_min": "lowest res(X) of a layer's attention output",
                        "max_logit": "largest attention logit of any layer"},
            "variants": variants}


def plot(path: Path, runs: list[Run], task: Task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, entropies) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in dict.fromkeys(run.variant for run in runs):
        mine = [run for run in runs if run.variant == variant]
        line, = losses.plot([r.lr for r in mine], [r.capped_loss for r in mine], marker="o",
                            label=variant)
        diverged = [r for r in mine if r.diverged]
        losses.scatter([r.lr for r in diverged], [r.capped_loss for r in diverged], marker="x",
                       s=80, color=line.get_color())
        entropies.plot([r.lr for r in mine], [r.health.get("entropy_min", math.nan) for r in mine],
                       marker="o", color=line.get_color())
    if "unigram_entropy" in task.floors:
        losses.axhline(task.floors["unigram_entropy"], color="black", linestyle="--",
                       label="unigram entropy (ignores the context)")
    else:
        losses.axhline(task.floors["eval_floor"], color="black", linestyle="--",
                       label="floor (true chain, eval tokens)")
    losses.set(xscale="log", xlabel="peak learning rate", ylabel="final eval loss, min(L, L_0)",
               title="loss vs learning rate (x: diverged)")
    entropies.set(xscale="log", xlabel="peak learning rate", ylim=(0, 1.02),
                  ylabel="worst layer's attention entropy / log N",
                  title="attention entropy at the end")
    losses.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_distributed(args.device)
    task = (text_task if args.task == "text" else markov_task)(args)
    eval_tokens = task.eval_tokens.to(distributed.device)
    bar = progress(len(args.variants) * len(args.lrs) * args.steps, desc="lr sweep",
                   enabled=distributed.is_main and not args.quiet and sys.stderr.isatty())
    start = time.perf_counter()
    runs = [train_run(variant, lr, args, task, eval_tokens, distributed, bar)
            for variant in args.variants for lr in args.lrs]
    bar.close()
    seconds = time.perf_counter() - start
    if distributed.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "processor": platform.processor(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": str(distributed.device), "world_size": distributed.world_size}
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"config": config,
                  "machine": machine, "floors": task.floors, "seconds": seconds,
                  "lr_sensitivity": {v: lr_sensitivity([r for r in runs if r.variant == v])
                                     for v in args.variants},
                  "runs": [asdict(run) for run in runs]}
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        (args.out / "health.json").write_text(json.dumps(health_file(runs, config, machine),
                                                         indent=1))
        print(write_table(args.out / "results.md", runs, args, task, seconds))
        if not args.no_plot:
            plot(args.out / "loss_vs_lr.png", runs, task)
    shutdown(distributed)


if __name__ == "__main__":
    main()
