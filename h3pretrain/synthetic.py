"""The paper's synthetic in-context-learning tasks (docs/design.md section 3), set up as the reference
code (HazyResearch/safari: dataloaders/synthetics.py, configs/experiment/synthetics) does: 2-layer
models of width 32, 5,000 training and 500 test examples drawn once, AdamW lr 5e-4 (SSM parameters
at most 1e-3), weight decay 0.1, 10% warmup, batches of 32, embedding/attention dropout 0.1.

Induction Head (vocab 20, 31 input tokens, 400 epochs): 30 random tokens, one of which is the
trigger (id 0) followed by some token x, then the trigger again; the answer is x.
Associative Recall (vocab 10, 22 input tokens, 200 epochs): id 0 is the separator, keys and values
split the rest evenly (4 and 4); each example draws its own key -> value map and shows 10 (key,
value) pairs, then the separator and one of the keys it showed; the answer is that key's value.

Training is next-token prediction over the whole example (inputs + answer), as in the reference:
each repeated key inside an example is a recall target too (`loss="answer"` trains on the answer
alone: much faster on induction, where nothing else is predictable). The score is the test accuracy
of the prediction at the last input position (the answer).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import SYNTHETIC_TASKS as TASKS, ConfigError, SyntheticSettings

TRIGGER = 0  # induction's trigger, associative recall's separator
SSM_MAX_LR = 1e-3  # the reference caps the SSM parameters' learning rate


def induction_examples(n: int, vocab: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if vocab < 3 or length < 4:
        raise ConfigError(f"induction needs vocab_size >= 3 and seq_len >= 4, not {vocab} and {length}")
    x = rng.integers(1, vocab, size=(n, length))  # never the trigger
    pos = rng.integers(0, length - 3, size=n)  # the trigger, then the token to recall, before the end
    rows = np.arange(n)
    x[rows, pos] = TRIGGER
    x[:, -1] = TRIGGER
    return x, x[rows, pos + 1].copy()


def assoc_recall_examples(n: int, vocab: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if vocab < 5 or length < 4 or length % 2:
        raise ConfigError(f"assoc_recall needs vocab_size >= 5 and an even seq_len >= 4 (pairs, separator, query), "
                          f"not {vocab} and {length}")
    n_keys = (vocab - 1) // 2
    pairs = (length - 2) // 2
    table = rng.integers(1 + n_keys, 1 + 2 * n_keys, size=(n, n_keys))  # each example's key -> value map
    keys = rng.integers(0, n_keys, size=(n, pairs))
    rows = np.arange(n)
    values = table[rows[:, None], keys]
    query = keys[rows, rng.integers(0, pairs, size=n)]  # a key the example showed
    x = np.concatenate([np.stack([keys + 1, values], axis=-1).reshape(n, 2 * pairs),
                        np.full((n, 1), TRIGGER), query[:, None] + 1], axis=1)
    return x, table[rows, query]


def make_dataset(s: SyntheticSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Distinct training examples, and test examples none of which occurs in training."""
    if s.task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {s.task!r}")
    vocab, length = s.shape()
    make = induction_examples if s.task == "induction" else assoc_recall_examples
    rng = np.random.default_rng(s.seed)
    seen: set[bytes] = set()
    splits = {}
    for name, count in (("train", s.n_train), ("test", s.n_test)):
        xs, ys = [], []
        for _ in range(100):
            if len(xs) >= count:
                break
            x, y = make(2 * count, vocab, length, rng)
            for row, target in zip(x, y):
                key = row.tobytes()
                if key not in seen:
                    seen.add(key)
                    xs.append(row)
                    ys.append(target)
        if len(xs) < count:
            raise ConfigError(f"cannot draw {count} distinct {s.task} examples with vocab {vocab}, length {length}")
        splits[name] = (torch.from_numpy(np.stack(xs[:count])), torch.from_numpy(np.array(ys[:count])))
    return splits


def build_model(s: SyntheticSettings):
    from .config import ModelConfig
    from .model import HybridLM

    vocab, _ = s.shape()
    head = s.d_model // s.attn_num_heads
    cfg = ModelConfig(vocab_size=vocab, d_model=s.d_model, n_layer=s.n_layer, attn_layer_idx=[], mixer=s.mixer,
                      attn_num_heads=s.attn_num_heads, attn_rotary_dim=head if s.attn_rotary else 0,
                      embed_dropout=s.dropout, attn_dropout=s.dropout, resid_dropout=0.0)
    return HybridLM(cfg)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, vocab: int, batch: int = 500) -> float:
    model.eval()
    hits = sum(int((model(xb)[:, -1, :vocab].argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    model.train()
    return hits / len(y)


def _optimizer(model, s: SyntheticSettings) -> torch.optim.Optimizer:
    """AdamW; the SSM kernel parameters that the reference registers with their own lr (log_dt, A,
    B: those without weight decay) at min(SSM_MAX_LR, lr)."""
    from .model.ssm import NO_WEIGHT_DECAY
    from .train.optim import param_groups

    ssm = {id(p) for n, p in model.named_parameters() if "_kernel." in n and n.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY}
    groups = []
    for g in param_groups(model, s.weight_decay):
        for is_ssm in (False, True):
            params = [p for p in g["params"] if (id(p) in ssm) == is_ssm]
            if params:
                groups.append({**g, "params": params, "lr": min(SSM_MAX_LR, s.lr) if is_ssm else s.lr})
    return torch.optim.AdamW(groups, lr=s.lr)


def _schedule(s: SyntheticSettings, total: int) -> Callable[[int], float]:
    """Linear warmup, then linear decay to 0 (associative recall) or cosine to 0.1 (induction)."""
    warmup = max(1, round(s.warmup_fraction * total))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        done = min(1.0, (i - warmup) / max(1, total - warmup))
        if s.task == "assoc_recall":
            return 1.0 - done
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    return factor


def run(s: SyntheticSettings, log: Callable[[str], None] = print) -> dict:
    """Train from scratch and return the test accuracy (and how it got there)."""
    if s.loss not in ("all", "answer"):
        raise ConfigError(f"loss must be 'all' or 'answer', not {s.loss!r}")
    data = make_dataset(s)
    vocab, length = s.shape()
    torch.manual_seed(s.seed)
    model = build_model(s)
    opt = _optimizer(model, s)
    x, y = data["train"]
    sequences = torch.cat([x, y[:, None]], dim=1)  # inputs + answer: next-token targets everywhere
    steps_per_epoch = math.ceil(len(y) / s.batch_size)
    epochs = s.num_epochs()
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s, total))
    gen = torch.Generator().manual_seed(s.seed)
    t0 = time.time()
    history = []
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y), generator=gen)
        total_loss = 0.0
        for idx in order.split(s.batch_size):
            batch = sequences[idx]
            logits = model(batch[:, :-1])[..., :vocab]
            if s.loss == "answer":
                loss = F.cross_entropy(logits[:, -1], batch[:, -1])
            else:
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        test_acc = accuracy(model, *data["test"], vocab)
        history.append({"epoch": epoch, "loss": total_loss / len(y), "test_accuracy": test_acc})
        log(f"{s.task} {s.mixer} epoch {epoch}/{epochs} | loss {total_loss / len(y):.4f} | "
            f"test accuracy {test_acc:.3f} | {time.time() - t0:.1f} s")
    return {"task": s.task, "mixer": s.mixer, "vocab_size": vocab, "seq_len": length, "epochs": epochs,
            "test_accuracy": history[-1]["test_accuracy"], "train_accuracy": accuracy(model, x, y, vocab),
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.time() - t0,
            "history": history, "settings": asdict(s)}
