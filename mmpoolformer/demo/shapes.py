"""A small, deterministic dataset of textured shapes, for seeing the whole pipeline work on a CPU.

Each image holds a few filled, textured shapes (circle, triangle, square) of random size, position and
shade of their class's hue, overlapping each other, on a noisy gradient background with thin clutter
lines. It is written twice:

* COCO instance annotations (boxes, polygon masks of the *visible* part of each shape), read by mmdet's
  ``CocoDataset``;
* ADE20K-style label maps (PNG): 0 is "unlabelled" (a thin band around every shape, ignored through
  ``reduce_zero_label``), 1 is background and 2.. are the shape classes, read by mmseg.

The same seed gives byte-identical files. ``shapes.json``, written last, records what was generated,
so a stale or half-written dataset is told apart from a complete one (:func:`is_generated`).
"""
import json
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ('circle', 'triangle', 'square')
SEG_CLASSES = ('background', ) + CLASSES
PALETTE = [(220, 20, 60), (0, 130, 230), (250, 170, 30)]
# Each class is painted in its own band of hues (degrees; circles red, triangles blue, squares
# yellow), with random saturation, brightness and texture. From scratch, telling the shapes apart by
# outline alone takes far longer than a CPU demo has: the hue is a cue a short schedule can learn.
HUE_BANDS = [(-20, 15), (195, 235), (45, 75)]
# Shapes span 2/7 to 1/2 of the image's short side: 32-56 pixels at the default size, the sizes of
# RetinaNet's smallest anchors.
SIZE_RANGE = (2 / 7, 1 / 2)
SEG_PALETTE = [(90, 90, 90)] + PALETTE


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    ramp = c0[None] * (1 - t[:, None]) + c1[None] * t[:, None]
    img = np.broadcast_to(ramp[None] if len(t) == w else ramp[:, None], (h, w, 3)).copy()
    img += rng.normal(0, 12, size=(h, w, 3))
    for _ in range(rng.integers(1, 4)):  # clutter: lines that are no object
        p0, p1 = rng.integers(0, [w, h], size=(2, 2))
        colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
        cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), colour, int(rng.integers(1, 3)))
    return img


def _class_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    hue = rng.uniform(*HUE_BANDS[label]) % 360
    hsv = np.array([[[hue / 2, rng.uniform(140, 255), rng.uniform(110, 255)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(float)


def _shape_mask(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    size = rng.uniform(*SIZE_RANGE) * min(h, w)
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    mask = np.zeros((h, w), np.uint8)
    if CLASSES[label] == 'circle':
        cv2.circle(mask, (int(cx), int(cy)), int(size / 2), 1, -1)
    else:
        n = 3 if CLASSES[label] == 'triangle' else 4
        angle = rng.uniform(0, 2 * np.pi)
        pts = [(cx + size / 2 * np.cos(angle + 2 * np.pi * k / n),
                cy + size / 2 * np.sin(angle + 2 * np.pi * k / n)) for k in range(n)]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _polygons(mask: np.ndarray) -> List[List[float]]:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def render(rng: np.random.Generator, h: int, w: int,
           max_objects: int = 3) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
    """One image, its label map and its instances (visible masks, in front-to-back-resolved order)."""
    img = _background(rng, h, w)
    seg = np.ones((h, w), np.uint8)
    masks, labels = [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(rng, label, h, w)
        # a colour of the class's hues that stands out from the background under the shape
        under = img[mask > 0].mean(axis=0)
        colour = _class_colour(rng, label)
        while np.abs(colour - under).sum() < 150:
            colour = _class_colour(rng, label)
        texture = rng.normal(0, 10, size=(h, w, 1))
        img = np.where(mask[..., None] > 0, colour + texture, img)
        for m in masks:  # the new shape occludes the earlier ones
            m[mask > 0] = 0
        masks.append(mask)
        labels.append(label)
    instances = []
    for mask, label in zip(masks, labels):
        polys = _polygons(mask)
        if mask.sum() < 16 or not polys:  # hidden, or nearly, behind later shapes
            continue
        # COCO's box and area are those of the segmentation, the polygons as pycocotools draws them
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        instances.append(dict(category=label, bbox=[float(v) for v in mask_utils.toBbox(rle)],
                              area=float(mask_utils.area(rle)), segmentation=polys))
        seg[mask > 0] = label + 2
        edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        seg[edge > 0] = 0
    return np.clip(img, 0, 255).astype(np.uint8), seg, instances


# Bump whenever the same arguments would give different files.
VERSION = 2
DEFAULT_SPLITS = {'train': 128, 'val': 64}
DEFAULT_SIZE = (112, 160)


def _record(splits: Dict[str, int], size: Sequence[int], seed: int) -> dict:
    return dict(version=VERSION, splits=dict(splits), size=list(size), seed=seed)


def is_generated(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a complete dataset written by this version of :func:`generate` (with
    any arguments)."""
    try:
        with open(osp.join(out_dir, 'shapes.json')) as f:
            return json.load(f).get('version') == VERSION
    except (OSError, ValueError, AttributeError):
        return False


def generate(out_dir: str, splits: Dict[str, int] = None, size: Sequence[int] = DEFAULT_SIZE,
             seed: int = 0) -> Dict[str, str]:
    """Write ``images/<split>/*.jpg``, ``seg/<split>/*.png`` and ``annotations/instances_<split>.json``
    under ``out_dir``; returns the annotation file of each split.

    Files of an earlier generation in the same place are replaced: mmseg lists the image folders, so a
    leftover image would join the data.
    """
    splits = splits or DEFAULT_SPLITS
    h, w = size
    record = osp.join(out_dir, 'shapes.json')
    if osp.exists(record):
        os.remove(record)
    ann_files = {}
    for split_idx, (split, count) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, split_idx])
        for sub in ('images', 'seg'):
            folder = osp.join(out_dir, sub, split)
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):
                if name.startswith(f'{split}_'):
                    os.remove(osp.join(folder, name))
        images, annotations = [], []
        for i in range(count):
            img, seg, instances = render(rng, h, w)
            name = f'{split}_{i:05d}'
            cv2.imwrite(osp.join(out_dir, 'images', split, name + '.jpg'), img,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(osp.join(out_dir, 'seg', split, name + '.png'), seg)
            images.append(dict(id=i + 1, file_name=name + '.jpg', height=h, width=w))
            for inst in instances:
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i + 1, category_id=inst['category'] + 1,
                    bbox=inst['bbox'], area=inst['area'], segmentation=inst['segmentation'],
                    iscrowd=0))
        coco = dict(images=images, annotations=annotations,
                    categories=[dict(id=k + 1, name=c) for k, c in enumerate(CLASSES)])
        ann_files[split] = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        os.makedirs(osp.dirname(ann_files[split]), exist_ok=True)
        with open(ann_files[split], 'w') as f:
            json.dump(coco, f)
    with open(record, 'w') as f:
        json.dump(_record(splits, size, seed), f)
    return ann_files
