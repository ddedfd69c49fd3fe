"""Cross-model patching: align two tokenizations, fit affine maps between two models' layers, and keep
the maps as named artifacts with their provenance.

    >>> from patchscopes.crossmodel import align_by_end_offset
    >>> align_by_end_offset([(0, 3), (3, 9)], [(0, 0), (0, 3), (3, 6), (6, 9)])
    [(0, 1), (1, 3)]
"""

from patchscopes.crossmodel.align import AlignmentError, align_by_end_offset, aligned_positions
from patchscopes.crossmodel.fit import FitReport, LayerPairs, fit_maps
from patchscopes.crossmodel.store import MapProvenanceError, MapStore, check_provenance

__all__ = [
    "AlignmentError",
    "FitReport",
    "LayerPairs",
    "MapProvenanceError",
    "MapStore",
    "align_by_end_offset",
    "aligned_positions",
    "check_provenance",
    "fit_maps",
]
