"""Identity of a shipped model: what every SEG and SR names as its algorithm."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """Name, version and weight checksum of one trained network.

    ``name`` and ``version`` go into the Algorithm Identification of the SEG and
    the SR; ``sha256`` ties a result to the exact weights that produced it.
    """

    name: str
    version: str
    sha256: str

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("a model identity needs a name and a version")
        if len(self.sha256) != 64:
            raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
