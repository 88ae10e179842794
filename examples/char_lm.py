"""A tiny character-level language model trained with SAM over AdamW.

A few pre-norm transformer blocks with causal self-attention read a sentence one character at
a time and predict the next. Sentences have different lengths, so every batch is padded to
its longest sentence, and the per-token cross-entropy leaves the padding out: the loss module
``nn.CrossEntropyLoss(reduction="none", ignore_index=PAD)`` hands its ``ignore_index`` to
``samkit.make_closure``, whose objective is then exactly torch's mean over the real tokens
(the model returns ``[B, V, T]`` logits, classes second, as the loss module expects).

The text is generated here by a small grammar (subject-verb agreement, questions, adverbials),
so nothing is downloaded. The model should end well below the unigram entropy of the
characters (what a model that ignores the context can reach) on held-out sentences.

Usage::

    python examples/char_lm.py                                 # about a minute on one CPU core
    python examples/char_lm.py --steps 80 --dim 32 --quiet     # a few seconds
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import samkit

PAD, BOS, EOS = 0, 1, 2  # token ids; characters start at 3

# ----------------------------------------------------------------------------- the text
SINGULAR = ["the cat", "a dog", "my sister", "the old farmer", "a small bird", "the teacher",
            "our neighbour", "the baker"]  # fmt: skip
PLURAL = ["the cats", "two dogs", "my friends", "the farmers", "some birds", "the children",
          "our neighbours", "the bakers"]  # fmt: skip
VERBS = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("watches", "watch"),
         ("follows", "follow"), ("paints", "paint"), ("carries", "carry")]  # fmt: skip
OBJECTS = ["the river", "a red ball", "the green hill", "an apple", "the morning train",
           "a quiet song", "the blue door", "a wooden box"]  # fmt: skip
ENDINGS = ["", " every day", " in the garden", " at night", " near the house", " again",
           " after lunch"]  # fmt: skip


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar: a statement or a question, verbs agreeing with subjects."""
    plural = rng.random() < 0.5
    subject = rng.choice(PLURAL if plural else SINGULAR)
    third, base = rng.choice(VERBS)
    obj, end = rng.choice(OBJECTS), rng.choice(ENDINGS)
    if rng.random() < 0.25:
        return f"{'do' if plural else 'does'} {subject} {base} {obj}{end}?"
    if rng.random() < 0.2:
        return f"{subject} {'do' if plural else 'does'} not {base} {obj}{end}."
    return f"{subject} {base if plural else third} {obj}{end}."


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


class Vocab:
    def __init__(self, texts: list[str]) -> None:
        self.chars = sorted(set("".join(texts)))
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


def make_batch(texts: list[str], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[BOS] + chars`` and targets ``chars + [EOS]``, right-padded with ``PAD``."""
    seqs = [vocab.encode(t) for t in texts]
    length = max(len(s) for s in seqs) + 1
    x = torch.full((len(seqs), length), PAD)
    y = torch.full((len(seqs), length), PAD)
    for i, s in enumerate(seqs):
        x[i, : len(s) + 1] = torch.tensor([BOS] + s)
        y[i, : len(s) + 1] = torch.tensor(s + [EOS])
    return x, y


def unigram_entropy(texts: list[str], vocab: Vocab) -> float:
    """Entropy (nats) of the target tokens' frequencies: the loss of a context-free model."""
    counts = Counter(t for text in texts for t in vocab.encode(text) + [EOS])
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


# ----------------------------------------------------------------------------- the model
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        # Right padding + causal attention: a real token never attends to a padded one.
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.norm2(h))


class CharLM(nn.Module):
    """``[B, T]`` token ids -> ``[B, V, T]`` next-token logits."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, max_len: int, tie: bool):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for emb in (self.tok, self.pos):  # small embeddings: tied logits start near uniform
            nn.init.normal_(emb.weight, std=0.02)
        if tie:  # weight tying: one matrix embeds and reads out (a single parameter)
            self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).transpose(1, 2)

    @torch.no_grad()
    def generate(self, vocab: Vocab, max_len: int, generator: torch.Generator) -> str:
        ids = [BOS]
        while len(ids) < max_len:
            logits = self(torch.tensor([ids]))[0, :, -1]
            nxt = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=generator))
            if nxt in (EOS, PAD):
                break
            ids.append(nxt)
        return vocab.decode(ids)


# ----------------------------------------------------------------------------- training
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A character-level LM trained with SAM over AdamW")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius (0: plain AdamW)")
    p.add_argument("--no-tie", dest="tie", action="store_false", help="separate read-out")
    p.add_argument("--sentences", type=int, default=4000, help="size of the training text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss per real token over the batches (padding left out)."""
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for x, y in batches:
            total += float(F.cross_entropy(model(x), y, ignore_index=PAD, reduction="sum"))
            count += int((y != PAD).sum())
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_text = corpus(args.sentences, args.seed)
    test_text = corpus(256, args.seed + 1)
    vocab = Vocab(train_text + test_text)
    max_len = max(len(t) for t in train_text + test_text) + 1
    model = CharLM(len(vocab), args.dim, args.heads, args.layers, max_len, args.tie)
    opt = samkit.SAM(
        model.parameters(), base_optimizer="adamw", rho=args.rho, lr=args.lr,
        weight_decay=args.weight_decay, model=model,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps))
    )
    loss_fn = nn.CrossEntropyLoss(reduction="none", ignore_index=PAD)  # per token, no padding
    test_batches = [make_batch(test_text[i : i + 64], vocab) for i in range(0, 256, 64)]
    entropy = unigram_entropy(train_text, vocab)
    rng = random.Random(args.seed)
    start = evaluate(model, test_batches)
    log = print if not args.quiet else (lambda *a, **k: None)
    log(f"{len(train_text)} sentences, vocabulary {len(vocab)}, unigram entropy {entropy:.3f} nats")
    correct = counted = 0
    for step in range(1, args.steps + 1):
        x, y = make_batch(rng.sample(train_text, args.batch), vocab)
        closure = samkit.make_closure(model, loss_fn, x, y)
        loss = opt.step(closure)  # the mean over this batch's real tokens, at the clean weights
        sched.step()
        correct += int(closure.correct)  # token accuracy of the clean pass, padding left out
        counted += int(closure.counted)
        if step % 100 == 0 or step == args.steps:
            log(f"step {step:4d}  loss {float(loss):.3f}  token acc {correct / counted:.1%}")
            correct = counted = 0
    final = evaluate(model, test_batches)
    log(f"held-out loss per token: {start:.3f} -> {final:.3f} nats (unigram {entropy:.3f})")
    gen = torch.Generator().manual_seed(args.seed)
    model.eval()
    for _ in range(3):
        log("  sample:", model.generate(vocab, max_len, gen))
    return {"unigram_entropy": entropy, "initial_loss": start, "final_loss": final}


if __name__ == "__main__":
    main()
