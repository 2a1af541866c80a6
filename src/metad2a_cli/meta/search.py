"""Search: dataset features -> ranked NAS-Bench-201 cells, with the NumPy engine.

Nothing here imports torch: with cached image features, a search is NumPy work of well
under a second. The embedding of every cell depends only on the weights, so it is
computed once per set of weights and kept in the cache folder.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_paths
from ..errors import UserError
from ..nb201.cells import NUM_CELLS, Cell
from ..nb201.cost import cell_cost
from ..nb201.graph import node_type_array
from ..paths import cache_dir
from . import engine
from .sizes import ModelSizes

MODEL_FILE = "model.safetensors"
SAMPLE_BATCH = 1000
# A trained generator concentrates on few cells, so most later samples repeat earlier ones:
# on the shipped weights 2,000 samples gave 326 unique cells and the same top 5 as 11,000
# samples (500 unique), in a fifth of the time (docs/generalization.md).
MAX_SAMPLES = 2_000


@dataclass(frozen=True)
class RankedCell:
    rank: int
    cell: str
    nb201_index: int
    predicted_accuracy: float
    params: int
    flops: int


@dataclass
class SearchResult:
    ranking: list[RankedCell]
    num_classes: int
    mode: str  # "generate" or "exhaustive"
    candidates: int
    samples_drawn: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def older_dataset_term(names, terms: Sequence[str]) -> bool:
    """Weights trained before the edge-operation term scored the dataset with an MLP head
    (``predictor.head.*``), which this version cannot read."""
    names = set(names)
    return "dataset" in terms and "predictor.dataset_term.shared" not in names and any(
        n.startswith("predictor.head.") for n in names
    )


OLDER_DATASET_TERM = "holds an older metad2a's dataset term (an MLP head), which this version does not read; train the weights again with `metad2a train`"


def check_options(top_k: int, num_candidates: int, seed: int) -> None:
    for flag, value, lowest in (("--top-k", top_k, 1), ("--num-candidates", num_candidates, 1), ("--seed", seed, 0)):
        if value < lowest:
            raise UserError(f"{flag} must be at least {lowest}, got {value}")


class SearchModel:
    """Trained weights as NumPy arrays, plus what is derived from them once."""

    def __init__(
        self,
        weights: dict[str, np.ndarray],
        sizes: ModelSizes,
        identity: str,
        target: dict | None = None,
        terms: Sequence[str] = ("dataset",),
    ):
        self.weights = weights
        self.sizes = sizes
        self.terms = tuple(terms)  # the predictor's trained terms (checkpoints before them: "dataset")
        self.identity = identity  # sha256 of the weights file: keys derived caches
        # Predictor outputs are standardised accuracies; map them back to percent.
        self.target = target or {"mean": 0.0, "std": 1.0}
        self._embeddings: np.ndarray | None = None

    @classmethod
    def load(cls, folder: Path, config: dict) -> SearchModel:
        from safetensors.numpy import load_file

        path = folder / MODEL_FILE
        if not path.is_file():
            raise UserError(f"{folder} has no {MODEL_FILE}")
        identity = config.get("files", {}).get(MODEL_FILE) or hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            sizes = ModelSizes.from_dict(config["model"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{folder / 'config.json'}: 'model' needs integer feature_dim, hidden, latent and heads") from err
        try:
            weights = load_file(str(path))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise UserError(f"{path} is not a readable safetensors file ({err})") from err
        terms = config.get("predictor", {}).get("terms", ["dataset"])
        if older_dataset_term(weights, terms):
            raise UserError(f"{path} {OLDER_DATASET_TERM}")
        model = cls(weights, sizes, identity, config.get("target"), terms)
        model._probe(path)
        return model

    def _probe(self, path: Path) -> None:
        """Run every network once on a tiny input. A file whose sha256 matches config.json can
        still hold other tensor names or shapes than its sizes say: fail here, in one line."""
        try:
            x = np.zeros((1, 2, 1, self.sizes.feature_dim), dtype=np.float32)
            mask = np.ones((1, 2, 1), dtype=bool)
            d = engine.set_encode(self.weights, "predictor.set_encoder", x, mask, self.sizes.heads)[0]
            graphs = engine.graph_encode(self.weights, node_type_array([Cell.from_code(0)]))
            scores = engine.score(self.weights, d, graphs, self.terms, np.zeros(1, dtype=np.int64))
            mu, _ = engine.generator_posterior(self.weights, x, mask, self.sizes.heads)
            ops = engine.generate(self.weights, mu, np.zeros((1, 6), dtype=np.float32))
            if scores.shape != (1,) or ops.shape != (1, 6):
                raise ValueError(f"outputs of shapes {scores.shape} and {ops.shape}")
        except (KeyError, ValueError, IndexError) as err:
            raise UserError(
                f"{path} does not fit the model sizes in config.json ({type(err).__name__}: {err})"
            ) from err

    # -- derived once per weights ------------------------------------------------------------

    def cell_embeddings(self) -> np.ndarray:
        """(15625, latent) predictor embeddings of every cell, indexed by ``Cell.code``."""
        if self._embeddings is None:
            path = cache_dir() / "cell-embeddings" / f"{self.identity[:32]}.npy"
            self._embeddings = _load_array(path, (NUM_CELLS, self.sizes.latent))
            if self._embeddings is None:
                types = node_type_array([Cell.from_code(c) for c in range(NUM_CELLS)])
                self._embeddings = engine.graph_encode(self.weights, types).astype(np.float32)
                _save_array(path, self._embeddings)
        return self._embeddings

    # -- per dataset ---------------------------------------------------------------------------

    def dataset_batch(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-class (n_i, F) arrays -> padded (1, K, M, F) and mask (1, K, M)."""
        if len(features) < 2:
            raise UserError(f"a search needs at least 2 classes, got {len(features)}")
        dim = self.sizes.feature_dim
        m = max(len(f) for f in features)
        x = np.zeros((1, len(features), m, dim), dtype=np.float32)
        mask = np.zeros((1, len(features), m), dtype=bool)
        for i, f in enumerate(features):
            f = np.asarray(f, dtype=np.float32)
            if f.ndim != 2 or f.shape[1] != dim or len(f) == 0:
                raise UserError(f"class {i} features have shape {f.shape}; expected (n>0, {dim})")
            x[0, i, : len(f)] = f
            mask[0, i, : len(f)] = True
        return x, mask

    def predict_all(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Predicted accuracy (percent) of every cell, indexed by ``Cell.code``."""
        d = engine.set_encode(self.weights, "predictor.set_encoder", x, mask, self.sizes.heads)[0]
        scores = engine.score(self.weights, d, self.cell_embeddings(), self.terms, np.arange(NUM_CELLS))
        return scores * self.target["std"] + self.target["mean"]

    def generate(self, x: np.ndarray, mask: np.ndarray, num_candidates: int, rng: np.random.Generator) -> tuple[list[int], int]:
        """Sample cells from p(G|z), z ~ q(z|D), until ``num_candidates`` unique ones or
        ``MAX_SAMPLES`` samples, whichever comes first.

        Returns the unique cell codes in order of first appearance and the number of samples
        drawn. Every sample is a cell: the decoder picks one of the five operations per edge.
        """
        mu, logvar = engine.generator_posterior(self.weights, x, mask, self.sizes.heads)
        std = np.exp(0.5 * logvar)
        seen: dict[int, None] = {}
        drawn = 0
        while len(seen) < num_candidates and drawn < MAX_SAMPLES:
            eps = rng.standard_normal((SAMPLE_BATCH, mu.shape[1])).astype(np.float32)
            z = mu + eps * std
            ops = engine.generate(self.weights, z, rng.random((SAMPLE_BATCH, 6), dtype=np.float32))
            codes = (ops * (5 ** np.arange(5, -1, -1))).sum(1)
            drawn += SAMPLE_BATCH
            for code in codes.tolist():
                seen.setdefault(code)
                if len(seen) == num_candidates:
                    break
        return list(seen), drawn

    def search(
        self,
        features: Sequence[np.ndarray],
        top_k: int = 5,
        num_candidates: int = 500,
        exhaustive: bool = False,
        seed: int = 0,
    ) -> SearchResult:
        check_options(top_k, num_candidates, seed)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        x, mask = self.dataset_batch(features)
        if exhaustive:
            codes, drawn = list(range(NUM_CELLS)), 0
        else:
            rng = np.random.default_rng(seed)
            codes, drawn = self.generate(x, mask, min(num_candidates, NUM_CELLS), rng)
        t1 = time.perf_counter()
        timings["generate"] = t1 - t0
        accuracy = self.predict_all(x, mask)
        chosen = np.asarray(codes)
        # Stable sort on -score keeps generation order among ties: same seed, same ranking.
        order = chosen[np.argsort(-accuracy[chosen], kind="stable")][:top_k]
        num_classes = len(features)
        ranking = []
        for rank, code in enumerate(order.tolist(), start=1):
            cell = Cell.from_code(code)
            cost = cell_cost(cell, num_classes=num_classes)
            ranking.append(RankedCell(rank, str(cell), cell.index, float(accuracy[code]), cost.params, cost.flops))
        timings["rank"] = time.perf_counter() - t1
        return SearchResult(
            ranking=ranking,
            num_classes=num_classes,
            mode="exhaustive" if exhaustive else "generate",
            candidates=len(codes),
            samples_drawn=drawn,
            timings=timings,
        )


def _load_array(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """A cached array, or None when missing or damaged (it is then rebuilt)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.shape != shape or arr.dtype != np.float32 or not np.isfinite(arr).all():
        return None
    return arr


def _save_array(path: Path, arr: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_paths(path) as (tmp,):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            tmp.write_bytes(buf.getvalue())
    except (OSError, UserError):
        pass  # a cache that cannot be written only costs time

