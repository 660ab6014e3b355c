from .divergences import DIVERGENCES, divergence, kd_loss, soft_target_loss

__all__ = ["DIVERGENCES", "divergence", "kd_loss", "soft_target_loss"]
