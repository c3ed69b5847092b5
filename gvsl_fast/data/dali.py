"""NVIDIA DALI pair loader: ``fn.readers.numpy`` with per-sample ROI crops.

The pipeline reads the 2B volumes of a step (A's then B's) in the order the
:class:`~gvsl_fast.data.loader.PairSampler` planned them: the reader gets an explicit ``files``
sequence covering a window of ``chunk`` steps, and the crop corners arrive per sample through an
``external_source`` feeding the reader's ``roi_start`` (``roi_shape`` = patch,
``out_of_bounds_policy="pad"`` with zeros, which pads volumes smaller than the patch). When the
window is used up, or a step outside it is asked for, the pipeline is rebuilt at that step.
On a CUDA device the reader runs on the GPU (``device="gpu"``); elsewhere the same pipeline runs
on the CPU (``device_id=None``). Batches reach torch through ``DALIGenericIterator``.
"""

from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from gvsl_fast.data.loader import PairLoader


class DaliPairLoader(PairLoader):
    kind = "dali"

    def __init__(self, files, sampler, device, reason, workers: int = 2, chunk: int = 256):
        super().__init__(files, sampler, device, reason)
        self.workers, self.chunk = max(1, workers), chunk
        self._window: tuple[int, int] | None = None     # steps [start, end) of the pipeline
        self._next = -1                                 # next step the pipeline will deliver
        self._iter = None

    def _plans(self, start: int):
        plans = [self.sampler.plan(s) for s in range(start, start + self.chunk)]
        files = [str(self.files[i]) for p in plans for i in np.concatenate([p.a, p.b])]
        rois = [np.concatenate([p.start_a, p.start_b]).astype(np.int32) for p in plans]
        return files, rois

    def _build(self, start: int) -> None:
        self.close()
        files, rois = self._plans(start)
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        patch = [int(v) for v in self.sampler.patch]

        def roi_source(info):
            if info.iteration >= len(rois):
                raise StopIteration
            return list(rois[info.iteration])

        @pipeline_def(batch_size=2 * self.sampler.batch_size, num_threads=self.workers,
                      device_id=device_id, seed=self.sampler.seed, exec_dynamic=True)
        def pipeline():
            roi = fn.external_source(source=roi_source, batch=True, batch_info=True,
                                     dtype=types.INT32)
            vol = fn.readers.numpy(device="gpu" if gpu else "cpu", files=files,
                                   random_shuffle=False, roi_start=roi, roi_shape=patch,
                                   out_of_bounds_policy="pad", fill_value=0.0, name="reader")
            return fn.cast(vol, dtype=types.FLOAT)

        pipe = pipeline()
        pipe.build()
        self._iter = DALIGenericIterator([pipe], ["x"], size=-1,
                                         last_batch_policy=LastBatchPolicy.PARTIAL)
        self._window, self._next = (start, start + self.chunk), start

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None or step != self._next or step >= self._window[1]:
            self._build(step)
        x = next(self._iter)[0]["x"]
        self._next += 1
        # DALI may reuse its output buffers for later iterations: keep our own copy.
        return self._split(x.clone())

    def close(self) -> None:
        self._iter = None
