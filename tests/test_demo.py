"""The bundled shapes data and the demo path (tools/demo.py) on it."""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mmpoolformer.demo import CLASSES, generate, is_generated
from mmpoolformer.demo.shapes import HUE_BANDS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def digest(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            with open(osp.join(d, f), 'rb') as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    splits = {'train': 3, 'val': 2}
    generate(str(tmp_path / 'a'), splits, seed=7)
    generate(str(tmp_path / 'b'), splits, seed=7)
    generate(str(tmp_path / 'c'), splits, seed=8)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b') != digest(tmp_path / 'c')


def test_a_stale_or_half_written_dataset_is_told_apart_and_replaced(tmp_path):
    generate(str(tmp_path), {'train': 3, 'val': 2})
    assert is_generated(str(tmp_path))
    (tmp_path / 'shapes.json').write_text('{"version": 1}')  # an older generator's
    assert not is_generated(str(tmp_path))
    (tmp_path / 'shapes.json').unlink()  # interrupted before the end
    assert not is_generated(str(tmp_path))
    # mmseg lists the image folders: a smaller generation leaves no image of the bigger one behind
    generate(str(tmp_path), {'train': 2, 'val': 1})
    assert is_generated(str(tmp_path))
    assert sorted(os.listdir(tmp_path / 'images' / 'train')) == ['train_00000.jpg', 'train_00001.jpg']
    assert sorted(os.listdir(tmp_path / 'seg' / 'val')) == ['val_00000.png']


def test_demo_leaves_a_folder_of_other_data_alone(tmp_path):
    mine = tmp_path / 'images' / 'train' / 'train_0001.jpg'
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b'not the shapes data')
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'demo.py'), '--data', str(tmp_path),
                           '--work-dir', str(tmp_path / 'work')],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f'[demo] {tmp_path} is not empty and holds no shapes data: pass --data a new or empty folder, '
        'or the shapes data to regenerate')
    assert mine.read_bytes() == b'not the shapes data'


def test_annotations_are_valid_coco_and_match_the_label_maps(tmp_path):
    ann_files = generate(str(tmp_path), {'train': 12, 'val': 4})
    coco = COCO(ann_files['train'])
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) >= 12
    for img in coco.loadImgs(coco.getImgIds()):
        hue = cv2.cvtColor(cv2.imread(str(tmp_path / 'images' / 'train' / img['file_name'])),
                           cv2.COLOR_BGR2HSV_FULL)[..., 0].astype(float) * 360 / 256
        seg = cv2.imread(str(tmp_path / 'seg' / 'train' / img['file_name'].replace('.jpg', '.png')),
                         cv2.IMREAD_UNCHANGED)
        assert seg.shape == (img['height'], img['width'])
        assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img['id'])):
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann['bbox']
            # the box encloses the polygon mask, tightly
            assert xs.min() >= x - 1 and ys.min() >= y - 1
            assert xs.max() <= x + w and ys.max() <= y + h
            assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
            assert mask_utils.area(mask_utils.encode(np.asfortranarray(mask))) == ann['area']
            # the label map holds this instance's class inside its mask (away from the edges)
            inner = cv2.erode(mask, np.ones((3, 3), np.uint8))
            if inner.any():
                values, counts = np.unique(seg[inner > 0], return_counts=True)
                assert values[counts.argmax()] == ann['category_id'] + 1
                # painted in its class's hues (the median is robust to texture and JPEG noise)
                low, high = HUE_BANDS[ann['category_id'] - 1]
                from_centre = (hue[inner > 0] - (low + high) / 2 + 180) % 360 - 180
                assert abs(np.median(from_centre)) <= (high - low) / 2 + 8


def test_demo_path_trains_and_reports(tmp_path):
    data = tmp_path / 'shapes'
    generate(str(data), {'train': 8, 'val': 4}, size=(96, 128))
    work = tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'demo.py'), '--work-dir', str(work), '--data',
         str(data), '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
         'default_hooks.checkpoint.interval=1'],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(work / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['task'] == 'retinanet'
    for stage in ('untrained', 'trained'):
        assert 0.0 <= metrics[stage]['coco/bbox_mAP_50'] <= 1.0
    assert 'coco/bbox_mAP_50' in proc.stdout and 'untrained  trained' in proc.stdout
    assert (work / 'loss.png').stat().st_size > 10_000
    drawn = [f for _, _, files in os.walk(work / 'vis') for f in files if f.endswith('.jpg')]
    assert len(drawn) == 4
