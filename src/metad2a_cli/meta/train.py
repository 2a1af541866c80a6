"""Meta-training: fit the cell generator and the meta-predictor on a database.

Episodes are tasks. Each step takes a few tasks, draws ``num_samples`` features per class
afresh (as MetaD2A does, so the set encoder never sees the same set twice), and
- the predictor regresses every recorded accuracy of those tasks (standardised),
- the generator reconstructs each task's best recorded cell under a VAE objective.
Tasks held out from training (not just records) measure generalisation each epoch; the
best epoch of each network by its validation metric goes into the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..nb201.cells import Cell
from ..nb201.graph import one_hot_graphs
from .db import Database
from .models import CellGenerator, MetaPredictor
from .sizes import ModelSizes

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


@dataclass
class TaskData:
    id: str
    features: list[np.ndarray]  # per class (n, F) float32
    cells: list[Cell]
    accuracy: np.ndarray  # (len(cells),) percent

    @property
    def best(self) -> Cell:
        return self.cells[int(self.accuracy.argmax())]


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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


class MetaTrainer:
    def __init__(self, tasks: list[TaskData], settings: TrainSettings, sizes: ModelSizes):
        self.settings = settings
        self.train_tasks, self.val_tasks = split_tasks(tasks, settings.val_fraction, settings.seed)
        if not self.train_tasks:
            raise UserError("the database has no task with records to train on")
        acc = np.concatenate([t.accuracy for t in self.train_tasks])
        self.target = {"mean": float(acc.mean()), "std": float(acc.std() or 1.0)}
        torch.manual_seed(settings.seed)
        self.generator = CellGenerator(sizes)
        self.predictor = MetaPredictor(sizes)
        self.opt_gen = torch.optim.Adam(self.generator.parameters(), lr=settings.lr)
        self.opt_pred = torch.optim.Adam(self.predictor.parameters(), lr=settings.lr)
        self.rng = np.random.default_rng(settings.seed)
        self.noise = torch.Generator().manual_seed(settings.seed)
        self.epoch = 0
        self.history: list[dict] = []
        self.best = {"predictor": -math.inf, "generator": -math.inf}
        self.best_states: dict[str, dict[str, torch.Tensor]] = {}

    # -- one epoch -------------------------------------------------------------------------

    def train_epoch(self, report: Callable[[int, int, dict], None] | None = None) -> dict:
        s = self.settings
        self.generator.train()
        self.predictor.train()
        order = self.rng.permutation(len(self.train_tasks))
        steps = math.ceil(len(order) / s.tasks_per_step)
        sums = {"pred_loss": 0.0, "recon": 0.0, "kl": 0.0}
        for step in range(steps):
            batch = [self.train_tasks[i] for i in order[step * s.tasks_per_step : (step + 1) * s.tasks_per_step]]
            x, mask = episode_batch(batch, s.num_samples, self.rng)

            # predictor: every record of the batch's tasks
            counts = [len(t.cells) for t in batch]
            graphs = one_hot_graphs([c for t in batch for c in t.cells])
            y = torch.from_numpy(np.concatenate([t.accuracy for t in batch])).float()
            y = (y - self.target["mean"]) / self.target["std"]
            d = self.predictor.set_encoder(x, mask).repeat_interleave(torch.tensor(counts), dim=0)
            pred = self.predictor.score(d, self.predictor.graph_encoder(graphs))
            pred_loss = F.mse_loss(pred, y)
            self.opt_pred.zero_grad(set_to_none=True)
            pred_loss.backward()
            self.opt_pred.step()

            # generator: each task's best cell
            ops = torch.tensor([t.best.ops for t in batch])
            loss, recon, kl = self.generator.loss(x, mask, ops, s.kl_weight, self.noise)
            self.opt_gen.zero_grad(set_to_none=True)
            (loss / len(batch)).backward()
            self.opt_gen.step()

            sums["pred_loss"] += pred_loss.item()
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
        within, pooled_pred, pooled_true = [], [], []
        for i, t in enumerate(tasks):
            d = self.predictor.set_encoder(x[i : i + 1], mask[i : i + 1]).expand(len(t.cells), -1)
            p = self.predictor.score(d, self.predictor.graph_encoder(one_hot_graphs(t.cells))).numpy()
            rho = spearman(p, t.accuracy)
            if not math.isnan(rho):
                within.append(rho)
            pooled_pred.append(p)
            pooled_true.append((t.accuracy - self.target["mean"]) / self.target["std"])
        mu, logvar = self.generator.encode(x, mask)
        ops = torch.tensor([t.best.ops for t in tasks])
        recon = -self.generator.log_likelihood(mu, ops).mean().item()
        g = torch.Generator().manual_seed(0)
        n = self.settings.num_candidates
        hits, unique = 0, []
        for i, t in enumerate(tasks):
            z = mu[i] + torch.randn(n, mu.shape[1], generator=g) * torch.exp(0.5 * logvar[i])
            sampled = self.generator.sample(z, torch.rand(n, 6, generator=g))
            codes = {tuple(r) for r in sampled.tolist()}
            unique.append(len(codes) / n)
            hits += t.best.ops in codes
        p_all, t_all = np.concatenate(pooled_pred), np.concatenate(pooled_true)
        return {
            "spearman_within_task": float(np.mean(within)) if within else float("nan"),
            "spearman_pooled": spearman(p_all, t_all),
            "pred_mse": float(np.mean((p_all - t_all) ** 2)),
            "gen_recon": recon,
            "gen_validity": 1.0,  # types are masked to ops: every decode is a cell
            "gen_uniqueness": float(np.mean(unique)),
            "gen_best_cell_hit_rate": hits / len(tasks),
            "val_tasks": len(tasks),
        }

    def select(self, metrics: dict) -> None:
        """Keep each network's best epoch: predictor by within-task Spearman, generator by
        (best-cell hit rate, then lower reconstruction loss)."""
        p = metrics["spearman_within_task"]
        if not math.isnan(p) and p > self.best["predictor"]:
            self.best["predictor"] = p
            self.best_states["predictor"] = {k: v.clone() for k, v in self.predictor.state_dict().items()}
            metrics["selected_predictor"] = True
        g = metrics["gen_best_cell_hit_rate"] - 1e-3 * metrics["gen_recon"]
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
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
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
        gen, pred = CellGenerator(self.generator.sizes), MetaPredictor(self.predictor.sizes)
        gen.load_state_dict(self.best_states.get("generator", self.generator.state_dict()))
        pred.load_state_dict(self.best_states.get("predictor", self.predictor.state_dict()))
        return gen.eval(), pred.eval()


# -- the command's driver ----------------------------------------------------------------------


def resolve_database(name_or_path: str) -> Path:
    """A database folder, or the name of one shipped in the repository (e.g. ``nb201``)."""
    from ..paths import cache_dir

    path = Path(name_or_path)
    if (path / "manifest.json").is_file():
        return path
    if "/" not in name_or_path:
        # A clone's databases/ (from its root, or beside an editable install), then the cache.
        roots = (Path.cwd() / "databases", Path(__file__).resolve().parents[3] / "databases", cache_dir() / "databases")
        for root in roots:
            if (root / name_or_path / "manifest.json").is_file():
                return root / name_or_path
    raise UserError(f"no database {name_or_path!r}: give a folder made by `metad2a db build` or a known name (nb201)")


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
):
    """Train, checkpoint every epoch into ``out`` and return the final ``Checkpoint``."""
    from .checkpoint import save_models

    db = Database(db_path)
    enc = check_database_encoder(db)
    tasks = load_tasks(db)
    sizes = sizes or ModelSizes(feature_dim=int(enc["feature_dim"]))
    trainer = MetaTrainer(tasks, settings, sizes)
    state_dir = out / ".train"
    if resume:
        if not (state_dir / STATE_JSON).is_file():
            raise UserError(f"nothing to resume in {out}")
        trainer.load_state(state_dir)
    elif (state_dir / STATE_JSON).is_file():
        raise UserError(f"{out} holds a training run; pass --resume to continue it or choose another --out")
    info = db.info()
    database = {"path": str(db.path), "name": db.path.name, "tasks": info["tasks_with_records"],
                "records": info["records"], "schedule": info["schedule"]}
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


def _best_metrics(history: list[dict]) -> dict:
    pred = [h for h in history if h.get("selected_predictor")]
    gen = [h for h in history if h.get("selected_generator")]
    out = {}
    if pred:
        h = pred[-1]
        out |= {"predictor_epoch": h["epoch"], "spearman_within_task": h["spearman_within_task"],
                "spearman_pooled": h["spearman_pooled"]}
    if gen:
        h = gen[-1]
        out |= {"generator_epoch": h["epoch"], "gen_recon": h["gen_recon"], "gen_validity": h["gen_validity"],
                "gen_uniqueness": h["gen_uniqueness"], "gen_best_cell_hit_rate": h["gen_best_cell_hit_rate"]}
    return out
