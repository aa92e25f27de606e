"""StageOptions: which attention this torchtitan run trains with, and how CP exchanges it."""

from __future__ import annotations

from dataclasses import dataclass

from lh_cp.torchtitan.inner_attention import EXCHANGES, MODES


@dataclass
class StageOptions:
    """The training stage (trainer config section `stage`, CLI `--stage.*`).

    attention: 'lighthouse' (Lighthouse in every layer but lighthouse.dense_layers) or
        'dense' (every layer dense: the recovery stage). Switching changes no weight.
    exchange: context-parallel exchange of Lighthouse layers' compressed K/V: 'allgather' or 'ring'.
    dense_exchange: context-parallel exchange of dense layers' K/V: 'ring' or 'allgather'.
    resume_step: 0 for a stage that starts from scratch. The recovery stage sets it to the
        Lighthouse stage's last step: the run must find that stage's checkpoint (same
        dump_folder and checkpoint.folder) and fails, naming the step, when it starts earlier.
    """

    attention: str = "lighthouse"
    exchange: str = "allgather"
    dense_exchange: str = "ring"
    resume_step: int = 0

    def __post_init__(self) -> None:
        if self.attention not in MODES:
            raise ValueError(f"stage.attention must be one of {MODES}, got {self.attention!r}")
        for name in ("exchange", "dense_exchange"):
            if getattr(self, name) not in EXCHANGES:
                raise ValueError(
                    f"stage.{name} must be one of {EXCHANGES}, got {getattr(self, name)!r}"
                )
        if (
            isinstance(self.resume_step, bool)
            or not isinstance(self.resume_step, int)
            or self.resume_step < 0
        ):
            raise ValueError(f"stage.resume_step must be an int >= 0, got {self.resume_step!r}")
