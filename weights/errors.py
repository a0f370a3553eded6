"""Typed weight errors. A worker given such weights is broken: serving from bad weights means noise.

Each message names the tensor or file and the format seen, so an operator can tell a corrupt
upload from an unsupported checkpoint without reading a traceback. This package stands below the
worker (`app`): the worker turns these into its own WorkerBroken where it loads.
"""

from __future__ import annotations


class WeightsError(Exception):
    """Base class: the weights cannot be used as they are. `type` is the machine-readable kind."""

    type = "weights_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MissingScale(WeightsError):
    """An FP8 weight has no scale tensor: its raw codes would be used as numbers (noise)."""

    type = "missing_scale"


class BadScale(WeightsError):
    """A scale tensor exists but its shape or values do not fit its weight."""

    type = "bad_scale"


class IntegrityError(WeightsError):
    """A file is missing, truncated or altered with respect to the manifest."""

    type = "integrity_error"


class UnknownFormat(WeightsError):
    """A checkpoint whose format or key names we do not recognise."""

    type = "unknown_format"


class BadValues(WeightsError):
    """A tensor holds values that cannot be weights: NaN or infinite (FP8 NaN/inf codes included)."""

    type = "bad_values"


class OutputExists(WeightsError):
    """`--out` holds something this command did not create: it is never replaced."""

    type = "output_exists"


class UnknownExpert(WeightsError):
    """A file given for a denoiser (an expert key, `high=FILE`) that the family or the model does not have."""

    type = "unknown_expert"
