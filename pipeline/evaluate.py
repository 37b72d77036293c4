"""Evaluation on the validation split: every sample exactly once over all ranks.

The model and its EMA are evaluated on the same batches in one pass over the split
(one set of decoded images, one fork of the loader's workers, instead of two).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Validator:
    def __init__(self, loader, device: torch.device, dtype: torch.dtype, finish=None, every: int = 1):
        self.loader = loader
        self.every = every  # train.eval_every: epochs between evaluations (0: only at the end)
        self.finish = finish  # a DeviceFinish for uint8 batches (data.finish=device)
        self.device = device
        self.dtype = dtype  # the engine's input dtype (the EMA is fp32 and takes fp32)

    def due(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (counted from 1) is an evaluation's."""
        return bool(self.every) and epoch % self.every == 0

    @torch.no_grad()
    def validate(self, models: dict[str, tuple[torch.nn.Module, bool]]) -> dict[str, dict[str, float]]:
        """``models``: name -> (module, cast the input to the engine's dtype). Returns
        name -> {loss, top1, top5, count}. Synchronizes ranks (one all-reduce, and ZeRO-3's
        gathers inside the forward passes, which the padded batches keep in step)."""
        modes = {name: m.training for name, (m, _) in models.items()}
        for m, _ in models.values():
            m.eval()
        # per model: loss, top1, top5, count
        sums = torch.zeros(len(models), 4, dtype=torch.float64, device=self.device)
        try:
            for batch in self.loader.epoch(0):
                if self.finish is not None:
                    x, y = self.finish(batch)
                else:
                    x = batch["image"].to(self.device, non_blocking=True)
                    y = batch["label"].to(self.device, non_blocking=True)
                mask = y >= 0
                for i, (module, cast) in enumerate(models.values()):
                    logits = module(x.to(self.dtype) if cast else x).float()  # every rank runs it (ZeRO-3)
                    sums[i] += _scores(logits[mask], y[mask])
        finally:
            for name, (m, _) in models.items():
                m.train(modes[name])
        dist.all_reduce(sums)
        out = {}
        for i, name in enumerate(models):
            loss, top1, top5, n = sums[i].tolist()  # one device sync per model, after the pass
            n = max(1.0, n)
            out[name] = {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": n}
        return out


def _scores(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed loss, top-1 hits, top-5 hits and count, on the device (no sync)."""
    if len(y) == 0:
        return torch.zeros(4, dtype=torch.float64, device=logits.device)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return torch.stack(
        [
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
            (top[:, 0] == y).sum().double(),
            (top == y[:, None]).any(1).sum().double(),
            torch.tensor(float(len(y)), dtype=torch.float64, device=logits.device),
        ]
    )
