"""Meta-training: fit the cell generator and the meta-predictor.

The predictor's score is a sum of terms (models/predictor.py): a dataset-independent
``table`` term regressed on published full-training accuracies of cells (standardised
over the table), and a ``dataset`` term regressed on the database's records (standardised
within each task, since only the ranking within a dataset matters), which learns how a
dataset moves cells away from the table's order. ``TrainSettings.predictor`` picks
"table", "database" or "both".

Episodes are tasks. Each step takes a few tasks and draws ``num_samples`` features per
class afresh (as MetaD2A does, so the set encoder never sees the same set twice). The
generator learns, under MetaD2A's VAE objective, to propose the cells the predictor
ranks highest for each task (one of its current top ``generator_top``), so a search's
candidates are the cells its ranking favours. Tasks and table cells held out from
training measure generalisation each epoch; each network's best epoch is kept.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import check_output_folder
from ..errors import UserError
from ..nb201.cells import NUM_CELLS, Cell
from ..nb201.graph import one_hot_graphs
from .db import Database
from .models import CellGenerator, MetaPredictor
from .sizes import ModelSizes
from .table import TABLE_FILE, PublishedTable, load_table

# TrainSettings.predictor -> the predictor's terms
TERMS = {"table": ("table",), "database": ("dataset",), "both": ("table", "dataset")}
# Ridge penalty of the dataset term's edge weights, in records: chosen by leaving each task of
# databases/nb201 out in turn (benchmarks/edge_term_loto.py, docs/edge_term_loto.json).
EDGE_RIDGE = 10.0

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 60
    tasks_per_step: int = 8
    num_samples: int = 20  # images per class in an episode, as in a search
    lr: float = 1e-3
    kl_weight: float = 0.005  # MetaD2A's beta
    val_fraction: float = 0.1
    seed: int = 0
    num_candidates: int = 500  # generator validation: samples per task
    # Which terms the predictor learns: "table", "database" or "both". "table" by default until
    # held-out fits favour "both": with 26 tasks the dataset term ranks database tasks better
    # than the table, but its first pick fitted worse on gtsrb (docs/generalization.md).
    predictor: str = "table"
    table_batch: int = 256  # table cells per step
    table_val_fraction: float = 0.1
    generator_top: int = 20  # the generator imitates one of the predictor's top cells of a task

    def validate(self) -> None:
        if self.predictor not in TERMS:
            raise UserError(f"--predictor must be one of {', '.join(TERMS)}, got {self.predictor!r}")
        least = (("--epochs", self.epochs, 1), ("--tasks-per-step", self.tasks_per_step, 1),
                 ("num_samples", self.num_samples, 1), ("num_candidates", self.num_candidates, 1),
                 ("table_batch", self.table_batch, 1), ("generator_top", self.generator_top, 1),
                 ("--seed", self.seed, 0))
        for flag, value, lowest in least:
            if value < lowest:
                raise UserError(f"{flag} must be at least {lowest}, got {value}")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.kl_weight < math.inf:
            raise UserError(f"kl_weight must be a finite number, at least 0, got {self.kl_weight}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.table_val_fraction < 1:
            raise UserError("validation fractions must be in [0, 1)")

    @property
    def terms(self) -> tuple[str, ...]:
        return TERMS[self.predictor]


@dataclass
class TaskData:
    id: str
    features: list[np.ndarray]  # per class (n, F) float32
    cells: list[Cell]
    accuracy: np.ndarray  # (len(cells),) percent

    @property
    def standardised(self) -> np.ndarray | None:
        """Accuracies as z-scores within the task; None when they do not vary."""
        std = self.accuracy.std() if len(self.accuracy) > 1 else 0.0  # a task without records is not a warning
        return None if std == 0 else (self.accuracy - self.accuracy.mean()) / std


def load_tasks(db: Database, min_records: int = 2) -> list[TaskData]:
    """Tasks with at least ``min_records`` records, features resolved per class."""
    by_task: dict[str, list] = {}
    for r in db.records():
        by_task.setdefault(r.task, []).append(r)
    cache: dict[str, dict[str, np.ndarray]] = {}
    tasks = []
    for t in db.tasks():
        recs = sorted(by_task.get(t.id, []), key=lambda r: r.cell)
        if len(recs) < min_records:
            continue
        if t.source not in cache:
            cache[t.source] = db.features(t.source)
        feats = [cache[t.source][c] for c in t.classes]
        tasks.append(TaskData(t.id, feats, [Cell.parse(r.cell) for r in recs], np.array([r.accuracy for r in recs])))
    return tasks


def split_tasks(tasks: list[TaskData], val_fraction: float, seed: int) -> tuple[list[TaskData], list[TaskData]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tasks))
    n_val = max(1, round(len(tasks) * val_fraction)) if len(tasks) > 1 else 0
    val = sorted(order[:n_val].tolist())
    return [tasks[i] for i in sorted(order[n_val:].tolist())], [tasks[i] for i in val]


def episode_batch(tasks: list[TaskData], num_samples: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded features (T, K, M, F) and mask; ``rng`` None takes the first samples (validation)."""
    k = max(len(t.features) for t in tasks)
    dim = tasks[0].features[0].shape[1]
    x = torch.zeros(len(tasks), k, num_samples, dim)
    mask = torch.zeros(len(tasks), k, num_samples, dtype=torch.bool)
    for i, t in enumerate(tasks):
        for j, f in enumerate(t.features):
            n = min(num_samples, len(f))
            idx = rng.choice(len(f), n, replace=False) if rng is not None else np.arange(n)
            x[i, j, :n] = torch.from_numpy(f[idx])
            mask[i, j, :n] = True
    return x, mask


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


