"""Face-aware crop choice (opt-in: ``run --faces``, ``Cropper(faces=True)``).

The crop people notice first as wrong is one that slices a face (a chin, a mouth, half a head).  With faces on,
frontal faces are found on the reduced image the model scores (OpenCV's Haar cascade
``haarcascade_frontalface_default``, shipped inside ``opencv-python-headless``: the ``faces`` extra), and a
candidate crop that keeps less than :data:`FACE_KEEP` of a face's area loses :data:`FACE_WEIGHT` score units,
scaled by that face's area relative to the largest face found (a small face in the background counts for
less).  The crop is then chosen (and box-voted) on those scores as usual; the reported score stays the model's.

* :func:`detect_faces` — faces of one image, in the pixels of the full-size image;
* :func:`face_penalty` — the penalty of each candidate box.

Measured in docs/results.md ("Face-aware choice"): the face-cut rate of ``../shared/tools/face_cut.py``, the
FCDB IoU with and without it, and its cost per photo.
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError

#: a face counts as cut when less than this share of its area is inside the crop (face_cut.py's rule)
FACE_KEEP = 0.9
#: score units a crop loses for cutting the largest face (smaller faces: in proportion to their area)
FACE_WEIGHT = 1.0
#: faces are searched at this share of the model's input size (1: short side 256, faces of about 9 % of the short
#: side and larger; 0.75 measured 9 ms a photo instead of 13 but left 19 of 347 16:9 crops cutting a face on
#: ../shared's unlabeled photos instead of 15 — docs/results.md)
SEARCH_SCALE = 1.0
MIN_FACE = 24  # pixels at the search size: the cascade's own window

_cascade = None
_threaded = False  # a search ran in this process with OpenCV's thread pool (see :func:`fork_unsafe`)


class FacesUnavailable(UsageError):
    """OpenCV (the ``faces`` extra) is not installed."""


def require() -> None:
    """Raise :class:`FacesUnavailable` (one line, naming the extra) unless :func:`detect_faces` can run."""
    _load_cascade()


def _load_cascade():
    global _cascade
    if _cascade is None:
        try:
            import cv2
        except ImportError:
            raise FacesUnavailable("--faces needs OpenCV: pip install 'opencv-python-headless>=4.8,<5' (5 no "
                                   "longer ships the face cascades; smartcrop's faces extra)") from None
        c = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if c.empty():
            raise FacesUnavailable("OpenCV's haarcascade_frontalface_default.xml could not be loaded "
                                   "(opencv-python-headless 5 no longer ships it: install <5)")
        _cascade = c
    return _cascade


def one_thread() -> None:
    """Let OpenCV use one thread in this process (a process-wide setting, like torch's: ``run`` makes it in
    its scoring processes, which share the cores with the decoding workers; the library leaves it alone)."""
    import cv2

    cv2.setNumThreads(1)


def fork_unsafe() -> bool:
    """Whether this process has searched faces with OpenCV's thread pool running: a child forked from it then
    deadlocks in its first OpenCV call (the pool's lock copied held; seen as a hang in ``cv2.setNumThreads``
    when a library caller used ``Cropper(faces=True)`` before a run with worker processes), so a run whose
    workers search faces starts them from a fork server instead (``runner._start_method``)."""
    return _threaded


def available() -> bool:
    """Whether :func:`detect_faces` can run here."""
    try:
        _load_cascade()
    except FacesUnavailable:
        return False
    return True


def detect_faces(image, full_size: tuple[int, int] | None = None,
                 search_size: tuple[int, int] | None = None) -> np.ndarray:
    """Frontal faces (F, 4) ``x1, y1, x2, y2`` in the pixels of the full-size image (``full_size``, default the
    image's own size) of a PIL ``image``, searched at ``search_size`` (w, h; default the image's size) —
    :class:`~smartcrop.cropper.Cropper` searches at :data:`SEARCH_SCALE` of the model's input size (``run``'s
    images are at that input size)."""
    from PIL import Image

    cascade = _load_cascade()
    fw, fh = full_size or image.size
    gray = image.convert("L")
    if search_size is not None and gray.size != tuple(search_size):
        gray = gray.resize(tuple(search_size), Image.BILINEAR, reducing_gap=2.0)
    g = np.asarray(gray)
    if min(g.shape) < MIN_FACE:
        return np.zeros((0, 4))
    global _threaded
    if not _threaded:
        import cv2

        _threaded = cv2.getNumThreads() > 1
    found = cascade.detectMultiScale(g, scaleFactor=1.2, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE))
    if not len(found):
        return np.zeros((0, 4))
    f = np.asarray(found, dtype=np.float64).reshape(-1, 4)
    sx, sy = fw / g.shape[1], fh / g.shape[0]
    return np.stack([f[:, 0] * sx, f[:, 1] * sy, (f[:, 0] + f[:, 2]) * sx, (f[:, 1] + f[:, 3]) * sy], axis=1)


def detect_for_model(image, full_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """:func:`detect_faces` searched at :data:`SEARCH_SCALE` of the model's ``input_size`` (w, h): what
    :meth:`~smartcrop.cropper.Cropper.find_faces` and ``run``'s decoding workers (``stages.prepare``) find."""
    return detect_faces(image, full_size, (round(input_size[0] * SEARCH_SCALE), round(input_size[1] * SEARCH_SCALE)))


def kept_share(boxes: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(B, F): the share of each face's area inside each box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[:, None]
    f = np.asarray(faces, dtype=np.float64).reshape(-1, 4)[None]
    ix = np.clip(np.minimum(f[..., 2], b[..., 2]) - np.maximum(f[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(f[..., 3], b[..., 3]) - np.maximum(f[..., 1], b[..., 1]), 0, None)
    area = np.maximum((f[..., 2] - f[..., 0]) * (f[..., 3] - f[..., 1]), 1e-9)
    return ix * iy / area


def face_penalty(boxes: np.ndarray, faces: np.ndarray, weight: float = FACE_WEIGHT) -> np.ndarray:
    """(B,): ``weight`` × the sum, over the faces a box cuts (keeps < :data:`FACE_KEEP` of), of the face's area
    relative to the largest face's; zeros without faces."""
    faces = np.asarray(faces, dtype=np.float64).reshape(-1, 4)
    n = len(np.asarray(boxes).reshape(-1, 4))
    if not len(faces):
        return np.zeros(n)
    area = (faces[:, 2] - faces[:, 0]) * (faces[:, 3] - faces[:, 1])
    rel = area / max(float(area.max()), 1e-9)
    return weight * ((kept_share(boxes, faces) < FACE_KEEP) * rel[None]).sum(axis=1)
