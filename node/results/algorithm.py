"""The algorithms named in a result: what every SEG and SR says produced it."""

from __future__ import annotations

from dataclasses import dataclass, field

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.identity import ModelIdentity

__all__ = ["Algorithm", "ResultAlgorithms"]


@dataclass(frozen=True)
class Algorithm:
    """Name, version, weights checksum and family of one algorithm.

    The weights' SHA-256 is written as an Algorithm Parameter
    (``weights_sha256=<hex>``) so each result can be traced to exact weights.
    """

    name: str
    version: str
    weights_sha256: str
    family: Code = field(default=codes.DCM.ArtificialIntelligence)

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("an algorithm needs a name and a version")
        if len(self.name) > 64 or len(self.version) > 64:
            raise ValueError("algorithm name and version must fit a DICOM LO (64 characters)")

    @classmethod
    def from_model_identity(cls, identity: ModelIdentity) -> Algorithm:
        """Describe the algorithm of a shipped model."""
        return cls(name=identity.name, version=identity.version, weights_sha256=identity.sha256)

    @property
    def uid_key(self) -> str:
        """Text that changes whenever the algorithm changes; input to result UIDs."""
        return f"{self.name}|{self.version}|{self.weights_sha256}"

    def parameters(self, **extra: str) -> dict[str, str]:
        """Algorithm Parameters: the weights checksum plus ``extra``."""
        return {"weights_sha256": self.weights_sha256, **extra}

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Segment Algorithm Identification for a SEG segment description."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=self.family, version=self.version, parameters=self.parameters()
        )

    def sr_identification(self, **extra_parameters: str) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for SR measurements and groups."""
        params = self.parameters(**extra_parameters)
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[f"{k}={v}" for k, v in params.items()],
            family=self.family,
        )


@dataclass(frozen=True)
class ResultAlgorithms:
    """The two algorithms behind one set of results: lung segmenter and TB model."""

    segmenter: Algorithm
    tb_classifier: Algorithm

    @classmethod
    def from_model_identities(cls, segmenter: ModelIdentity, tb_classifier: ModelIdentity) -> ResultAlgorithms:
        """Build both from the shipped models' identities."""
        return cls(
            segmenter=Algorithm.from_model_identity(segmenter),
            tb_classifier=Algorithm.from_model_identity(tb_classifier),
        )
