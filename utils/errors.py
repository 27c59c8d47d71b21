"""Exceptions shared by every estimator of the workspace."""


class TrainingDiverged(RuntimeError):
    """Training produced a NaN or infinite loss, weight or potential; the run cannot go on."""
