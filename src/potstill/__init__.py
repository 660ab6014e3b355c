"""potstill: knowledge distillation for PyTorch and Hugging Face models, with the evidence."""

from ._version import __version__ as __version__
from .api import DistillResult, distill
from .cache import CachedTeacher, Encoding, build_logit_cache, write_cache
from .config import OptimizerConfig, ScheduleConfig, TrainConfig
from .distiller import Distiller, FitResult
from .losses import divergence, kd_loss
from .losses.objective import Objective, Term
from .losses.terms import ce_term, divergence_term, kd_term
from .signal import Signal, StudentView
from .teachers import LiveTeacher

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
