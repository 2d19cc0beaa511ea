"""Training and evaluation loops (`engine.loops`) and throughput measurement (`engine.throughput`)."""
from engine.loops import NonFiniteLossError, all_ranks_finite, evaluate, make_loss_scaler, train_one_epoch
from engine.throughput import measure_throughput

__all__ = ["NonFiniteLossError", "all_ranks_finite", "evaluate", "make_loss_scaler", "measure_throughput",
           "train_one_epoch"]
