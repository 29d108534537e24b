"""Pretraining objectives over one ViT encoder, by the name `model.objective` gives them.

Each is one class (`base.Objective` says what it owns); the training loop and the pretraining
task hold an instance and never branch on the name.
"""

from mae_scale.objectives.base import Objective
from mae_scale.objectives.beit import BEiT
from mae_scale.objectives.mae import MAE
from mae_scale.objectives.simmim import SimMIM

OBJECTIVES: dict[str, type] = {"mae": MAE, "simmim": SimMIM, "beit": BEiT}

__all__ = ["OBJECTIVES", "Objective", "MAE", "SimMIM", "BEiT"]
