"""Character-level Transformer training task on tiny shakespeare (next-character prediction).

An epoch is ``--steps-per-epoch`` batches of random ``block_size`` windows of the training text;
validation is the mean loss in nats per character over the whole validation split, read in
non-overlapping windows (so every validation character is scored once, with 0 to block_size-1
characters of context).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.modelfile import LoadedModel
from engine.models.transformer import CharTransformer, TransformerConfig
from training.data import load_shakespeare
from training.task import Task

Batch = tuple[torch.Tensor, torch.Tensor]

SAMPLE_PROMPTS = ("ROMEO:", "First Citizen:\n", "KING HENRY")


@torch.no_grad()
def sample_text(
    model: CharTransformer, vocab: str, prompt: str, n_new: int, temperature: float, generator: torch.Generator, device: torch.device
) -> str:
    """Plain sampling with a cropped context (the engine's KV-cache decoder is the fast path)."""
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([[lookup[c] for c in prompt]], device=device)
    out = []
    for _ in range(n_new):
        logits = model(ids[:, -model.config.block_size :])[:, -1, :] / temperature  # (1, vocab)
        probs = F.softmax(logits, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator).to(device)
        ids = torch.cat([ids, nxt], dim=1)
        out.append(vocab[int(nxt)])
    return prompt + "".join(out)


class TransformerTask(Task):
    kind = "char-transformer"
    help = "train the character-level Transformer on tiny shakespeare"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n-layer", type=int, default=4, help="Transformer blocks")
        parser.add_argument("--n-head", type=int, default=4, help="attention heads per block; must divide --d-model")
        parser.add_argument("--d-model", type=int, default=192, help="embedding width (the feed-forward layer is 4 times wider)")
        parser.add_argument("--block-size", type=int, default=128, help="context window in characters")
        # 0 by default: dropout cost about a third of each CPU step, and a 10-minute run sees the
        # text about 5 times, too few to overfit (docs/training.md). The seed used 0.1.
        parser.add_argument("--dropout", type=float, default=0.0, help="dropout rate (the reference script's is 0.1)")
        parser.add_argument(
            "--block",
            choices=["gpt2", "original"],
            default="gpt2",
            help="gpt2: pre-LN, GELU; original: the reference script's post-LN, ReLU",
        )
        parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
        parser.add_argument("--steps-per-epoch", type=int, default=250, help="batches per epoch")
        parser.set_defaults(epochs=6, batch_size=24, lr=2e-3, warmup_epochs=0.4, min_lr_ratio=0.1, patience=3)

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__(args, device)
        self.text = load_shakespeare()
        self.config = TransformerConfig(
            vocab_size=len(self.text.vocab),
            block_size=args.block_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            d_model=args.d_model,
            d_ff=4 * args.d_model,
            dropout=args.dropout,
            block=args.block,
        )
        self.model = CharTransformer(self.config).to(device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.99),
        )
        t = self.config.block_size
        n = (len(self.text.val) - 1) // t
        self.val_x = self.text.val[: n * t].view(n, t)
        self.val_y = self.text.val[1 : n * t + 1].view(n, t)

    def modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.opt}

    def steps_per_epoch(self) -> int:
        return int(self.args.steps_per_epoch)

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        data, t, b = self.text.train, self.config.block_size, self.args.batch_size
        for _ in range(self.steps_per_epoch()):
            starts = torch.randint(0, len(data) - t - 1, (b,), generator=generator)
            offsets = starts[:, None] + torch.arange(t)  # (B, T)
            yield data[offsets].to(self.device), data[offsets + 1].to(self.device)

    def train_step(self, batch: Batch) -> dict[str, float]:
        x, y = batch
        logits = self.model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        grad_norm = self.optimize(loss, self.opt)
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def validate(self) -> dict[str, float]:
        total, count = 0.0, 0
        for i in range(0, len(self.val_x), 64):
            x = self.val_x[i : i + 64].to(self.device)
            y = self.val_y[i : i + 64].to(self.device)
            logits = self.model(x)
            total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum"))
            count += y.numel()
        return {"val_loss": total / count}

    def export_module(self) -> nn.Module:
        return self.model

    def export_vocab(self) -> str:
        return self.text.vocab

    def write_samples(self, run_dir: Path, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        pieces = [sample_text(self.model, self.text.vocab, p, 400, 0.8, g, self.device) for p in SAMPLE_PROMPTS]
        path = run_dir / "samples.txt"
        path.write_text("\n\n----\n\n".join(pieces) + "\n", encoding="utf-8")
        return path


@torch.no_grad()
def evaluation_figures(model: LoadedModel, seed: int, samples: int) -> dict[str, float]:
    """training.eval's Transformer figure: validation loss in nats per character over the whole split."""
    text = load_shakespeare()
    if text.vocab != model.vocab:
        raise ValueError(f"{model.path}: vocabulary differs from tiny shakespeare's")
    t = model.config.block_size
    n = (len(text.val) - 1) // t
    x, y = text.val[: n * t].view(n, t), text.val[1 : n * t + 1].view(n, t)
    total = 0.0
    for i in range(0, n, 64):
        logits = model.module(x[i : i + 64])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i : i + 64].reshape(-1), reduction="sum"))
    return {"val_loss_nats_per_char": total / y.numel()}
