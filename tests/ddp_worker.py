"""Run under torchrun by test_train.py: a few DDP steps, then each rank saves its own weights."""

import sys
from pathlib import Path

import torch

from gvsl_fast.train.config import TrainConfig
from gvsl_fast.train.loop import Trainer

out = Path(sys.argv[1])
cfg = TrainConfig(out=out / "run", cache=str(out / "cache"), steps=3, patch=(16, 16, 16),
                  spacing=2.0, batch_size=1, save_every=3, progress=False, workers=0,
                  loader="torch", device="cpu")
trainer = Trainer(cfg)
trainer.fit()
(batch, _) = trainer.last
torch.save({"step": trainer.step, "model": trainer.model.state_dict(),
            "batch_sum": float(batch[2].sum())}, out / f"rank{trainer.dist.rank}.pt")
