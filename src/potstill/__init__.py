"""potstill: knowledge distillation for PyTorch and Hugging Face models, with the evidence."""

__version__ = "0.1.0"

from .api import DistillResult, distill  # noqa: E402
from .cache import CachedTeacher, Encoding, build_logit_cache, write_cache  # noqa: E402
from .config import OptimizerConfig, ScheduleConfig, TrainConfig  # noqa: E402
from .distiller import Distiller, FitResult  # noqa: E402
from .losses import divergence, kd_loss  # noqa: E402
from .losses.objective import Objective, Term, ce_term, divergence_term, kd_term  # noqa: E402
from .signal import Signal, StudentView  # noqa: E402
from .teachers import LiveTeacher  # noqa: E402

__all__ = [
    "CachedTeacher",
    "DistillResult",
    "Encoding",
    "Distiller",
    "FitResult",
    "LiveTeacher",
    "Objective",
    "OptimizerConfig",
    "ScheduleConfig",
    "Signal",
    "StudentView",
    "Term",
    "TrainConfig",
    "build_logit_cache",
    "ce_term",
    "distill",
    "divergence",
    "divergence_term",
    "kd_loss",
    "kd_term",
    "write_cache",
]
