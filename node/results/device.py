"""The equipment that creates results: this node, as SEG/SR headers name it."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID, generate_uid

import node

from .uids import UID_PREFIX

__all__ = ["DEFAULT_DEVICE", "NodeDevice"]


@dataclass(frozen=True)
class NodeDevice:
    """Manufacturer, model, software version and serial number of the node.

    ``device_uid`` (the SR's Device Observer UID) is derived from the other
    fields, so it is stable across restarts of the same installation.
    """

    manufacturer: str = "cxrnode"
    manufacturer_model_name: str = "cxrnode"
    software_versions: str = node.__version__
    device_serial_number: str = "0"

    def __post_init__(self) -> None:
        for name in ("manufacturer", "manufacturer_model_name", "software_versions", "device_serial_number"):
            value = getattr(self, name)
            if not value or len(value) > 64:
                raise ValueError(f"{name} must be 1 to 64 characters")

    def equipment(self) -> dict[str, str]:
        """The General Equipment arguments highdicom's SOP class constructors take."""
        return {"manufacturer": self.manufacturer,
                "manufacturer_model_name": self.manufacturer_model_name,
                "software_versions": self.software_versions,
                "device_serial_number": self.device_serial_number}

    @property
    def device_uid(self) -> UID:
        """Device Observer UID for the SR observer context."""
        return generate_uid(
            prefix=UID_PREFIX,
            entropy_srcs=["cxrnode-device", self.manufacturer, self.manufacturer_model_name, self.device_serial_number],
        )


DEFAULT_DEVICE = NodeDevice()
