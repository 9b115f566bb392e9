"""Image-folder data for ``python -m vil.train``: dataset, transforms and samplers.

Layout: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg`` (one sub-folder per class, the
classes sorted by name, as torchvision's ``ImageFolder``). torchvision's ``ImageFolder`` index and
transforms are used when torchvision imports; otherwise a small PIL-and-torch path with the same
behaviour (random resized crop + flip for training, resize + center crop for evaluation).

Two properties the trainer relies on:

* Every sample's augmentation is drawn from its own seed, ``hash(seed, epoch, index)``, so it does
  not depend on the number of workers, the rank, or where in the epoch a resumed run starts.
* An image that cannot be read is *skipped*: the sample comes back as a blank image with target
  -1 and the file's path; the loss and the metrics ignore targets < 0 and the trainer names the
  file in its log. Batch shapes stay the same, so ranks never fall out of step.
"""

import hashlib
import math
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

try:                                                                   # optional
    import torchvision
    from torchvision import transforms as _T
    HAS_TORCHVISION = True
except Exception:                                                      # pragma: no cover
    torchvision = _T = None
    HAS_TORCHVISION = False

try:
    from PIL import Image
except ImportError:                                                    # pragma: no cover
    Image = None


def _need_pillow():
    if Image is None:
        raise ImportError("vil.train reads images with Pillow: pip install pillow "
                          "(or the project's 'train' extra)")

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "ImageFolder", "build_transform",
           "ShardedSampler", "HAS_TORCHVISION"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _find_samples(root):
    """(samples [(path, class_index)], classes) of an image folder, torchvision's convention."""
    if HAS_TORCHVISION:
        index = torchvision.datasets.ImageFolder(root, loader=lambda p: p)
        return list(index.samples), list(index.classes)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples = []
    for ci, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), ci))
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    return samples, classes


def _sample_seed(seed, epoch, index):
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ImageFolder(Dataset):
    """``DIR/<class>/<image>`` as (image tensor, class index, path of a skipped file or "").

    ``classes`` may be given to pin the class order to the training set's. Index -1 (the
    evaluation sampler's padding) is a blank sample with target -1.
    """

    def __init__(self, root, transform, seed=0, classes=None):
        _need_pillow()
        self.root = root
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.samples, found = _find_samples(root)
        if classes is not None and list(classes) != found:
            missing = sorted(set(found) - set(classes))
            if missing:
                raise ValueError(f"{root} has classes not in the training set: {missing[:5]}")
            remap = {c: i for i, c in enumerate(classes)}
            self.samples = [(p, remap[found[t]]) for p, t in self.samples]
            found = list(classes)
        self.classes = found
        self.class_to_idx = {c: i for i, c in enumerate(found)}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def _blank(self):
        size = getattr(self.transform, "output_size", None)
        return torch.zeros(3, size, size)

    def __getitem__(self, index):
        if index < 0:                                                  # evaluation padding
            return self._blank(), -1, ""
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")                               # forces the decode
        except Exception as e:                                         # corrupt or unreadable
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            return self._blank(), -1, path
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, index))
            x = self.transform(img)
        return x, target, ""


# ----------------------------------------------------------------------------- transforms
class _Compose:
    def __init__(self, fns, output_size):
        self.fns = fns
        self.output_size = output_size

    def __call__(self, img):
        for fn in self.fns:
            img = fn(img)
        return img

    def __repr__(self):
        return "Compose(" + ", ".join(getattr(f, "__name__", type(f).__name__) for f in self.fns) + ")"


def _random_resized_crop_box(width, height, scale, ratio):
    """torchvision's RandomResizedCrop.get_params (same draws from the torch RNG)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_tensor_normalized(img, mean, std):
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    x = x.float().div_(255)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return x.sub_(m).div_(s)


def _resize_shorter(img, size):
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img.resize((nw, nh), Image.BICUBIC)


def _center_crop(img, size):
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def build_transform(train, img_size, augment=True, crop_pct=0.875, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3), hflip=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    use_torchvision=None):
    """Training (``train and augment``): random resized crop to ``img_size`` (bicubic) + flip.
    Otherwise (evaluation, or ``augment=False``): resize the shorter side to
    ``floor(img_size / crop_pct)`` and center-crop ``img_size``. Returns (3, img_size, img_size)
    normalized float tensors. torchvision's transforms when it imports, else PIL + torch."""
    _need_pillow()
    use_tv = HAS_TORCHVISION if use_torchvision is None else use_torchvision
    resize = int(math.floor(img_size / crop_pct))
    if use_tv:
        bicubic = _T.InterpolationMode.BICUBIC
        if train and augment:
            ops = [_T.RandomResizedCrop(img_size, scale=scale, ratio=ratio, interpolation=bicubic)]
            if hflip > 0:
                ops.append(_T.RandomHorizontalFlip(hflip))
        else:
            ops = [_T.Resize(resize, interpolation=bicubic), _T.CenterCrop(img_size)]
        ops += [_T.ToTensor(), _T.Normalize(mean, std)]
        return _Compose(ops, img_size)

    if train and augment:
        def random_resized_crop(img):
            i, j, h, w = _random_resized_crop_box(img.size[0], img.size[1], scale, ratio)
            return img.resize((img_size, img_size), Image.BICUBIC, box=(j, i, j + w, i + h))

        def flip(img):
            if torch.rand(1).item() < hflip:
                return img.transpose(Image.FLIP_LEFT_RIGHT)
            return img

        ops = [random_resized_crop] + ([flip] if hflip > 0 else [])
    else:
        ops = [lambda img: _resize_shorter(img, resize), lambda img: _center_crop(img, img_size)]
    ops.append(lambda img: _to_tensor_normalized(img, mean, std))
    return _Compose(ops, img_size)


# ------------------------------------------------------------------------------- samplers
class ShardedSampler(Sampler):
    """Indices of one rank, as ``DistributedSampler``: a permutation seeded by (seed, epoch)
    (or the identity), padded to a multiple of the world size, then ``[rank::world]``.

    ``pad="wrap"`` repeats the first indices (training); ``pad="blank"`` pads with -1, which
    the dataset answers with an ignored blank sample (evaluation: every rank gets the same number
    of batches, and nothing is counted twice). ``set_start(k)`` skips this rank's first k indices
    (a resumed run continues mid-epoch). With world size 1 and the same seed, a single process
    sees exactly the union of what the ranks of a distributed run see, batch for batch.
    """

    def __init__(self, n, world_size=1, rank=0, shuffle=True, seed=0, pad="wrap"):
        self.n, self.world_size, self.rank = n, world_size, rank
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_start(self, start):
        self.start = start

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > self.n:
            if self.pad == "wrap":
                idx += (idx * math.ceil(total / self.n))[: total - self.n]
            else:
                idx += [-1] * (total - self.n)
        return idx[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return max(self.per_rank - self.start, 0)
