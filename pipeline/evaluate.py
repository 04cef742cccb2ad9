"""The one evaluator: classification metrics over a validation split, single- or multi-label.

``Scores`` accumulates per batch and is what both sides use:

- the training loop (``pipeline.train``) on each rank, summed across ranks with ``all_reduce``;
- one process (``evaluate_model``), or the cluster's workers (``pipeline.evaluate_ray``: each scores
  a part of the split and returns its ``Scores``, which the driver merges with ``Scores.merge``).

Metrics, by label type:

- single-label: ``top1``, ``top5``, ``loss`` (cross-entropy against the hard label);
- multi-label: ``precision_at_1`` (the top class is a positive), ``recall_at_5`` (a positive is
  among the top 5), ``loss`` (sigmoid BCE summed over classes, mean over images), and, on the
  driver, ``mAP`` (mean over classes with a positive of the average precision).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the metric each label type is judged by (promotion's default)
PRIMARY = {"single": "top1", "multi": "precision_at_1"}


class Scores:
    """Running sums of one evaluation. ``keep_outputs``: also keep sigmoid scores and labels for
    mAP (driver side; memory grows with samples x classes)."""

    def __init__(self, label_type: str, *, keep_outputs: bool = False) -> None:
        if label_type not in PRIMARY:
            raise ValueError(f"label_type must be 'single' or 'multi', got {label_type!r}")
        self.label_type = label_type
        self.sums = torch.zeros(4, dtype=torch.float64)    # hit@1, hit@5, count, loss sum
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep_outputs else None

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add a batch; ``labels``: class ids [B] (single) or multi-hot [B, C]. Returns this batch's
        per-sample top-1 correctness (bool [B])."""
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
        if self.label_type == "multi":
            pos = labels > 0.5
            hit1 = pos.gather(1, top5[:, :1]).any(1)
            hit5 = pos.gather(1, top5).any(1)
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
            if self._outputs is not None:
                self._outputs.append((torch.sigmoid(logits).cpu(), pos.cpu()))
        else:
            hit1 = top5[:, 0] == labels
            hit5 = (top5 == labels[:, None]).any(1)
            loss = F.cross_entropy(logits, labels, reduction="sum")
        batch = torch.stack([hit1.sum(), hit5.sum(), torch.tensor(len(logits), device=logits.device),
                             loss.detach()]).double()
        if self.sums.device != batch.device:      # the sums live where the logits are: no host sync
            self.sums = self.sums.to(batch.device)
        self.sums += batch
        return hit1

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum across the ranks of the default process group (every rank calls this), issued on
        ``device``, the training device: an NCCL group (GPU workers) has no CPU backend."""
        import torch.distributed as dist

        self.sums = self.sums.to(device)
        dist.all_reduce(self.sums)

    def merge(self, other: "Scores") -> None:
        """Add another evaluation's sums (and kept outputs) of disjoint samples: a part scored elsewhere."""
        self.sums = self.sums.cpu() + other.sums.cpu()
        if self._outputs is not None and other._outputs:
            self._outputs += other._outputs

    @property
    def count(self) -> int:
        return int(self.sums[2].item())

    def result(self) -> dict[str, float]:
        h1, h5, n, loss = self.sums.cpu().tolist()
        n = max(n, 1.0)
        if self.label_type == "multi":
            out = {"precision_at_1": h1 / n, "recall_at_5": h5 / n, "loss": loss / n}
            if self._outputs:
                out["mAP"] = mean_average_precision(torch.cat([s for s, _ in self._outputs]),
                                                    torch.cat([p for _, p in self._outputs]))
            return out
        return {"top1": h1 / n, "top5": h5 / n, "loss": loss / n}


def mean_average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Mean over classes that have a positive of the average precision of ranking by ``scores``."""
    order = scores.argsort(dim=0, descending=True)
    pos = positives.gather(0, order).float()                   # [N, C], ranked per class
    hits = pos.cumsum(0)
    precision = hits / torch.arange(1, len(pos) + 1, dtype=torch.float32)[:, None]
    n_pos = pos.sum(0)
    ap = (precision * pos).sum(0) / n_pos.clamp(min=1)
    return float(ap[n_pos > 0].mean()) if (n_pos > 0).any() else float("nan")


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str):
    """The forward's precision: ``fp32`` (no autocast) or ``bf16`` (autocast, as the training
    forward runs under bf16); a ValueError names anything else."""
    import contextlib

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def score_batches(model: torch.nn.Module, loader, scores: Scores, device: torch.device, *,
                  precision: str = "fp32", correct: dict[str, bool] | None = None) -> None:
    """Run ``model`` over every batch of ``loader`` into ``scores`` (and per-sample top-1 hits into
    ``correct``, keyed by sample key): the one scoring loop of the single-process evaluator and of
    each worker of the distributed one."""
    with torch.inference_mode(), autocast(device, precision):
        for batch in loader:
            if not len(batch):
                continue
            hit = scores.update(model(batch.images.to(device)), batch.labels.to(device))
            if correct is not None:
                correct.update(zip(batch.keys, hit.tolist()))


def evaluation_loader(val, spec, *, batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1):
    """The StreamingLoader of one part (``rank`` of ``world_size``: every sample in exactly one part)
    of the split ``val`` (folder, URL or a loaded ShardIndex), with the model's own eval preprocessing
    (``spec``: ``pipeline.spec.ModelSpec``); DataError when the data does not fit the model."""
    from pipeline.data import DataError, StreamingLoader
    from pipeline.spec import spec_augment

    h, _ = spec.img_size
    loader = StreamingLoader(val, rank=rank, world_size=world_size, batch_size=batch_size, img_size=h,
                             train=False, num_workers=num_workers, augment=spec_augment(spec),
                             max_skip_fraction=0.0)
    if loader.index.num_classes != spec.num_classes:
        raise DataError(f"evaluation data {val if isinstance(val, str) else loader.index.root} has "
                        f"{loader.index.num_classes} classes, the model {spec.num_classes}")
    return loader


def finish(scores: Scores, val: str, correct: dict[str, bool] | None) -> dict:
    """The result dict of an evaluation: metrics, ``num_samples``, and ``correct`` when kept."""
    from pipeline.data import DataError

    if scores.count == 0:
        raise DataError(f"no samples in {val!r}")
    return {**scores.result(), "num_samples": scores.count, **({"correct": correct} if correct is not None else {})}


def evaluate_model(model: torch.nn.Module, spec, val: str, *, batch_size: int = 64,
                   num_workers: int = 0, device: torch.device | None = None,
                   per_sample: bool = False, precision: str = "fp32") -> dict:
    """Metrics of ``model`` over every sample of the split ``val`` (folder or URL of its index), read
    by pipeline.data's StreamingLoader with the model's own eval preprocessing (``spec``:
    ``pipeline.spec.ModelSpec``), in this process; ``precision``: ``fp32`` or ``bf16`` (autocast).
    Adds ``num_samples``; with ``per_sample`` also ``correct``: {sample key: top-1 hit} (for paired
    tests between models). Raises DataError on unusable data. On a cluster:
    ``pipeline.evaluate_ray.evaluate_on_cluster``."""
    loader = evaluation_loader(val, spec, batch_size=batch_size, num_workers=num_workers)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    scores = Scores(loader.index.label_type, keep_outputs=loader.index.label_type == "multi")
    correct: dict[str, bool] | None = {} if per_sample else None
    score_batches(model, loader, scores, device, precision=precision, correct=correct)
    return finish(scores, val, correct)
