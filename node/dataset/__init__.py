"""Training sets from the archive: ``cxrnode dataset export`` (issue 10, "Retrain from archived studies").

* :mod:`node.dataset.deid`: the export's secret key, pseudonymous case ids, splits by patient and
  the header attributes kept (DICOM PS3.15 Annex E basic profile, through ``dicom-anonymizer``);
* :mod:`node.dataset.labels`: masks (a radiologist-corrected SEG from the PACS over DICOMweb, else
  the node's own SEG as a pseudo-label with a quality score) and TB labels (an engineer's CSV or a
  radiologist-verified SR, never the node's own score);
* :mod:`node.dataset.export`: selection from the queue, pixels through the node's own path
  (:func:`node.imaging.display_pixels`), 512 px PNGs and ``index.csv`` as :mod:`models.data` reads them.
"""
