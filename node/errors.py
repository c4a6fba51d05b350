"""Exceptions of the node.

Hierarchy::

    NodeError
    ├── SettingsError        bad configuration; start-up stops, the message names the key
    ├── RejectedInput        a received object the node will not analyse (stored, discarded with the reason)
    ├── InferenceError       the networks could not run on an accepted object
    ├── EncodingError        the SEG or SR could not be built (deterministic: not retried)
    └── SendError            a C-STORE of results failed
        ├── TransientSendError   worth retrying (peer down, association rejected, busy)
        └── PermanentSendError   retrying will not help (SOP class refused, invalid object)
"""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class SettingsError(NodeError):
    """The configuration is invalid; the message names the key."""


class RejectedInput(NodeError):
    """A received object is outside what the node analyses, or cannot be read."""


class InferenceError(NodeError):
    """The models could not produce a result."""


class EncodingError(NodeError):
    """The results could not be encoded; the same input would fail the same way again."""


class SendError(NodeError):
    """Sending results to a destination failed."""


class TransientSendError(SendError):
    """A send failure that a later attempt may fix."""


class PermanentSendError(SendError):
    """A send failure that a retry will not fix."""
