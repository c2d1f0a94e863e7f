"""Errors raised by the model package.

The tree::

    CFNESAError
     ├── ConfigError (ValueError)        an invalid ModelConfig or setting
     ├── InputError (ValueError)         bad input to the model API
     │    ├── DimensionError             a feature vector of the wrong size
     │    ├── NonFiniteError             NaN or Inf in a feature vector
     │    ├── MissingModalityError       an utterance with no modality present
     │    └── DataError                  a transcript or feature file that cannot be read
     ├── StateError (ValueError)         a conversation state that must not be used
     │    ├── StateFormatError           unknown format version or corrupt bytes
     │    └── FingerprintMismatchError   a state written by another model
     └── CheckpointError                 a checkpoint that cannot be loaded

Nothing is reshaped or guessed: every bad input is one of these, with the
conversation id where there is one.
"""

from __future__ import annotations


class CFNESAError(Exception):
    """Root of every error this package raises."""


class ConfigError(CFNESAError, ValueError):
    """An invalid model configuration or setting."""


class InputError(CFNESAError, ValueError):
    """Bad input: wrong dimension, non-finite values, a malformed file."""

    def __init__(self, message: str, *, conversation_id: str | None = None) -> None:
        if conversation_id is not None:
            message = f"{message} (conversation {conversation_id!r})"
        super().__init__(message)
        self.conversation_id = conversation_id


class DimensionError(InputError):
    """A feature vector whose size is not the one the model was built for."""


class NonFiniteError(InputError):
    """A feature vector holding NaN or Inf."""


class MissingModalityError(InputError):
    """An utterance with no modality present at all."""


class DataError(InputError):
    """A transcript or feature file that cannot be read as documented."""


class StateError(CFNESAError, ValueError):
    """A conversation state that must not be fed to the model."""

    def __init__(self, message: str, *, conversation_id: str | None = None) -> None:
        if conversation_id is not None:
            message = f"{message} (conversation {conversation_id!r})"
        super().__init__(message)
        self.conversation_id = conversation_id


class StateFormatError(StateError):
    """State bytes of an unknown format version, or corrupt."""


class FingerprintMismatchError(StateError):
    """State written by a model with another fingerprint (other weights or config)."""


class CheckpointError(CFNESAError):
    """A checkpoint directory that cannot be loaded."""
