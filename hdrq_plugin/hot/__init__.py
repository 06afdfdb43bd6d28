"""HOT: Hadamard-transformed, low-bit back-propagation for Conv/Linear layers while adapting θ0
to a target (memory-efficient training). docs/hot_method.md.
"""

from .mode import HOTConfig, hot_mode

__all__ = ["HOTConfig", "hot_mode"]
