"""The pipeline's errors: one tree, and one question the loops ask of it, ``retriable``.

A stream loop (`streaming.processor.StreamCore`) turns whatever a batch raised into
one of these (`streaming.faults.classify`) and then only reads the flag: retriable
errors pause the loop with backoff while ``/healthz`` reports the cause and since
when; the others stop the process with exit status 1, so that the orchestrator
restarts it and alerts. Bad input is neither: it is a value (a dead letter).

Errors::

    StreamError                         retriable: the loop's only question
     ├── TransientError                 retriable = True: back off, retry the batch
     │    ├── ServiceUnavailableError   Kafka or Redis unreachable, failing over,
     │    │                             resharding (a slot with no owner), out of memory
     │    └── StateConflictError        the compare-and-set kept conflicting
     └── FatalError                     retriable = False: log, exit 1
          ├── MissingTopicError         a topic the process needs does not exist
          ├── ServiceRefusedError       Kafka or Redis refuses what waiting will not change
          │                             (not authorized, a key of the wrong type)
          └── streaming.security.ConnectionSecurityError
                                        a wrong password, an untrusted certificate
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "FatalError",
    "MissingTopicError",
    "ServiceRefusedError",
    "ServiceUnavailableError",
    "StateConflictError",
    "StreamError",
    "TransientError",
]


class StreamError(RuntimeError):
    """Base of the pipeline's errors.

    Attributes:
        service: what failed: "kafka", "redis", "conflict", or "" when unknown.
    """

    retriable: bool = False

    def __init__(self, message: str, *, service: str = "") -> None:
        super().__init__(message)
        self.service = service


class TransientError(StreamError):
    """Waiting fixes it: the loop backs off and retries the batch."""

    retriable = True


class ServiceUnavailableError(TransientError):
    """Kafka or Redis cannot serve the batch now (down, failing over, resharding, full)."""


class StateConflictError(TransientError):
    """Conversations whose compare-and-set kept conflicting within one attempt.

    Attributes:
        conversation_ids: the conversations still conflicting.
    """

    def __init__(self, conversation_ids: Iterable[str]) -> None:
        self.conversation_ids = sorted(conversation_ids)
        super().__init__(
            f"conversations {self.conversation_ids} kept conflicting", service="conflict"
        )


class FatalError(StreamError):
    """Waiting does not fix it: the process stops with exit status 1."""

    retriable = False


class MissingTopicError(FatalError):
    """Topics the process reads or writes do not exist (and nothing creates them).

    Attributes:
        topics: the missing topics.
    """

    def __init__(self, topics: Iterable[str], *, address: str = "") -> None:
        self.topics = sorted(topics)
        where = f" at {address}" if address else ""
        super().__init__(
            f"kafka{where}: topic(s) {', '.join(self.topics)} do not exist; create them "
            "(deploy/ creates the pipeline's topics) or fix the topic settings",
            service="kafka",
        )


class ServiceRefusedError(FatalError):
    """Kafka or Redis refused a request for a reason that waiting does not change."""
