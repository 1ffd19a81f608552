"""Train validation checkpoints for the zoo: CIFAR ResNet-20, CIFAR VGG11 and the small CIFAR ViT.

    python scripts/train_zoo.py train DATA OUT.pt --arch resnet20 --classes a,b,c --seed N [--epochs E]
    python scripts/train_zoo.py pack DATA/train BLOB      # JPEG folder -> BLOB.bin + BLOB.json (one file)
    python scripts/train_zoo.py test DATA/test OUT.pt    # test accuracy on its classes, into the sidecar

DATA is a folder of ``<class>/*.jpg`` or a packed BLOB (``BLOB.bin`` beside ``BLOB.json``), which is
how the images travel to a GPU machine. The ResNet-20 recipe is the zoo's
(``../shared/zoo/train_cifar_resnet20.py``: SGD with Nesterov momentum, one-cycle learning rate,
weight decay 5e-4, random 4-pixel-padded crops and flips, batch 128); VGG11 takes the same recipe
with a lower peak rate (it has no BatchNorm); the ViT takes AdamW. Augmentation runs on the
training device. Training resumes from ``OUT.partial.pt`` (saved after every epoch), so a niced
background run survives being stopped. The sidecar ``OUT.json`` records the recipe and classes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zipcli.models import cifar_resnet20, cifar_vgg11, cifar_vit

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
BUILDERS = {"resnet20": cifar_resnet20, "cifar_vgg11": cifar_vgg11, "cifar_vit": cifar_vit}
RECIPES = {  # optimiser, peak learning rate, weight decay, batch, default epochs
    "resnet20": ("sgd", 0.1, 5e-4, 128, 25),
    "cifar_vgg11": ("sgd", 0.05, 5e-4, 128, 30),
    "cifar_vit": ("adamw", 1e-3, 0.05, 256, 100),
}


def pack(folder: Path, blob: Path) -> None:
    """Every JPEG of ``folder/<class>/`` concatenated into one file, with an index beside it."""
    index, offset = [], 0
    with open(blob.with_suffix(".bin"), "wb") as out:
        for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            for f in sorted((folder / cls).iterdir()):
                data = f.read_bytes()
                out.write(data)
                index.append([cls, offset, len(data)])
                offset += len(data)
    blob.with_suffix(".json").write_text(json.dumps(index))


def load(data: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and labels (index into ``classes``), from a folder or a packed blob."""
    label = {c: i for i, c in enumerate(classes)}
    if data.with_suffix(".json").is_file() and not data.is_dir():
        raw = data.with_suffix(".bin").read_bytes()
        items = [(label[c], raw[o:o + n]) for c, o, n in json.loads(data.with_suffix(".json").read_text()) if c in label]
    else:
        items = [(label[c], f.read_bytes()) for c in classes for f in sorted((data / c).iterdir())]
    xs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in items]
    x = torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).copy())
    return x, torch.tensor([y for y, _ in items])


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32-px crops of the 4-pixel zero-padded images and horizontal flips, all on x's device."""
    n, dev = x.shape[0], x.device
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=gen).to(dev)
    j = torch.randint(0, 9, (n,), generator=gen).to(dev)
    ar = torch.arange(32, device=dev)
    rows = (i[:, None] + ar)[:, None, :, None]
    cols = (j[:, None] + ar)[:, None, None, :]
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                  rows, cols]


def accuracy(model, x, y, device) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(normalize(x[k:k + 500].to(device))).argmax(1).cpu() == y[k:k + 500]).sum().item()
                   for k in range(0, len(x), 500))
    return hits / len(x)


def train(a) -> None:
    out = Path(a.out)
    kind, lr, wd, batch, epochs = RECIPES[a.arch]
    lr, epochs = a.lr or lr, a.epochs or epochs
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    classes = a.classes.split(",")
    x, y = load(Path(a.data), classes)
    x, y = x.to(device), y.to(device)
    model = BUILDERS[a.arch](num_classes=len(classes)).to(device)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(a.seed)
    partial, start, seconds, loss_log = out.with_suffix(".partial.pt"), 0, 0.0, []
    if partial.is_file():
        state = torch.load(partial, weights_only=True, map_location=device)
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start, seconds, loss_log = state["epoch"], state["seconds"], state["loss"]
        print(f"{out.name}: resuming after epoch {start}", flush=True)
    for ep in range(start, epochs):
        t0, total = time.time(), 0.0
        model.train()
        perm = torch.randperm(len(x), generator=gen).to(device)
        for k in range(0, len(x), batch):
            idx = perm[k:k + batch]
            loss = F.cross_entropy(model(normalize(augment(x[idx], gen))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        seconds += time.time() - t0
        loss_log.append(round(float(total) / len(x), 4))
        print(f"{out.name}: epoch {ep + 1}/{epochs} loss {loss_log[-1]:.4f} {seconds:.0f}s", flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "epoch": ep + 1, "seconds": seconds, "loss": loss_log},
                   partial.with_suffix(".tmp"))
        os.replace(partial.with_suffix(".tmp"), partial)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out)
    meta = {"arch": a.arch, "classes": classes, "seed": a.seed, "epochs": epochs, "optimizer": kind, "lr": lr,
            "weight_decay": wd, "batch": batch, "train_loss": loss_log, "device": str(device),
            "train_seconds": round(seconds), "mean": MEAN, "std": STD, "input_size": 32}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    partial.unlink()


def test(a) -> None:
    """Test accuracy of a trained checkpoint on its own classes, written into its sidecar."""
    out = Path(a.out)
    meta = json.loads(out.with_suffix(".json").read_text())
    x, y = load(Path(a.data), meta["classes"])
    model = BUILDERS[meta["arch"]](num_classes=len(meta["classes"]))
    model.load_state_dict(torch.load(out, weights_only=True))
    meta["test_acc"] = round(accuracy(model, x, y, torch.device("cpu")), 4)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{out.name}: test accuracy {meta['test_acc']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("data")
    t.add_argument("out")
    t.add_argument("--arch", choices=sorted(BUILDERS), default="resnet20")
    t.add_argument("--classes", required=True)
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--device")
    t.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("pack")
    k.add_argument("folder")
    k.add_argument("blob")
    e = sub.add_parser("test")
    e.add_argument("data")
    e.add_argument("out")
    a = p.parse_args()
    if a.command == "pack":
        pack(Path(a.folder), Path(a.blob))
    elif a.command == "train":
        train(a)
    else:
        test(a)


if __name__ == "__main__":
    main()
