"""cxrnode: a DICOM AI node for chest radiographs."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
