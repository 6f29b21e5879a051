"""tools/infer.py as users run it: a folder of images, a video and one image, detection and
segmentation, our checkpoints and a released layout; bad input ends with one line."""
import json
import os.path as osp
import sys

import cv2
import numpy as np
import pytest
import torch

from mmpoolformer.models.weights import read_checkpoint

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
INFER = osp.join(REPO, 'tools', 'infer.py')


def infer(tiny, *args, expect=0):
    return tiny.run([sys.executable, INFER, *map(str, args)], expect=expect)


def val_images(tiny, count):
    return sorted((tiny.data / 'images' / 'val').iterdir())[:count]


def test_detection_on_a_folder_draws_and_writes_every_image(tiny, det_checkpoint, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for image in val_images(tiny, 3):
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / 'notes.txt').write_text('not an image: skipped')
    out_dir = tmp_path / 'out'
    out = infer(tiny, folder, tiny.config, det_checkpoint, '--out-dir', out_dir, '--batch-size', 2,
                '--pred-score-thr', 0)
    assert f'wrote 6 files to {out_dir}' in out
    for image in val_images(tiny, 3):
        drawn = cv2.imread(str(out_dir / 'vis' / image.name))
        assert drawn.shape == cv2.imread(str(image)).shape
        with open(out_dir / 'preds' / f'{image.stem}.json') as f:
            pred = json.load(f)
        # tiny.py keeps 100 boxes per image (score_thr=0)
        assert len(pred['labels']) == len(pred['scores']) == len(pred['bboxes']) == 100
        assert all(0 <= label < 3 for label in pred['labels'])


def test_detection_on_a_video_writes_a_drawn_video_and_each_frame(tiny, det_checkpoint, tmp_path):
    video = tmp_path / 'clip.mp4'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'mp4v'), 5, (128, 96))
    for image in val_images(tiny, 3):
        writer.write(cv2.imread(str(image)))
    writer.release()
    out_dir = tmp_path / 'out'
    infer(tiny, video, tiny.config, det_checkpoint, '--out-dir', out_dir)
    drawn = cv2.VideoCapture(str(out_dir / 'vis' / 'clip.mp4'))
    frames = []
    while True:
        ok, frame = drawn.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (96, 128, 3)
    assert sorted(p.name for p in (out_dir / 'preds' / 'clip').iterdir()) == [
        '000000.json', '000001.json', '000002.json']


def test_segmentation_writes_label_maps(tiny, seg_checkpoint, tmp_path):
    image = val_images(tiny, 1)[0]
    out_dir = tmp_path / 'out'
    infer(tiny, image, tiny.seg_config, seg_checkpoint, '--out-dir', out_dir, '--device', 'cpu')
    label_map = cv2.imread(str(out_dir / 'preds' / f'{image.stem}.png'), cv2.IMREAD_UNCHANGED)
    assert label_map.shape == (96, 128) and label_map.max() < 4  # the 4 classes of tiny_fpn.py
    assert cv2.imread(str(out_dir / 'vis' / image.name)).shape == (96, 128, 3)


def test_a_released_layout_predicts_as_ours(tiny, det_checkpoint, tmp_path):
    """mmdet 2.x's wrapping (meta with CLASSES, an output norm ours does not build, no message hub),
    as the official COCO checkpoints come: the same predictions as our own file."""
    ours = read_checkpoint(str(det_checkpoint))
    state_dict = dict(ours['state_dict'])
    state_dict['backbone.norm0.weight'] = torch.ones(8)
    state_dict['backbone.norm0.bias'] = torch.zeros(8)
    released = tmp_path / 'released.pth'
    torch.save({'meta': {'mmdet_version': '2.19.0', 'CLASSES': ('circle', 'triangle', 'square')},
                'state_dict': state_dict}, released)
    image = val_images(tiny, 1)[0]
    for name, checkpoint in [('ours', det_checkpoint), ('released', released)]:
        infer(tiny, image, tiny.config, checkpoint, '--out-dir', tmp_path / name, '--no-save-vis')
    preds = [json.loads((tmp_path / name / 'preds' / f'{image.stem}.json').read_text())
             for name in ('ours', 'released')]
    assert preds[0] == preds[1]
    assert not (tmp_path / 'ours' / 'vis').exists()


OTHER_TASK = """
default_scope = 'mmpretrain'
model = dict(type='ImageClassifier')
"""


@pytest.mark.parametrize('case', ['unreadable image', 'config of another task',
                                  'checkpoint of another model', 'missing input', 'no GPU'])
def test_bad_input_fails_with_one_line(case, tiny, det_checkpoint, seg_checkpoint, tmp_path):
    image, config, checkpoint, extra = val_images(tiny, 1)[0], tiny.config, det_checkpoint, []
    if case == 'unreadable image':
        image = tmp_path / 'broken.jpg'
        image.write_bytes(b'not a jpeg' * 10)
        message = f'cannot read image {image}: it is not decodable as an image'
    elif case == 'config of another task':
        config = tmp_path / 'classifier.py'
        config.write_text(OTHER_TASK)
        message = (f"{config} is a config of another task (default_scope 'mmpretrain'); infer.py "
                   'runs detection (mmdet) and segmentation (mmseg) configs')
    elif case == 'checkpoint of another model':
        checkpoint = seg_checkpoint  # a Semantic FPN for the RetinaNet config
        message = 'the checkpoint does not match the model of this config: '
    elif case == 'missing input':
        image = tmp_path / 'nope.jpg'
        message = f'input not found: {image}'
    else:
        if torch.cuda.is_available():
            pytest.skip('this machine has a GPU')
        extra = ['--device', 'cuda']
        message = "device 'cuda': PyTorch sees no CUDA device here; use cpu"
    out = infer(tiny, image, config, checkpoint, '--out-dir', tmp_path, *extra, expect=1)
    assert out.strip().splitlines()[-1].startswith(f'infer.py: error: {message}'), out[-3000:]
    assert 'Traceback' not in out


def test_array_inputs_are_drawn_in_the_colours_of_files(tiny, det_checkpoint):
    """Video frames reach the Inferencer as BGR arrays; drawn, they must look like the file drawn."""
    from mmpoolformer.apis import build_inferencer
    inferencer = build_inferencer(str(tiny.config), str(det_checkpoint), device='cpu')
    image = val_images(tiny, 1)[0]
    from_file = inferencer(str(image), return_vis=True, no_save_vis=True, pred_score_thr=1.1)
    from_array = inferencer(cv2.imread(str(image)), return_vis=True, no_save_vis=True,
                            pred_score_thr=1.1)
    np.testing.assert_array_equal(from_file['visualization'][0], from_array['visualization'][0])
