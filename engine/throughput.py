"""Throughput of a model on random input: images/s of inference or of a training step."""
import contextlib
import copy
import time

import torch
import torch.nn as nn


def _train_precision(device: torch.device, amp: bool):
    """(autocast dtype, GradScaler or None) of a timed training step: float16 with a scaler on CUDA, as
    in training (`engine.loops.make_loss_scaler`); no autocast elsewhere."""
    if amp and device.type == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return None, None


def measure_throughput(model: nn.Module, batch_size: int, img_size: int, device: torch.device, *,
                       train_step: bool = False, warmup: int = 3, iters: int = 10, in_chans: int = 3,
                       amp: bool = False) -> float:
    """Images per second of inference (or of a forward+backward+SGD step) on random input.

    The timed network is a copy of `model` on `device`: the caller's model (device, train/eval
    modes, weights, `requires_grad`) is left as it was.

    Args:
        model: the network.
        batch_size: images per call.
        img_size: square input size.
        device: where to run.
        train_step: time forward + backward + optimiser step instead of inference.
        warmup: untimed calls first.
        iters: timed calls.
        in_chans: input channels.
        amp: autocast to float16 (CUDA only); a training step then scales its loss (GradScaler).

    Returns:
        images per second (median over the timed calls).
    """
    device = torch.device(device)
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    net = copy.deepcopy(model).to(device)
    net.train(train_step)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-6) if train_step else None
    dtype, scaler = _train_precision(device, amp) if train_step else (torch.float16, None)
    use_amp = amp and device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if use_amp else contextlib.nullcontext()

    def step() -> None:
        if train_step:
            with autocast():
                out = net(images)
                loss = sum(o.float().mean() for o in out) if isinstance(out, tuple) else out.float().mean()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast():
                net(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return batch_size / times[len(times) // 2]
