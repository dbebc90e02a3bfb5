"""The PACS path (OHIF users' setup): MONAI Label's DICOMweb datastore, configured rather than forked.

MONAI Label 0.8.5's ``DICOMWebDatastore`` lists only the modality of ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` (CT by
default) and saves final labels through dcmqi's ``itkimage2segimage``, which the app downloads from the internet at
start-up (offline, start-up fails). :class:`PacsDatastore` keeps everything else of it (WADO-RS download and NIfTI
conversion of series, the local cache, reading SEG labels back with pydicom-seg) and changes two things:

- ``list_images`` runs one QIDO-RS series search per configured modality (``--conf modalities``, default ``CT,MR``),
  the other keys of the search filter kept;
- ``save_label`` with the ``final`` tag writes the product's own DICOM-SEG (``ibisagent.imaging.save_mask_like``:
  highdicom, with provenance) on the downloaded source series and stores it in the PACS over STOW-RS; no dcmqi.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


class PacsDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore listing several modalities and saving final labels as ibisagent DICOM-SEG.

    Args:
        url: the DICOMweb root (``--studies http://host:8042/dicom-web``).
        modalities: modality codes whose series are listed.
        outputs: the store of agent outputs (``ibisagent.corrections.AgentOutputStore``): names the segments and says
            which policy and tool made the mask the radiologist corrected.
        tool: the tool spec (for the provenance of labels the agent had no part in).
    """

    def __init__(self, url: str, modalities: Sequence[str], outputs: Any, tool: str) -> None:
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            from dicomweb_client.session_utils import create_session_from_user_pass  # noqa: PLC0415

            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        self.modalities = tuple(modalities)
        self.outputs = outputs
        self.tool = tool
        self.saved = threading.local()  # the tag and label_info of the label just saved, for on_save_label
        super().__init__(client=client, search_filter=dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER),
                         cache_path=cache or None, fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                         convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)
        logger.info("PACS %s: listing modalities %s", url, ",".join(self.modalities))

    def list_images(self) -> list[str]:
        """SeriesInstanceUIDs of every series of the configured modalities (one QIDO-RS search each)."""
        series: list[str] = []
        for modality in self.modalities:
            found = self._client.search_for_series(search_filters={**self._search_filter, "Modality": modality})
            for ds in found:
                uid = str(Dataset.from_json(ds)["SeriesInstanceUID"].value)
                if uid not in series:
                    series.append(uid)
        return series

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The local copy of a label saved through this server, else MONAI Label's download from the PACS."""
        local = LocalDatastore.get_label_uri(self, label_id, label_tag)
        if local and os.path.isfile(local):
            return local
        return super().get_label_uri(label_id, label_tag, image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        self.saved.tag, self.saved.info = label_tag, dict(label_info or {})
        if label_tag != DefaultLabelTag.FINAL.value:
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        from ibisagent.imaging import load_image, load_mask, save_mask_like

        self.get_image_uri(image_id)  # downloads the series if it is not cached yet
        series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        image = load_image(series_dir)
        names, provenance = self._describe(image_id, label_info)
        mask = load_mask(label_filename, image) if len(names) == 1 else _label_map(label_filename, image, names)
        fd, seg_file = tempfile.mkstemp(prefix="ibisagent-seg-", suffix=".dcm")
        os.close(fd)
        try:
            save_mask_like(mask, image, seg_file, label_names=names, provenance=provenance)
            series_uid = dicom_web_upload_dcm(seg_file, self._client)
        finally:
            os.unlink(seg_file)
        if not series_uid:
            raise RuntimeError(f"the PACS did not confirm storing the DICOM-SEG of {image_id}")
        logger.info("saved the final label of %s to the PACS as DICOM-SEG series %s", image_id, series_uid)
        info = self.get_image_info(image_id)
        label_info = {**label_info, "SeriesInstanceUID": series_uid, "Modality": info.get("Modality"),
                      "PatientID": info.get("PatientID"), "StudyInstanceUID": info.get("StudyInstanceUID")}
        return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)

    def _describe(self, image_id: str, label_info: dict[str, Any]) -> tuple[list[str], Any]:
        """Segment names and provenance of a radiologist's final label: the agent's targets (or the client's label
        names), SEMIAUTOMATIC, the policy and tool that made the starting mask, the client id and the time."""
        from ibisagent.imaging import Provenance

        entries = self.outputs.peek(image_id) if self.outputs is not None else {}
        entry = next(iter(entries.values()), None)
        client_names = [str(x.get("name")) for x in label_info.get("label_info") or [] if isinstance(x, dict)
                        and x.get("name")]
        names = list(entry["targets"]) if entry else client_names or ["label"]
        from ibisagent.specs import public_spec

        # the PACS is read by others: policy and tool without the server's checkpoint paths
        provenance = Provenance(policy=public_spec(entry.get("policy", "") if entry else ""),
                                tool=public_spec(entry.get("tool", self.tool) if entry else self.tool), person=True,
                                client_id=str(label_info.get("client_id") or "") or None,
                                time=dt.datetime.now(dt.timezone.utc))
        return names, provenance


def _label_map(path: str, image: Any, names: Sequence[str]) -> np.ndarray:
    """A multi-target label file as an integer label map (values 0..len(names))."""
    from ibisagent.imaging import load_image

    values = np.asarray(load_image(path).array)
    if values.shape != image.array.shape or values.min() < 0 or values.max() > len(names):
        raise ValueError(f"label {os.path.basename(path)}: expected values 0..{len(names)} on the image's grid")
    return values.astype(np.uint16)
