"""Between the PyTorch models and a checkpoint folder (see weights.py for the format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from .search import MODEL_FILE, OLDER_DATASET_TERM, older_dataset_term
from .sizes import ModelSizes
from .weights import Checkpoint, write_checkpoint


def save_models(
    folder: Path,
    generator,
    predictor,
    *,
    encoder: dict[str, Any],
    name: str,
    database: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    target: dict[str, float] | None = None,
) -> Checkpoint:
    """Write both networks as one ``model.safetensors`` (``generator.*``, ``predictor.*``)."""
    tensors = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    tensors |= {f"predictor.{k}": v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    config = {
        "name": name,
        "model": generator.sizes.to_dict(),
        "encoder": dict(encoder),
        "database": database or {},
        "metrics": metrics or {},
        "target": target or {"mean": 0.0, "std": 1.0},
        "predictor": {"terms": list(predictor.terms)},
    }
    return write_checkpoint(folder, config, {MODEL_FILE: tensors})


def load_models(ckpt: Checkpoint):
    """(CellGenerator, MetaPredictor) with the checkpoint's weights, in eval mode."""
    import torch

    from .models import CellGenerator, MetaPredictor

    sizes = ModelSizes.from_dict(ckpt.config["model"])
    arrays = ckpt.arrays(MODEL_FILE)
    terms = tuple(ckpt.config.get("predictor", {}).get("terms", ["dataset"]))
    if older_dataset_term(arrays, terms):
        raise UserError(f"{ckpt.path / MODEL_FILE} {OLDER_DATASET_TERM}")
    gen, pred = CellGenerator(sizes), MetaPredictor(sizes, terms)
    for prefix, module in (("generator.", gen), ("predictor.", pred)):
        state = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        # Checkpoints from before the table term have no prior.*, and those from before the
        # edge term carry the old MLP head (head.*) even when only the table scores.
        unexpected = [k for k in unexpected if not (k.startswith("head.") and "dataset" not in terms)]
        if unexpected or any(not (k.startswith("prior.") and "table" not in terms) for k in missing):
            raise UserError(f"{ckpt.path}: model tensors do not match this metad2a ({missing or unexpected})")
        module.eval()
    return gen, pred
