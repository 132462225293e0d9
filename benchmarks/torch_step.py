"""PyTorch reference of the ekd_jax joint train step, for CPU speed comparisons (not project code).

Run with the separate torch venv (torch is not a project requirement):

  /work/torchvenv/bin/python benchmarks/torch_step.py --pair resnet56-resnet20 --batch_size 64
  /work/torchvenv/bin/python benchmarks/torch_step.py --pair resnet32x4-resnet8x4 --adapter 1x1

One step = what ekd_jax's 'ekd' step does with its default loss settings:
  uint8 batch -> random crop (pad 4) + horizontal flip + normalise (same view for both nets)
  -> teacher and student forward in train mode (BatchNorm batch statistics, running stats updated)
  -> CE(teacher) + CE(student) + KD(student || teacher.detach(), T=4) + sum over the 3 stage pairs of
     MSE(adapter_k(student stage k), teacher stage k .detach())
  -> backward -> ONE SGD step (lr 0.05, momentum 0.9, weight decay 5e-4) over teacher, student and
     adapters; also the train top-1 of both nets (as the ekd_jax metrics).
``--adapter ekd`` (default) mirrors ekd_jax's adapter (3x3 conv -> BN -> ReLU -> 1x1 conv, no
bias); ``--adapter 1x1`` is the lighter 1x1 conv -> BN adapter of the original reference step.
``--method vanilla`` is the student alone (CE only).

The networks are RepDistiller's CIFAR ResNets (models/resnet.py), written compactly: BasicBlock
with a 1x1 conv + BN projection shortcut, stem conv3x3-BN-ReLU, global average pool, Linear.

Modes: by default prints one JSON line with the median ms/step and images/s over timed chunks.
``--serve``: builds, warms up, prints ``ready``, then for each stdin line ``N`` runs N steps and
prints their wall seconds (``quit`` ends) — benchmarks/compare_cpu.py drives it, alternating
chunks with the JAX step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PLAIN, X4 = (16, 16, 32, 64), (32, 64, 128, 256)
MODELS = {
    **{f"resnet{d}": (d, PLAIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, X4),
    "resnet32x4": (32, X4),
}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for s, w in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (s > 0 and b == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.fc(x.mean((2, 3))), feats


def make_adapter(kind, cin, cout):
    if kind == "ekd":  # ekd_jax guided.Adapter
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 1, bias=False)
        )
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class JointStep:
    def __init__(self, pair, batch_size, num_classes=100, adapter="ekd", method="ekd", channels_last=False, seed=0):
        torch.manual_seed(seed)
        tname, sname = pair.split("-")
        self.method = method
        self.teacher = ResNet(*MODELS[tname], num_classes) if method == "ekd" else None
        self.student = ResNet(*MODELS[sname], num_classes)
        params = list(self.student.parameters())
        self.adapters = None
        if method == "ekd":
            sw, tw = MODELS[sname][1][1:], MODELS[tname][1][1:]
            self.adapters = nn.ModuleList(make_adapter(adapter, a, b) for a, b in zip(sw, tw))
            params += list(self.teacher.parameters()) + list(self.adapters.parameters())
        self.mods = [m for m in (self.teacher, self.student, self.adapters) if m is not None]
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        for m in self.mods:
            m.train()
            m.to(memory_format=self.fmt)
        self.opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.mean = torch.tensor([0.507, 0.487, 0.441]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.267, 0.256, 0.276]).view(1, 3, 1, 1)
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (torch.randint(0, 256, (batch_size, 32, 32, 3), dtype=torch.uint8, generator=g),
             torch.randint(0, num_classes, (batch_size,), generator=g))
            for _ in range(4)
        ]
        self.batch_size = batch_size
        self.i = 0

    def views(self, images):  # uint8 NHWC -> augmented, normalised float NCHW
        n, h, w, _ = images.shape
        p = 4
        padded = F.pad(images, (0, 0, p, p, p, p))
        oy, ox = torch.randint(0, 2 * p + 1, (n,)), torch.randint(0, 2 * p + 1, (n,))
        rows = (oy[:, None] + torch.arange(h))[:, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]
        x = padded[torch.arange(n)[:, None, None], rows, cols]  # (N, H, W, C)
        flip = torch.rand(n) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.fmt)

    def step(self):
        images, labels = self.batches[self.i % len(self.batches)]
        self.i += 1
        x = self.views(images)
        zs, fs = self.student(x)
        loss = F.cross_entropy(zs, labels)
        if self.method == "ekd":
            zt, ft = self.teacher(x)
            loss = loss + F.cross_entropy(zt, labels)
            T = 4.0
            kd = F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt.detach() / T, 1), reduction="batchmean") * T * T
            loss = loss + kd
            for a, s, t in zip(self.adapters, fs, ft):
                loss = loss + F.mse_loss(a(s), t.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            top1 = (zs.argmax(1) == labels).float().mean()
            if self.method == "ekd":
                top1 = top1 + (zt.argmax(1) == labels).float().mean()
        return loss.detach(), top1

    def run(self, n):
        t0 = time.perf_counter()
        for _ in range(n):
            loss, _ = self.step()
        float(loss)
        return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="resnet56-resnet20")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--adapter", choices=("ekd", "1x1"), default="ekd")
    p.add_argument("--method", choices=("ekd", "vanilla"), default="ekd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--steps_per_chunk", type=int, default=0, help="0 = about --chunk_seconds per chunk")
    p.add_argument("--chunk_seconds", type=float, default=2.0)
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--serve", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    js = JointStep(a.pair, a.batch_size, a.num_classes, a.adapter, a.method, a.channels_last)
    first = js.run(max(a.warmup_steps, 1)) / max(a.warmup_steps, 1)
    if a.serve:
        print(f"ready {first:.6f}", flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line or line == "quit":
                break
            c0 = time.process_time()
            wall = js.run(int(line))
            print(f"{wall:.6f} {time.process_time() - c0:.6f}", flush=True)
        return
    n = a.steps_per_chunk or max(1, round(a.chunk_seconds / first))
    per = [js.run(n) / n for _ in range(a.chunks)]
    s = statistics.median(per)
    print(json.dumps({
        "pair": a.pair, "batch_size": a.batch_size, "adapter": a.adapter, "method": a.method,
        "threads": a.threads, "channels_last": a.channels_last, "torch": torch.__version__,
        "step_ms": 1e3 * s, "images_per_s": a.batch_size / s, "chunk_step_ms": [round(1e3 * x, 2) for x in per],
    }))


if __name__ == "__main__":
    main()
