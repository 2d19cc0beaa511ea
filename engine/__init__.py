"""Training and evaluation loops (`engine.loops`), the fine-tuning loop (`engine.training`) and throughput
measurement (`engine.throughput`)."""
from engine.loops import NonFiniteLossError, evaluate, make_loss_scaler, train_one_epoch
from engine.training import BEST_CHECKPOINT, LAST_CHECKPOINT, TrainConfig, ema_horizon_note, fit
from engine.throughput import measure_throughput

__all__ = ["BEST_CHECKPOINT", "LAST_CHECKPOINT", "NonFiniteLossError", "TrainConfig",
           "ema_horizon_note", "evaluate", "fit", "make_loss_scaler", "measure_throughput", "train_one_epoch"]
