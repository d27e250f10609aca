"""What the scoring workers' fork server loads once, so that every worker shares it instead of copying it.

On a many-core CPU ``smartcrop run`` scores in its worker processes (:func:`smartcrop.runner.scoring_in_workers`);
on Linux they are forked from a multiprocessing fork server that imports this module before forking any of
them.  Importing it:

- imports everything a worker uses — torch, the model and scoring code, image decoding and the lossless JPEG
  backend — instead of each worker importing it into its own memory;
- loads the model named by the ``SMARTCROP_PRELOAD_MODEL`` environment variable (set by the run while it starts
  the fork server) in its scoring form, BatchNorm folded (:func:`smartcrop.stages.worker_cropper`): its
  tensors are never written while scoring, so they stay shared;
- freezes the garbage collector's view of every object made so far (:func:`gc.freeze`): a collection in a
  worker would otherwise write to each of these objects' headers and so copy nearly every page of them.

Measured (docs/performance.md): 16 scoring workers on 64 12-MP photos held 2.8 GB (PSS) without it.
Torch runs on one thread here (``torch.set_num_threads(1)``, before any computation, as in the workers), so the
fork server never starts a thread pool that its forked workers would inherit in an unknown state; with
``OMP_NUM_THREADS`` set, the model is not loaded here.
"""

from __future__ import annotations

import gc
import os

from .pool import import_torch

# the collector paused while torch is imported: the gc.collect() before freezing is then its only full pass
torch = import_torch()

from . import cropper, imageio, jpegcrop, stages, weights  # noqa: E402, F401 - imported for the workers to share


def _preload() -> None:
    from PIL import Image

    Image.init()  # PIL's format plugins, imported on a worker's first decode otherwise
    jpegcrop.available()  # loads the lossless backend (libjpeg-turbo or jpeglib)
    path = os.environ.get(stages.PRELOAD_ENV)
    # with OMP_NUM_THREADS set the workers run torch on that many threads: no computation here then (the model
    # is loaded by each worker), so that no thread pool exists when they are forked
    if path and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        try:
            stages.worker_cropper(path)
        except Exception:  # noqa: BLE001 - each worker then loads it itself, and reports what is wrong per photo
            pass
    gc.collect()
    gc.freeze()


_preload()
