"""Images in, masks out: PNG/JPEG, NIfTI, NRRD, DICOM files and series; windowing; binary masks; DICOM-SEG.

Axis orders: 2D images are ``(H, W)`` or ``(H, W, 3)`` indexed ``[y, x]``; volumes are ``(Z, Y, X)`` in the LPS
display orientation, ``array[k]`` being axial slice ``k``. See :mod:`ibisagent.imaging.io`.
"""

from .io import (
    CANONICAL_AXCODES,
    Geometry,
    Image,
    ImageError,
    load_image,
    num_slices,
    slice_of,
)
from .masks import check_mask_output, full_mask, load_mask, save_mask_like, save_mask_png
from .seg import Provenance, save_dicom_seg, segment_codes
from .windowing import (
    CT_WINDOWS,
    DisplayWindow,
    display_window,
    looks_like_hounsfield,
    percentile_to_uint8,
    to_display_rgb,
    window_to_uint8,
)

__all__ = [
    "CANONICAL_AXCODES",
    "CT_WINDOWS",
    "DisplayWindow",
    "Geometry",
    "Image",
    "ImageError",
    "Provenance",
    "check_mask_output",
    "display_window",
    "full_mask",
    "load_image",
    "load_mask",
    "looks_like_hounsfield",
    "num_slices",
    "percentile_to_uint8",
    "save_dicom_seg",
    "save_mask_like",
    "save_mask_png",
    "segment_codes",
    "slice_of",
    "to_display_rgb",
    "window_to_uint8",
]
