"""The equipment that creates results: this node, as SEG, SR and SC headers name it.

Manufacturer and Manufacturer's Model Name are always ``cxrnode``: the worker recognises the
node's own results routed back to it by them (:mod:`node.worker.selection`). What identifies one
installation comes from ``[node]`` in the settings, or is derived from the installation's own
identity file (:mod:`node.installation`) when left empty; :func:`device_for` is the one place
that resolves it, called when the pipeline is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

import node
from node.errors import SettingsError
from node.installation import load_or_create
from node.settings import Settings, check_text, check_uid_root

from .uids import UID_PREFIX

__all__ = ["DEFAULT_DEVICE", "MANUFACTURER", "MODEL_NAME", "NodeDevice", "device_for"]

#: Manufacturer and Manufacturer's Model Name of every result: how own results are recognised.
MANUFACTURER = "cxrnode"
MODEL_NAME = "cxrnode"

#: (field, DICOM keyword, maximum length, VR) of the General Equipment attributes a device writes.
_EQUIPMENT = (
    ("manufacturer", "Manufacturer", 64, "LO"),
    ("manufacturer_model_name", "ManufacturerModelName", 64, "LO"),
    ("software_versions", "SoftwareVersions", 64, "LO"),
    ("device_serial_number", "DeviceSerialNumber", 64, "LO"),
    ("institution_name", "InstitutionName", 64, "LO"),
    ("institutional_department_name", "InstitutionalDepartmentName", 64, "LO"),
    ("station_name", "StationName", 16, "SH"),
)
_REQUIRED = ("manufacturer", "manufacturer_model_name", "software_versions", "device_serial_number")


@dataclass(frozen=True)
class NodeDevice:
    """The node's identity in its results.

    ``institution_name``, ``institutional_department_name`` and ``station_name`` are left out
    of the results when empty. ``installation_id`` (:mod:`node.installation`) makes
    :attr:`device_uid` this installation's own; without one (:data:`DEFAULT_DEVICE`, library
    use) the UID derives from the other fields. ``uid_root`` prefixes every UID the node
    generates for its results (:mod:`node.results.uids`).

    Raises:
        ValueError: a value does not fit its VR, or a required one is empty.
    """

    manufacturer: str = MANUFACTURER
    manufacturer_model_name: str = MODEL_NAME
    software_versions: str = node.__version__
    device_serial_number: str = "0"
    institution_name: str = ""
    institutional_department_name: str = ""
    station_name: str = ""
    installation_id: str = ""
    uid_root: str = UID_PREFIX

    def __post_init__(self) -> None:
        try:
            for name, _, length, vr in _EQUIPMENT:
                if check_text(name, getattr(self, name), length, vr) != getattr(self, name):
                    raise SettingsError(f"{name}: {getattr(self, name)!r} has surrounding spaces")
            if check_uid_root("uid_root", self.uid_root) != self.uid_root:
                raise SettingsError(f"uid_root: {self.uid_root!r} must end with a dot")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        for name in _REQUIRED:
            if not getattr(self, name):
                raise ValueError(f"{name} must be 1 to 64 characters")

    def equipment(self) -> dict[str, str]:
        """The General Equipment arguments highdicom's SOP class constructors take."""
        return {"manufacturer": self.manufacturer,
                "manufacturer_model_name": self.manufacturer_model_name,
                "software_versions": self.software_versions,
                "device_serial_number": self.device_serial_number}

    def write_equipment(self, ds: Dataset) -> None:
        """Write the General Equipment attributes into a result ``ds``; empty optional ones are
        removed, so nothing a library copied from the source image remains."""
        for name, keyword, _, _ in _EQUIPMENT:
            value = getattr(self, name)
            if value:
                setattr(ds, keyword, value)
            elif keyword in ds:
                delattr(ds, keyword)

    @property
    def observer_name(self) -> str:
        """Device Observer Name of the SR: the station name, else the model name."""
        return self.station_name or self.manufacturer_model_name

    @property
    def device_uid(self) -> UID:
        """Device Observer UID for the SR observer context: stable for one installation."""
        if self.installation_id:
            return generate_uid(prefix=self.uid_root, entropy_srcs=["cxrnode-device-installation",
                                                                    self.installation_id])
        return generate_uid(
            prefix=self.uid_root,
            entropy_srcs=["cxrnode-device", self.manufacturer, self.manufacturer_model_name, self.device_serial_number],
        )


DEFAULT_DEVICE = NodeDevice()
"""A device without an installation: for library use and tests; the node uses :func:`device_for`."""


def device_for(settings: Settings) -> NodeDevice:
    """This node's identity: the ``[node]`` settings, with the installation's own defaults
    (:mod:`node.installation`, created in the data folder on the first call) where they are empty.

    Raises:
        SettingsError: the installation's identity file cannot be created or read.
    """
    configured = settings.node
    installation = load_or_create(settings.data_path)
    return NodeDevice(
        device_serial_number=configured.device_serial_number or installation.serial_number,
        institution_name=configured.institution_name,
        institutional_department_name=configured.institution_department_name,
        station_name=configured.station_name or installation.station_name,
        installation_id=installation.installation_id,
        uid_root=configured.uid_root or UID_PREFIX,
    )
