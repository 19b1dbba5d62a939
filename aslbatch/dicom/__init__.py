"""DICOM import (``aslbatch import``): the vendors' product ASL series into a BIDS ASL dataset.

Needs the ``dicom`` extra (pydicom and the dcm2niix package): ``pip install 'aslbatch[dicom]'``.
Modules: :mod:`.series` (find series, read vendor tags), :mod:`.convert` (dcm2niix),
:mod:`.params` (study parameters), :mod:`.sidecar` (read / supplied / decided fields),
:mod:`.roles` (volume roles checked against the data), :mod:`.importer` (the command).
"""

from .importer import ImportReport, SeriesOutcome, import_dicom

__all__ = ["ImportReport", "SeriesOutcome", "import_dicom"]
