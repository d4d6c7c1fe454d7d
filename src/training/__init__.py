"""GAN training, one idea per module.

- `loss`: D/G losses, the gradient penalty, the names a step reports
- `ema`: the generator's moving average
- `trainer`: `GANTrainer` (models, optimisers, random streams, one step, CUDA-graph replay)
- `window`: per-step losses kept on the device, read in one sync
- `clock`: training seconds, the lr schedule, stop signals
- `checkpoint`: fingerprint, save/load, RNG states
- `distributed`: torchrun process group, per-process device and seeds
- `loop`: `train_gan` and its `TrainResult`
- `outputs`: the stage's files (models, metrics, plots)
"""

from src.training.loop import NonFiniteLossError, TrainingInterrupted, TrainResult, train_gan
from src.training.outputs import generator_payload, write_outputs
from src.training.trainer import GANTrainer

__all__ = ["GANTrainer", "NonFiniteLossError", "TrainResult", "TrainingInterrupted", "generator_payload",
           "train_gan", "write_outputs"]
