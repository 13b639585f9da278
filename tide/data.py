"""Training data for the built-in model: standard-library Python source plus generated exact-answer tasks.

Owns the corpus (the running interpreter's stdlib `.py` files, sorted, test dirs excluded, every 20th file
held out), the task family (`07+35=042`, `copy 4821=4821`, `rev 4821=1284`, held out by a hash of the
prompt; fixed widths, so every answer digit sits at a fixed offset from the digits it comes from), the
byte-level BPE tokenizer (digits split one per token so arithmetic is learnable) and the batches. Every
sample ends with EOS and is padded with EOS, as `tide.decode` stops on EOS. Deterministic for a seed.
Knows nothing about the model.
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

PAD, EOS, MASK = "<|pad|>", "<|endoftext|>", "<|mask|>"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELD_OUT_EVERY = 20  # every 20th stdlib file (sorted order) is held out
FAMILIES = ("add", "copy", "rev")
ADD_DIGITS, COPY_DIGITS = 2, 4  # operands 00..99 (answer 000..198, three digits); copy/rev strings of 4 digits


def stdlib_files(root: str | Path | None = None, max_file_bytes: int = 200_000) -> list[Path]:
    """The interpreter's standard-library `.py` files in sorted (deterministic) order, tests excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: standard-library directory not found")
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
             and p.stat().st_size <= max_file_bytes]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held_out): every HELD_OUT_EVERY-th file is held out."""
    held = [p for i, p in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [p for i, p in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held


@dataclass(frozen=True)
class Task:
    prompt: str  # e.g. "07+35="
    answer: str  # e.g. "042"
    family: str

    @property
    def held_out(self) -> bool:
        """A fixed 10% of all prompts never appear in training (stable across runs and machines)."""
        return zlib.crc32(self.prompt.encode()) % 10 == 0


def make_task(rng: random.Random) -> Task:
    """One task, zero-padded to fixed widths.

    Fixed widths put each answer digit at a constant distance from its source digits, a lookup that
    relative (RoPE) attention learns early; with variable widths (`12+5=17`, 3-8 digit copies) the first
    built-in model stayed at 0-2% exact match after 900 steps (model card, git history).
    """
    family = rng.choice(FAMILIES)
    if family == "add":
        a, b = rng.randrange(10 ** ADD_DIGITS), rng.randrange(10 ** ADD_DIGITS)
        return Task(f"{a:0{ADD_DIGITS}d}+{b:0{ADD_DIGITS}d}=", f"{a + b:0{ADD_DIGITS + 1}d}", family)
    digits = "".join(rng.choice("0123456789") for _ in range(COPY_DIGITS))
    return Task(f"{family} {digits}=", digits if family == "copy" else digits[::-1], family)


def tasks(n: int, seed: int, held_out: bool = False) -> list[Task]:
    """n tasks from the training (or the held-out) side of the split, deterministic for a seed."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        task = make_task(rng)
        if task.held_out == held_out:
            out.append(task)
    return out


def train_tokenizer(texts: Iterator[str] | list[str], vocab_size: int):
    """Byte-level BPE with <|pad|>, <|endoftext|>, <|mask|> as ids 0, 1, 2; each digit its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, MASK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_token_ids(tok) -> dict[str, int]:
    return {"pad_token_id": tok.token_to_id(PAD), "eos_token_id": tok.token_to_id(EOS),
            "mask_token_id": tok.token_to_id(MASK)}


def encode_documents(tok, texts: list[str]) -> Tensor:
    """One flat int64 stream: each document's tokens followed by EOS."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


def code_batch(stream: Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of the document stream: ids [B, T] and maskable [B, T] (all True)."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
    ids = torch.stack([stream[s: s + seq_len] for s in starts.tolist()])  # [B, T]
    return ids, torch.ones_like(ids, dtype=torch.bool)


def task_rows(tok, items: list[Task], seq_len: int) -> tuple[Tensor, Tensor]:
    """prompt + answer + EOS, EOS-padded to seq_len: ids [B, T] and maskable [B, T] (the answer side only)."""
    eos = tok.token_to_id(EOS)
    ids = torch.full((len(items), seq_len), eos, dtype=torch.long)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    for row, task in enumerate(items):
        prompt = tok.encode(task.prompt).ids
        answer = tok.encode(task.answer).ids
        seq = (prompt + answer)[:seq_len]
        if len(prompt) >= seq_len:
            raise ValueError(f"task prompt {task.prompt!r} is longer than seq_len {seq_len}")
        ids[row, : len(seq)] = torch.tensor(seq)
        maskable[row, : len(prompt)] = False
    return ids, maskable


class TaskSampler:
    """Endless training-side tasks from one seeded RNG (an object, so no module-level state)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def sample(self, n: int) -> list[Task]:
        out: list[Task] = []
        while len(out) < n:
            task = make_task(self.rng)
            if not task.held_out:
                out.append(task)
        return out
