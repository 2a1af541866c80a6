"""How long a database label trains, in a module without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..nb201.cells import Cell
from .policies import DEFAULT_AUGMENT, DEFAULT_LR, LEGACY_AUGMENT

# What a schedule from before a field was recorded trained with.
LEGACY_FIELDS = {"augment": LEGACY_AUGMENT, "lr": DEFAULT_LR}

if TYPE_CHECKING:
    from .trainer import FitSettings


@dataclass(frozen=True)
class LabelSchedule:
    """The part of a fit a label fixes; the rest is ``FitSettings``' defaults."""

    epochs: int = 20
    channels: int = 16
    cells_per_stage: int = 5
    input_size: int = 32
    augment: str = DEFAULT_AUGMENT
    lr: float = DEFAULT_LR

    def validate(self) -> None:
        """A label is a fit, so its schedule must be one `metad2a fit` would run."""
        self.fit_settings(Cell.from_index(0), seed=0).validate()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LabelSchedule:
        return cls(**{**LEGACY_FIELDS, **data})

    def fit_settings(self, cell: Cell, seed: int) -> FitSettings:
        from .trainer import FitSettings

        return FitSettings(
            cell=str(cell), channels=self.channels, cells_per_stage=self.cells_per_stage,
            input_size=self.input_size, epochs=self.epochs, seed=seed, augment=self.augment,
            lr=self.lr,
        )
