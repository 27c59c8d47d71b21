"""Exceptions shared by every estimator of the workspace."""


class TrainingDiverged(RuntimeError):
    """Training produced a NaN or infinite loss, weight or potential; the run cannot go on."""


class InsufficientMemory(MemoryError):
    """A run would not fit in the memory available; raised before training starts, with the estimate, the memory
    available and the largest size that fits."""
