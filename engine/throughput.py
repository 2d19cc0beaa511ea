"""Throughput of a model on random input: images/s of inference or of a training step."""
import copy
import time

import torch
import torch.nn as nn


def measure_throughput(model: nn.Module, batch_size: int, img_size: int, device: torch.device, *,
                       train_step: bool = False, warmup: int = 3, iters: int = 10, in_chans: int = 3,
                       amp: bool = False) -> float:
    """Images per second of inference (or of a forward+backward+SGD step) on random input.

    Args:
        model: the network (its train/eval mode and weights are restored afterwards).
        batch_size: images per call.
        img_size: square input size.
        device: where to run.
        train_step: time forward + backward + optimiser step instead of inference.
        warmup: untimed calls first.
        iters: timed calls.
        in_chans: input channels.
        amp: autocast to float16 (CUDA only).

    Returns:
        images per second (median over the timed calls).
    """
    device = torch.device(device)
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    net = copy.deepcopy(model).to(device) if train_step else model.to(device)
    was_training = model.training
    net.train(train_step)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-6) if train_step else None
    use_amp = amp and device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            if train_step:
                out = net(images)
                loss = sum(o.float().mean() for o in out) if isinstance(out, tuple) else out.float().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
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
    model.train(was_training)
    times.sort()
    return batch_size / times[len(times) // 2]
