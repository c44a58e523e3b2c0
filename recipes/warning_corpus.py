#!/usr/bin/env python
"""A labelled corpus of training runs for scoring early warnings, reproducible by seed.

Each run trains a small pre-LN causal character LM (recipes/_causal_lm.py:
4 layers, width 64, 4 heads, 64-character contexts, batch 16, 300 steps) on
the Python standard library's sources (recipes/_text.py) under a
:class:`robust_attn.HealthMonitor` (every 10 steps), and is labelled healthy or
failed, with its failure step, by the loss-only rule of recipes/_failure.py.
Runs fail, when they do, because of how they are set up, never because the
monitor was changed: a large learning rate, no warm-up, no gradient clipping,
a large initial QK scale (W_q and W_k multiplied by ``qk_scale`` after the
default init, so logits by its square: entropy collapse at init) or more depth.

Per run, in ``--out/<config>-s<seed>/``: ``train.csv`` (step, loss, lr,
grad_norm), ``health.csv`` (``HealthMonitor.to_csv``) and ``label.json`` (the
configuration, eval loss at init and end, the verdict). ``--out/corpus.json``
lists every run with its label, the corpus's SHA-256 and the time taken.

Every random draw comes from the run's seed: ``torch.manual_seed(seed)`` for
the initialisation and a ``torch.Generator`` seeded with ``seed + 1`` for the
batches, so the same command writes the same files. Seeds 0-2 form the
calibration split, seeds 3-5 the held-out split (recipes/warning_evaluation.py).

Example:
    python recipes/warning_corpus.py --threads 1 --out runs/warning_corpus
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _causal_lm import CausalLM
from _failure import judge
from _logging import MetricsLog
from _optim import adamw, warmup_cosine_schedule
from _text import VOCAB, TextCorpus

import robust_attn


@dataclass(frozen=True)
class RunConfig:
    """How one run is set up (the failure levers are lr, warmup, clip, qk_scale, depth)."""

    name: str
    variant: str = "baseline"
    lr: float = 3e-3
    warmup: int = 30
    clip: float = 1.0
    qk_scale: float = 1.0
    depth: int = 4


CONFIGS = (
    RunConfig("base-lr1e-3", lr=1e-3),
    RunConfig("base-lr3e-3", lr=3e-3),
    RunConfig("qknorm-lr3e-3", variant="qk_norm", lr=3e-3),
    RunConfig("base-lr1e-1-nowarm", lr=1e-1, warmup=0, clip=0.0),
    RunConfig("base-lr3e-1-w100-noclip", lr=3e-1, warmup=100, clip=0.0),
    RunConfig("base-lr1-w200-noclip", lr=1.0, warmup=200, clip=0.0),
    RunConfig("qk32-lr3e-3-nowarm", lr=3e-3, warmup=0, qk_scale=32.0),
    RunConfig("qk32-lr1e-2", lr=1e-2, qk_scale=32.0),
)
CALIBRATION_SEEDS = (0, 1, 2)
HELD_OUT_SEEDS = (3, 4, 5)
STEPS, BATCH, LENGTH, DIM, HEADS, EVERY = 300, 16, 64, 64, 4, 10


def scale_qk(model: CausalLM, factor: float) -> None:
    """Multiply every attention module's W_q and W_k (and their biases) by ``factor``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, robust_attn.RobustAttention):
                qk = 2 * module.attn_dim
                module.qkv.weight[:qk] *= factor
                if module.qkv.bias is not None:
                    module.qkv.bias[:qk] *= factor
                module.reset_from_weights()


def lm_loss(model: CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy: positions 0 .. N-2 predict 1 .. N-1."""
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: CausalLM, tokens: torch.Tensor) -> float:
    try:
        return lm_loss(model, tokens).item()
    except RuntimeError as error:  # RobustAttention refuses overflowing logits
        if not str(error).startswith("x: "):
            raise
        return math.nan


def train(config: RunConfig, seed: int, corpus: TextCorpus, eval_tokens: torch.Tensor,
          out: Path, unigram: float, steps: int = STEPS) -> dict:
    """Train one run, write its three files, return its label."""
    torch.manual_seed(seed)
    model = CausalLM(config.variant, VOCAB, LENGTH, DIM, config.depth, HEADS)
    scale_qk(model, config.qk_scale)
    optimizer = adamw(model, config.lr, 1e-4 / config.lr, betas=(0.9, 0.95))
    schedule = warmup_cosine_schedule(optimizer, config.warmup, steps)
    batches = torch.Generator().manual_seed(seed + 1)
    eval_init = evaluate(model, eval_tokens)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("train.csv", "health.csv"):
        (out / stale).unlink(missing_ok=True)
    log = MetricsLog(out, tensorboard=False)
    losses = []
    with robust_attn.HealthMonitor(model, every=EVERY) as monitor:
        for step in range(steps):
            tokens = corpus.batch(corpus.train, BATCH, LENGTH + 1, batches)
            try:
                loss = lm_loss(model, tokens)
            except RuntimeError as error:
                if not str(error).startswith("x: "):
                    raise
                loss = torch.tensor(math.nan)
            if loss.requires_grad:
                loss.backward()
            monitor.step(loss)
            grad = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip or math.inf)
            losses.append(loss.item())
            log.write("train", {"step": step, "loss": losses[-1],
                                "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad.item()})
            if not math.isfinite(losses[-1]):
                break
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        monitor.to_csv(out / "health.csv")
    log.close()
    eval_final = evaluate(model, eval_tokens) if math.isfinite(losses[-1]) else math.nan
    verdict = judge(losses, eval_final, unigram)
    label = {"run": out.name, "seed": seed, "split": split_of(seed), "config": asdict(config),
             "steps": steps, "steps_taken": len(losses), "eval_init": eval_init,
             "eval_final": eval_final, "unigram_entropy": unigram, **asdict(verdict)}
    (out / "label.json").write_text(json.dumps(label, indent=1))
    return label


def split_of(seed: int) -> str:
    return "calibration" if seed in CALIBRATION_SEEDS else "held_out"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/warning_corpus"))
    parser.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS],
                        choices=[c.name for c in CONFIGS], metavar="CONFIG",
                        help="run configurations (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        default=[*CALIBRATION_SEEDS, *HELD_OUT_SEEDS])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected a positive count")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = TextCorpus.stdlib()
    eval_tokens = corpus.eval_batches(64, LENGTH + 1, seed=12345)
    unigram = corpus.unigram_entropy()
    configs = {c.name: c for c in CONFIGS}
    start, labels = time.perf_counter(), []
    for name in args.configs:
        for seed in args.seeds:
            label = train(configs[name], seed, corpus, eval_tokens, args.out / f"{name}-s{seed}",
                          unigram, args.steps)
            labels.append(label)
            print(f"{label['run']}: {label['kind']} at {label['failure_step']} "
                  f"(eval {label['eval_init']:.3f} -> {label['eval_final']:.3f}), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    summary = {"corpus_sha256": corpus.sha256, "corpus_files": corpus.files,
               "unigram_entropy": unigram, "seconds": time.perf_counter() - start,
               "threads": torch.get_num_threads(), "runs": labels}
    (args.out / "corpus.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
