"""IBISAgent as a MONAI Label app.

Wiring only: one task config per file in ``lib/configs`` (as MONAI Label's radiology sample app does), options via
``--conf`` (defaults in :class:`lib.infers.Options`), and the correction loop: when a ``final`` label is saved for an
image the agent segmented, the correction becomes a trajectory in ``<studies>/ibisagent/corrections.jsonl``.

    python -m ibisagent.server --app apps/ibisagent --studies STUDIES \\
        --conf policy hf:/models/IBISAgent-7B --conf tool medsam2:/models/MedSAM2.pt --conf device cuda
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import lib.configs
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.utils.others.class_utils import get_class_names

from ibisagent.server.limits import SERVER_INPUT, SERVER_INPUT_KEY, ServerOptions, check_label_shape
from ibisagent.server.storage import AtomicLocalDatastore, SafeSessions
from lib.infers.common import Options, bad_request, check_name
from lib.pacs import PacsDatastore

logger = logging.getLogger(__name__)

#: Folder (under a local studies folder) for agent outputs and corrections.
DATA_SUBDIR = "ibisagent"


class CheckedDatastore(AtomicLocalDatastore):
    """The local datastore (index written atomically, rebuilt when a kill left it corrupt) with input checks before
    anything is stored: image ids and label tags must be plain names (no path separators, no ``..``), uploaded images
    and labels must be readable images without NaN/Inf, a label must have its image's shape. Remembers, per thread,
    the tag and the client's ``label_info`` (its ``client_id``) of the label just saved (``on_save_label`` is not told
    them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved = threading.local()

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_name(image_id, "image id")
        _check_image_file(image_filename, "upload")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise bad_request(f"unknown image id {image_id!r}", 404)
        label = _check_image_file(label_filename, "label")
        from ibisagent.imaging import load_image

        check_label_shape(label.array.shape, load_image(image_uri).array.shape)
        self.saved.tag = label_tag
        self.saved.info = dict(label_info or {})
        return super().save_label(image_id, label_filename, label_tag, label_info)


def _check_image_file(path: str, what: str) -> Any:
    """The uploaded file as an :class:`ibisagent.imaging.Image`; 415 when unreadable, 422 with NaN/Inf values. The
    message names no server path."""
    from ibisagent.imaging import ImageError, load_image
    from ibisagent.server.limits import check_finite

    try:
        image = load_image(path)
    except ImageError as exc:
        reason = str(exc).replace(str(path), "the file")
        raise bad_request(f"{what} rejected: not a readable image ({reason})", 415) from exc
    check_finite(image.array)
    return image


class IbisAgentApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.options = Options.from_conf(conf)
        self.server_options = ServerOptions.from_conf(conf)
        remote = studies.startswith(("http://", "https://"))
        self.data_dir = Path(app_dir, "model", DATA_SUBDIR) if remote else Path(studies, DATA_SUBDIR)
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self._save_lock = threading.Lock()

        configs = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        self.task_configs: dict[str, TaskConfig] = {}
        for name, path in sorted(configs.items()):
            module, _, cls = path.rpartition(".")
            config = getattr(__import__(module, fromlist=[cls]), cls)()
            config.init(name, self.model_dir, conf, None, data_dir=str(self.data_dir))
            self.task_configs[name] = config
        logger.info("ibisagent options: %s; data in %s", self.options.as_info(), self.data_dir)
        from ibisagent.corrections import CorrectionStore

        CorrectionStore(self.data_dir / "corrections.jsonl").repair()
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="IBISAgent",
                         description="Agentic interactive segmentation: instruction → clicks → mask, with reasoning",
                         version="0.1.0")

    # ---- wiring -------------------------------------------------------------------------------------------------

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # → _init_dicomweb_datastore below for a DICOMweb PACS
        return CheckedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        """A DICOMweb PACS: the configured modalities listed, final labels stored as ibisagent DICOM-SEG
        (:class:`lib.pacs.PacsDatastore`). Google's Healthcare API keeps MONAI Label's own datastore."""
        if "googleapis.com" in self.studies:
            return super()._init_dicomweb_datastore()
        config = self.task_configs["ibisagent"]
        return PacsDatastore(self.studies, self.options.modality_list, config.outputs,  # type: ignore[attr-defined]
                             self.options.tool)

    def _download_dcmqi_tools(self) -> None:
        """Nothing to download: DICOM-SEG is written with highdicom (MONAI Label fetches dcmqi from the internet
        here, which fails offline)."""
        logger.info("dcmqi not needed: DICOM-SEG is written with highdicom")

    def init_infers(self) -> dict[str, Any]:
        infers: dict[str, Any] = {}
        for name, config in self.task_configs.items():
            tasks = config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return infers

    def init_trainers(self) -> dict[str, Any]:
        trainers: dict[str, Any] = {}
        for name, config in self.task_configs.items():
            tasks = config.trainer()
            if tasks:
                trainers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return trainers

    def _load_sessions(self, load: bool = False) -> Any:
        """MONAI Label's sessions (when enabled), with uploaded archives unpacked only inside their folder."""
        if not load:
            return None
        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["config"] = {**meta.get("config", {}), "ibisagent": self.options.public_info(),
                          "server": self.server_options.as_info()}
        return meta

    # ---- requests -----------------------------------------------------------------------------------------------

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Image ids resolve only inside the datastore: ``image`` must be a datastore id, unless the serving layer
        (:mod:`ibisagent.server`) marked it as a file it wrote itself (an upload or a session image). Internal keys
        (``ibisagent_*``) sent by a client are refused."""
        request = dict(request)
        server_input = request.pop(SERVER_INPUT_KEY, None) is SERVER_INPUT
        internal = sorted(str(k) for k in request if str(k).startswith("ibisagent_"))
        if internal:
            raise bad_request(f"request keys {internal} are internal to the server and may not be sent")
        image = request.get("image")
        if not server_input:
            check_name(image, "image id")
            if not (datastore or self.datastore()).get_image_uri(image):
                raise bad_request(f"unknown image id {image!r}", 404)
            request["ibisagent_image_id"] = image
        return super().infer(request, datastore)

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        super().on_save_label(image_id, label_id)
        saved = getattr(self.datastore(), "saved", None)
        tag = getattr(saved, "tag", DefaultLabelTag.FINAL.value)
        if tag != DefaultLabelTag.FINAL.value:
            return {"corrections_added": 0}
        client_id = (getattr(saved, "info", None) or {}).get("client_id")
        try:
            with self._save_lock:
                added, total = self._derive_corrections(image_id, label_id, client_id)
        except Exception as exc:  # the label is saved already; a failed derivation must not fail the save
            logger.exception("deriving the correction for %s failed", image_id)
            runtime = self.task_configs["ibisagent"].runtime  # type: ignore[attr-defined]
            return {"corrections_added": 0,
                    "corrections_error": runtime.paths.scrub(f"{type(exc).__name__}: {exc}")}
        result: dict[str, Any] = {"corrections_added": added, "corrections_total": total}
        every = self.options.auto_train_every
        if added and every and total // every > (total - added) // every:
            logger.info("%d corrections collected: starting ibisagent_sft", total)
            task = self.async_training("ibisagent_sft", None, enqueue=True) or {}
            # a snapshot: MONAI Label's task dict lives on (its thread adds a deque of log lines to it)
            result["training"] = {k: task[k] for k in ("id", "type", "status", "start_ts") if k in task}
        return result

    def _derive_corrections(self, image_id: str, label_id: str, client_id: str | None) -> tuple[int, int]:
        from ibisagent.corrections import CorrectionStore, derive_corrections
        from ibisagent.imaging import load_image

        config = self.task_configs["ibisagent"]
        store = CorrectionStore(config.corrections_path)  # type: ignore[attr-defined]
        outputs = config.outputs.take(image_id)  # type: ignore[attr-defined]
        if not outputs:
            return 0, store.count()
        label = load_image(self.datastore().get_label_uri(label_id, DefaultLabelTag.FINAL.value)).array
        # replay each output on the picture the agent saw: the modality its request used (a request's own
        # ``modality`` overrides --conf modality), grouped in case requests with different ones left outputs
        by_modality: dict[str, dict[int, Any]] = {}
        for k, entry in outputs.items():
            by_modality.setdefault(entry.get("modality", self.options.modality) or "", {})[k] = entry
        records = []
        for modality, group in by_modality.items():
            image = load_image(self.datastore().get_image_uri(image_id), modality=modality or None)
            records += derive_corrections(image, label, group, config.runtime.tool(),  # type: ignore[attr-defined]
                                          image_id, client_id=client_id)
        for record in records:
            store.append(record)
        return len(records), store.count()
