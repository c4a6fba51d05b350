"""Deterministic UIDs for the results of one source image.

A result's UIDs are a hash of what defines it: the source SOP Instance UID,
the kind of result (``seg``, ``sr`` or ``sc``), the identities of the algorithms that
produced it, and the role of the UID (series, instance, tracking). Encoding
the same result again, e.g. after a crash between encoding and sending, gives
the same Series and SOP Instance UIDs, so the PACS sees a re-send of the same
object and never a duplicate. A new model version gives new UIDs, so results
of different versions never overwrite each other.

UIDs come from :func:`pydicom.uid.generate_uid` with ``entropy_srcs`` (a
SHA-512 hash of the parts, turned into an integer under :data:`UID_PREFIX`, or under the
hospital's own root when ``[node] uid_root`` is set: the encoders pass
:attr:`node.results.device.NodeDevice.uid_root`). The root is only the prefix: the digits
after it come from the same hash (fewer of them under a longer root, at least 24).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID, generate_uid

__all__ = ["UID_PREFIX", "ResultKind", "ResultUIDs", "derive_uid", "result_uids"]

#: Root under which all result UIDs are generated. This is pydicom's own
#: prefix (``1.2.826.0.1.3680043.8.498.``), which pydicom's maintainers
#: allow for generated UIDs; acceptable until cxrnode registers its own root,
#: which then replaces this one constant (old results keep their UIDs).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

ResultKind = Literal["seg", "sr", "sc"]

_NAMESPACE = "cxrnode-result-uid-v1"


@dataclass(frozen=True)
class ResultUIDs:
    """Series Instance UID and SOP Instance UID of one result object."""

    series_instance_uid: UID
    sop_instance_uid: UID


def derive_uid(source_sop_instance_uid: str, *parts: str, root: str = UID_PREFIX) -> UID:
    """Return a UID under ``root`` that depends only on the source SOP Instance UID and ``parts``.

    Raises:
        ValueError: empty source SOP Instance UID.
    """
    if not source_sop_instance_uid:
        raise ValueError("a source SOP Instance UID is needed to derive result UIDs")
    return generate_uid(prefix=root, entropy_srcs=[_NAMESPACE, str(source_sop_instance_uid), *parts])


def result_uids(source_sop_instance_uid: str, kind: ResultKind, algorithm_keys: Sequence[str], *,
                root: str = UID_PREFIX) -> ResultUIDs:
    """Return the Series and SOP Instance UIDs (under ``root``) of one result of one source image.

    ``algorithm_keys`` identify the algorithms the result depends on (see
    :attr:`node.results.algorithm.Algorithm.uid_key`); their order matters.
    Each source image gets its own result series per kind.

    Raises:
        ValueError: unknown kind, no algorithm keys, or empty source UID.
    """
    if kind not in ("seg", "sr", "sc"):
        raise ValueError(f"unknown result kind {kind!r}; expected 'seg', 'sr' or 'sc'")
    if not algorithm_keys:
        raise ValueError("at least one algorithm key is needed to derive result UIDs")
    keys = [str(k) for k in algorithm_keys]
    return ResultUIDs(
        series_instance_uid=derive_uid(source_sop_instance_uid, kind, "series", *keys, root=root),
        sop_instance_uid=derive_uid(source_sop_instance_uid, kind, "instance", *keys, root=root),
    )