class MetaTrainer:
    def __init__(self, tasks: list[TaskData], settings: TrainSettings, sizes: ModelSizes, table: PublishedTable | None = None):
        settings.validate()
        self.settings = settings
        self.train_tasks, self.val_tasks = split_tasks(tasks, settings.val_fraction, settings.seed)
        if not self.train_tasks:
            raise UserError("the database has no task with records to train on")
        if "table" in settings.terms and table is None:
            raise UserError(f"--predictor {settings.predictor} needs a table of published accuracies (--table)")
        self.rng = np.random.default_rng(settings.seed)
        self.train_records = sum(len(t.cells) for t in self.train_tasks if t.standardised is not None)
        self.table = None
        if "table" in settings.terms:
            order = np.random.default_rng([settings.seed, 1]).permutation(len(table))
            n_val = round(len(table) * settings.table_val_fraction)
            train_rows, val_rows = order[n_val:], order[:n_val]
            acc = table.accuracy[train_rows]
            self.target = {"mean": float(acc.mean()), "std": float(acc.std() or 1.0), "source": table.source}
            z = (table.accuracy - self.target["mean"]) / self.target["std"]
            self.table = {"train": (table.codes[train_rows], z[train_rows]), "val": (table.codes[val_rows], z[val_rows])}
        else:
            acc = np.concatenate([t.accuracy for t in self.train_tasks])
            self.target = {"mean": float(acc.mean()), "std": float(acc.std() or 1.0), "source": "database"}
        # Every cell's graph, indexed by Cell.code: table batches and the generator's targets.
        self.all_graphs = one_hot_graphs([Cell.from_code(c) for c in range(NUM_CELLS)])
        torch.manual_seed(settings.seed)
        self.generator = CellGenerator(sizes)
        self.predictor = MetaPredictor(sizes, settings.terms)
        if self.table is not None:  # every listed cell, validation rows too: they are known
            self.predictor.set_table(torch.from_numpy(table.codes), torch.from_numpy(z))
        self.opt_gen = torch.optim.Adam(self.generator.parameters(), lr=settings.lr)
        self.opt_pred = torch.optim.Adam(self.predictor.parameters(), lr=settings.lr)
        self.noise = torch.Generator().manual_seed(settings.seed)
        self.epoch = 0
        self.history: list[dict] = []
        self.best = {"predictor": -math.inf, "generator": -math.inf}
        self.best_states: dict[str, dict[str, torch.Tensor]] = {}
        self._pred_steps = 0
        self._embeddings: tuple[int, torch.Tensor] | None = None

    # -- the predictor over every cell --------------------------------------------------------

    @torch.no_grad()
    def cell_embeddings(self) -> torch.Tensor:
        """(15625, latent) graph embeddings of every cell by the current predictor (kept
        until the predictor's next step: validation and the next epoch share them)."""
        if self._embeddings is None or self._embeddings[0] != self._pred_steps:
            was = self.predictor.training
            self.predictor.eval()
            self._embeddings = (self._pred_steps, self.predictor.graph_encoder(self.all_graphs))
            self.predictor.train(was)
        return self._embeddings[1]

    @torch.no_grad()
    def all_cell_scores(self, datasets: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Scores of every cell (embeddings ``emb``) for each dataset: (T, latent) -> (T, 15625)."""
        t = datasets.shape[0]
        rows = datasets[:, None].expand(-1, NUM_CELLS, -1).reshape(-1, datasets.shape[-1])
        codes = torch.arange(NUM_CELLS).repeat(t)
        return self.predictor.score(rows, emb.repeat(t, 1), codes).view(t, NUM_CELLS)

    def generator_targets(self, scores: torch.Tensor) -> torch.Tensor:
        """For each task, one of its ``generator_top`` best-scored cells: (T, 15625) -> (T, 6) ops."""
        top = scores.topk(self.settings.generator_top, dim=1).indices  # (T, top)
        pick = top[torch.arange(len(top)), torch.from_numpy(self.rng.integers(0, top.shape[1], len(top)))]
        return torch.tensor([Cell.from_code(int(c)).ops for c in pick])

    # -- one epoch -------------------------------------------------------------------------

    def train_epoch(self, report: Callable[[int, int, dict], None] | None = None) -> dict:
        s = self.settings
        self.generator.train()
        self.predictor.train()
        order = self.rng.permutation(len(self.train_tasks))
        steps = math.ceil(len(order) / s.tasks_per_step)
        sums = {"pred_loss": 0.0, "table_loss": 0.0, "recon": 0.0, "kl": 0.0}
        # Embedding all cells costs a dozen steps: the generator's targets use the epoch's.
        emb = self.cell_embeddings()
        for step in range(steps):
            batch = [self.train_tasks[i] for i in order[step * s.tasks_per_step : (step + 1) * s.tasks_per_step]]
            x, mask = episode_batch(batch, s.num_samples, self.rng)

            d = self.predictor.set_encoder(x, mask)  # (T, latent)
            loss = torch.zeros(())
            if self.table is not None:
                codes, z = self.table["train"]
                rows = self.rng.choice(len(codes), min(s.table_batch, len(codes)), replace=False)
                pred = self.predictor.prior_score(self.predictor.graph_encoder(self.all_graphs[codes[rows]]))
                table_loss = F.mse_loss(pred, torch.from_numpy(z[rows]).float())
                loss = loss + table_loss
                sums["table_loss"] += table_loss.item()
            if "dataset" in s.terms:
                use = [(i, t) for i, t in enumerate(batch) if t.standardised is not None]
                if use:
                    cells = [c for _, t in use for c in t.cells]
                    codes = torch.tensor([c.code for c in cells])
                    counts = torch.tensor([len(t.cells) for _, t in use])
                    dd = d[[i for i, _ in use]].repeat_interleave(counts, dim=0)
                    pred = self.predictor.dataset_score(dd, codes)
                    if self.table is not None:  # the dataset term learns what the table (held fixed) misses
                        with torch.no_grad():
                            base = self.predictor.table_score(self.predictor.graph_encoder(one_hot_graphs(cells)), codes)
                        pred = pred + base
                    # Labels are z-scores within a task: only the order inside a task is compared.
                    task = torch.repeat_interleave(torch.arange(len(use)), counts)
                    pred = pred - (torch.zeros(len(use)).index_add(0, task, pred) / counts)[task]
                    y = torch.from_numpy(np.concatenate([t.standardised for _, t in use])).float()
                    ridge = EDGE_RIDGE / self.train_records * self.predictor.dataset_term.penalty()
                    pred_loss = F.mse_loss(pred, y)
                    loss = loss + pred_loss + ridge
                    sums["pred_loss"] += pred_loss.item()
            self.opt_pred.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_pred.step()
            self._pred_steps += 1

            # generator: a cell among each task's current best-scored
            ops = self.generator_targets(self.all_cell_scores(d.detach(), emb))
            gen_loss, recon, kl = self.generator.loss(x, mask, ops, s.kl_weight, self.noise)
            self.opt_gen.zero_grad(set_to_none=True)
            (gen_loss / len(batch)).backward()
            self.opt_gen.step()

            sums["recon"] += recon.item() / len(batch)
            sums["kl"] += kl.item() / len(batch)
            if report:
                report(step + 1, steps, {k: v / (step + 1) for k, v in sums.items()})
        self.epoch += 1
        return {k: v / steps for k, v in sums.items()}

    # -- validation --------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        tasks = self.val_tasks or self.train_tasks
        self.generator.eval()
        self.predictor.eval()
        x, mask = episode_batch(tasks, self.settings.num_samples, None)
        d = self.predictor.set_encoder(x, mask)
        scores = self.all_cell_scores(d, self.cell_embeddings())  # (T, 15625)
        within, pooled_pred, pooled_true = [], [], []
        for i, t in enumerate(tasks):
            p = scores[i, [c.code for c in t.cells]].numpy()
            rho = spearman(p, t.accuracy)
            if not math.isnan(rho):
                within.append(rho)
            pooled_pred.append(p)
            pooled_true.append(t.accuracy)
        table_rho = float("nan")
        if self.table is not None:
            codes, z = self.table["val"]
            # The prior alone on table cells it never trained on: how it does on unlisted cells
            table_rho = spearman(self.predictor.prior_score(self.predictor.graph_encoder(self.all_graphs[codes])).numpy(), z)
        best = scores.argmax(1)  # the predictor's first pick for each task
        ops = torch.tensor([Cell.from_code(int(c)).ops for c in best])
        mu, logvar = self.generator.encode(x, mask)
        recon = -self.generator.log_likelihood(mu, ops).mean().item()
        g = torch.Generator().manual_seed(0)
        n = self.settings.num_candidates
        hits, unique, coverage = 0, [], []
        top5 = scores.topk(5, dim=1).indices  # what a search's table would show
        for i in range(len(tasks)):
            z = mu[i] + torch.randn(n, mu.shape[1], generator=g) * torch.exp(0.5 * logvar[i])
            sampled = self.generator.sample(z, torch.rand(n, 6, generator=g))
            codes = {tuple(r) for r in sampled.tolist()}
            unique.append(len(codes) / n)
            hits += tuple(ops[i].tolist()) in codes
            coverage.append(np.mean([Cell.from_code(int(c)).ops in codes for c in top5[i]]))
        return {
            "spearman_within_task": float(np.mean(within)) if within else float("nan"),
            "spearman_pooled": spearman(np.concatenate(pooled_pred), np.concatenate(pooled_true)),
            "spearman_table": table_rho,
            "gen_recon": recon,
            "gen_uniqueness": float(np.mean(unique)),
            "gen_best_cell_hit_rate": hits / len(tasks),
            "gen_top5_coverage": float(np.mean(coverage)),
            "val_tasks": len(tasks),
        }

    def select(self, metrics: dict) -> None:
        """Keep each network's best epoch: the predictor by the Spearman of what it was
        trained on (held-out table cells, held-out tasks' records, or their sum), the
        generator by (share of the predictor's top 5 among its samples, then lower
        reconstruction loss)."""
        terms = self.settings.terms
        p = (metrics["spearman_table"] if "table" in terms else 0.0) + (
            metrics["spearman_within_task"] if "dataset" in terms else 0.0)
        if not math.isnan(p) and p > self.best["predictor"]:
            self.best["predictor"] = p
            self.best_states["predictor"] = {k: v.clone() for k, v in self.predictor.state_dict().items()}
            metrics["selected_predictor"] = True
        # A search shows the top 5 of the generator's candidates: the generator is as good as
        # the share of the predictor's own top 5 it proposes.
        g = metrics["gen_top5_coverage"] - 1e-3 * metrics["gen_recon"]
        if g > self.best["generator"]:
            self.best["generator"] = g
            self.best_states["generator"] = {k: v.clone() for k, v in self.generator.state_dict().items()}
            metrics["selected_generator"] = True

    # -- resumable state -----------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        """Everything to continue exactly: weights, optimiser moments, RNG states, history."""
        from safetensors.torch import save_file

        from ..atomic import atomic_paths

        tensors: dict[str, torch.Tensor] = {}
        for name, module in (("generator", self.generator), ("predictor", self.predictor)):
            for k, v in module.state_dict().items():
                tensors[f"{name}.{k}"] = v
        for name, opt in (("opt_gen", self.opt_gen), ("opt_pred", self.opt_pred)):
            for pid, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    tensors[f"{name}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        for name, states in self.best_states.items():
            for k, v in states.items():
                tensors[f"best_{name}.{k}"] = v
        tensors["rng.noise"] = self.noise.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "numpy_rng": self.rng.bit_generator.state,
            "settings": asdict(self.settings),
        }
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_paths(folder / STATE_FILE, folder / STATE_JSON) as (t1, t2):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(t1))
            t2.write_text(json.dumps(meta, indent=1))

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((folder / STATE_JSON).read_text())
        if meta["settings"] != asdict(self.settings):
            raise UserError(f"{folder} holds a run with other settings; resume with the same options")
        tensors = load_file(str(folder / STATE_FILE))
        for name, module in (("generator", self.generator), ("predictor", self.predictor)):
            state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            module.load_state_dict(state)
        for name, opt in (("opt_gen", self.opt_gen), ("opt_pred", self.opt_pred)):
            sd = opt.state_dict()
            state: dict[int, dict] = {}
            for key, v in tensors.items():
                if key.startswith(name + "."):
                    _, pid, k = key.split(".", 2)
                    state.setdefault(int(pid), {})[k] = v
            sd["state"] = state
            opt.load_state_dict(sd)
        for name in ("generator", "predictor"):
            prefix = f"best_{name}."
            st = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                self.best_states[name] = st
        self.noise.set_state(tensors["rng.noise"])
        torch.set_rng_state(tensors["rng.torch"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        self.epoch = meta["epoch"]
        self.history = meta["history"]
        self.best = meta["best"]

    def best_models(self) -> tuple[CellGenerator, MetaPredictor]:
        # Copies, so that a best state saved before table_z existed keeps the table set now.
        gen, pred = copy.deepcopy(self.generator), copy.deepcopy(self.predictor)
        for name, module in (("generator", gen), ("predictor", pred)):
            if name in self.best_states:
                module.load_state_dict(self.best_states[name])
        return gen.eval(), pred.eval()


# -- the command's driver ----------------------------------------------------------------------


def saved_epoch(out: Path) -> int | None:
    """The last epoch a run in ``out`` saved (what ``--resume`` goes on from), or None."""
    try:
        return int(json.loads((out / ".train" / STATE_JSON).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_database(name_or_path: str) -> Path:
    """A database folder, or the name of one shipped in the repository (e.g. ``nb201``)."""
    from ..paths import cache_dir

    path = Path(name_or_path)
    if path.exists():
        return path  # Database() says what is wrong with it, if anything
    if "/" not in name_or_path:
        # A clone's databases/ (from its root, or beside an editable install), then the cache.
        roots = (Path.cwd() / "databases", Path(__file__).resolve().parents[3] / "databases", cache_dir() / "databases")
        for root in roots:
            if (root / name_or_path / "manifest.json").is_file():
                return root / name_or_path
        raise UserError(f"no database {name_or_path!r} in ./databases or {cache_dir() / 'databases'}: give a folder "
                        "made by `metad2a db build`, or run from a clone of metad2a (its databases/ holds nb201 and nb201_30ep; an "
                        "installed package does not)")
    raise UserError(f"no database at {name_or_path}: give a folder made by `metad2a db build`")


def check_database_encoder(db: Database) -> dict:
    from ..data import encoder

    enc = db.manifest["encoder"]
    ours = encoder.identity(int(enc["resolution"]))
    if enc["identity"] != ours:
        raise UserError(
            f"{db.path} was built with encoder {enc['identity']}; this metad2a encodes with {ours}. "
            "Rebuild the database with this version"
        )
    return enc


def meta_train(
    db_path: Path,
    out: Path,
    settings: TrainSettings,
    sizes: ModelSizes | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, dict], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    table_path: Path | None = None,
):
    """Train, checkpoint every epoch into ``out`` and return the final ``Checkpoint``.

    ``table_path`` defaults to the database folder's ``imagenet16_120.csv``; it is read
    only when the predictor has a table term."""
    from .checkpoint import save_models

    settings.validate()
    state_dir = out / ".train"
    # The output folder is checked before the database loads: a mistake there costs no wait.
    if resume:
        if not (state_dir / STATE_JSON).is_file():
            raise UserError(f"nothing to resume in {out}")
    elif (state_dir / STATE_JSON).is_file():
        raise UserError(f"{out} holds a training run; pass --resume to continue it or choose another --out")
    else:
        check_output_folder(out)
    db = Database(db_path)
    enc = check_database_encoder(db)
    # Without a dataset term records are not needed: every task's features train the generator.
    tasks = load_tasks(db, min_records=2 if "dataset" in settings.terms else 0)
    table = None
    if "table" in settings.terms:
        table_path = Path(table_path) if table_path is not None else db.path / TABLE_FILE
        if not table_path.is_file():
            raise UserError(f"no table of published accuracies at {table_path}; pass --table or --predictor database")
        table = load_table(table_path)
    sizes = sizes or ModelSizes(feature_dim=int(enc["feature_dim"]))
    trainer = MetaTrainer(tasks, settings, sizes, table)
    if resume:
        _check_same_database(out, db)
        trainer.load_state(state_dir)
    info = db.info()
    # The path is relative to the weights, which travel (a clone's weights/ and databases/ stay together).
    database = {"path": os.path.relpath(db.path.resolve(), out.resolve()), "name": db.path.name, "id": db.identity(),
                "tasks": info["tasks_with_records"], "records": info["records"], "schedule": info["schedule"],
                "table": table.source if table is not None else None, "predictor": settings.predictor}
    ckpt = None
    while trainer.epoch < settings.epochs:
        t0 = time.perf_counter()
        losses = trainer.train_epoch(on_step)
        metrics = {"epoch": trainer.epoch, **losses, **trainer.validate(), "seconds": time.perf_counter() - t0}
        trainer.select(metrics)
        trainer.history.append(metrics)
        gen, pred = trainer.best_models()
        summary = {
            "epochs": trainer.epoch,
            "train_tasks": len(trainer.train_tasks),
            "val_tasks": len(trainer.val_tasks),
            "best_val": _best_metrics(trainer.history),
            "train_seconds": sum(h["seconds"] for h in trainer.history),
        }
        ckpt = save_models(out, gen, pred, encoder=enc, name=f"metad2a-{db.path.name}",
                           database=database, metrics=summary, target=trainer.target)
        trainer.save_state(state_dir)  # after the checkpoint: a resumed run never lacks it
        if on_epoch:
            on_epoch(trainer.epoch, metrics)
    if ckpt is None:  # resumed a finished run
        from .weights import Checkpoint, load_checkpoint_config

        ckpt = Checkpoint(out, load_checkpoint_config(out), "local")
    from . import modelcard

    modelcard.write(out, ckpt.config)
    return ckpt, trainer


def _check_same_database(out: Path, db: Database) -> None:
    """A resumed run goes on with the database it started on, or its metrics mix two."""
    from .weights import load_checkpoint_config

    started = load_checkpoint_config(out).get("database", {})
    if started.get("id", db.identity()) != db.identity():
        path = os.path.normpath(out / started["path"])
        raise UserError(f"{out} was trained on {path}, not {db.path}; resume with --db {path}")


def _best_metrics(history: list[dict]) -> dict:
    pred = [h for h in history if h.get("selected_predictor")]
    gen = [h for h in history if h.get("selected_generator")]
    out = {}
    if pred:
        h = pred[-1]
        out |= {"predictor_epoch": h["epoch"], "spearman_within_task": h["spearman_within_task"],
                "spearman_pooled": h["spearman_pooled"], "spearman_table": h["spearman_table"]}
    if gen:
        h = gen[-1]
        out |= {"generator_epoch": h["epoch"], "gen_recon": h["gen_recon"], "gen_top5_coverage": h["gen_top5_coverage"],
                "gen_uniqueness": h["gen_uniqueness"], "gen_best_cell_hit_rate": h["gen_best_cell_hit_rate"]}
    return out
