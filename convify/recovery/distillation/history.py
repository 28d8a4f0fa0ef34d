"""The per-epoch record of a :func:`~convify.distill` run, as it returns it and checkpoints save it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class History:
    """Per-epoch metrics of a :func:`distill` run (one entry per epoch, oldest first).

    ``loss`` is the mean training loss; ``agreement`` the fraction of training
    inputs on which the student's top-1 class equals the teacher's;
    ``val_agreement`` / ``val_accuracy`` the same on ``val_data`` (accuracy only
    when it has labels, else None); ``seconds`` the wall time of each epoch;
    ``precision`` the ``precision=`` each epoch ran in (a resumed run may change it).
    """

    loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    val_agreement: list[float | None] = field(default_factory=list)
    val_accuracy: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    precision: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.loss)

    def to_dict(self) -> dict[str, list]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> "History":
        history = cls(**{f.name: list(data.get(f.name, [])) for f in dataclasses.fields(cls)})
        if "precision" not in data:  # saved before precision= existed, when every epoch ran in float32
            history.precision = ["fp32"] * history.epochs
        return history

    def __str__(self) -> str:
        lines = ["epoch  loss      agreement  val_agreement  val_accuracy  seconds"]
        for i in range(self.epochs):
            va, acc = self.val_agreement[i], self.val_accuracy[i]
            lines.append(f"{i + 1:<5}  {self.loss[i]:<8.4f}  {self.agreement[i]:<9.4f}  "
                         f"{'-' if va is None else f'{va:.4f}':<13}  {'-' if acc is None else f'{acc:.4f}':<12}  "
                         f"{self.seconds[i]:.1f}")
        return "\n".join(lines)
