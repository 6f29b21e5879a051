"""Inference with our configs: mmdet's ``DetInferencer`` and mmseg's ``MMSegInferencer``, with the
checkpoint checked against the model, over images, folders and videos (``tools/infer.py``).

The stock Inferencers work with our configs as they are (see the README); what this adds is what a
command-line tool needs on top: a checkpoint of another model or of another layout is refused or
converted (:func:`~mmpoolformer.engine.checkpoint.fit_checkpoint`) instead of loaded non-strictly,
inputs are read once and named in every error, video frames are drawn into a video, and outputs are
written as they are made, under the input's own name.
"""
import itertools
import json
import os
import os.path as osp
from typing import List, Optional, Tuple

import mmcv
import mmengine
import numpy as np
import torch

from .engine.checkpoint import fit_checkpoint
from .engine.runner import load_config

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
TASKS = ('mmdet', 'mmseg')  # the default scopes of detection and segmentation configs


def _checked(inferencer_cls):
    """``inferencer_cls`` whose checkpoint must be one of its model (converted from a released layout
    where needed), and which draws array inputs in the colours it draws files in."""

    class Checked(inferencer_cls):

        def _load_weights_to_model(self, model, checkpoint, cfg):
            if checkpoint is not None:
                fit_checkpoint(model, checkpoint, strict=True)
            super()._load_weights_to_model(model, checkpoint, cfg)

        def visualize(self, inputs, preds, **kwargs):
            # the pipeline reads arrays as BGR, as it reads files; the stock visualize draws an array
            # as if it were RGB (and a file after converting it to RGB)
            inputs = [x[..., ::-1].copy() if isinstance(x, np.ndarray) else x for x in inputs]
            return super().visualize(inputs, preds, **kwargs)

    Checked.__name__ = Checked.__qualname__ = f'Checked{inferencer_cls.__name__}'
    return Checked


def build_inferencer(config: str, checkpoint: str, device: Optional[str] = None,
                     cfg_options: Optional[dict] = None):
    """The Inferencer for a detection or segmentation config, with ``checkpoint`` loaded.

    Args:
        config: A config file of ours (or one inheriting ours).
        checkpoint: Path or URL of a checkpoint of the config's model: ours, converted, or in a
            released layout (converted while loading).
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...; None: a GPU if there is one.
        cfg_options: Overrides of the config, as ``--cfg-options`` gives them.
    """
    if device is not None and device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device {device!r}: PyTorch sees no CUDA device here; use cpu')
    cfg = load_config(config, cfg_options)
    scope = cfg.get('default_scope')
    if scope not in TASKS:
        raise ValueError(f'{config} is a config of another task (default_scope {scope!r}); '
                         f'infer.py runs detection (mmdet) and segmentation (mmseg) configs')
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer as Inferencer
    else:
        from mmseg.apis import MMSegInferencer as Inferencer
    return _checked(Inferencer)(model=cfg, weights=checkpoint, device=device, **_quiet(scope))


def _quiet(scope: str) -> dict:
    # DetInferencer shows a progress bar of its own for every call; we call it once per batch
    return dict(show_progress=False) if scope == 'mmdet' else {}


def find_inputs(path: str) -> Tuple[str, List[str]]:
    """``('images', files)`` for an image or a folder of images (sorted, not recursive), or
    ``('video', [path])`` for a video."""
    if osp.isdir(path):
        files = sorted(osp.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and osp.isfile(osp.join(path, f)))
        if not files:
            raise ValueError(f'no images in {path} (looked for {", ".join(IMAGE_EXTENSIONS)})')
        return 'images', files
    if not osp.exists(path):
        raise FileNotFoundError(f'input not found: {path}')
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return 'images', [path]
    if path.lower().endswith(VIDEO_EXTENSIONS):
        return 'video', [path]
    raise ValueError(f'{path} is neither an image ({", ".join(IMAGE_EXTENSIONS)}) nor a video '
                     f'({", ".join(VIDEO_EXTENSIONS)}) nor a folder of images')


class InferenceError(ValueError):
    """Inputs that could not be read; the outputs of the others were written."""


def run_inference(inferencer, inputs: str, out_dir: str, batch_size: int = 1,
                  pred_score_thr: float = 0.3, save_vis: bool = True,
                  save_pred: bool = True) -> List[str]:
    """Run ``inferencer`` on an image, a folder of images or a video, and write under ``out_dir``:

    * ``vis/<image name>``, or ``vis/<video stem>.mp4``: the predictions drawn (boxes and masks above
      ``pred_score_thr``, or the label map over the image);
    * ``preds/<image stem>.json`` (detection: labels, scores, boxes, masks as COCO RLE) or
      ``preds/<image stem>.png`` (segmentation: the label map), for a video
      ``preds/<video stem>/<frame>.json|png``.

    Returns the files written. Images that cannot be read are skipped, and named at the end in an
    :class:`InferenceError` once the others are written.
    """
    kind, files = find_inputs(inputs)
    writer = _Writer(_is_detection(inferencer), out_dir, save_pred)
    if kind == 'video':
        frames = _open_video(files[0])
        names = (osp.join(_stem(files[0]), f'{i:06d}') for i in itertools.count())
        writer.open_video(files[0], frames.fps)
    else:
        frames = map(_read_image, files)
        names = iter(files)
    unreadable = []
    try:
        for batch in _batches(zip(names, frames), batch_size):
            readable = [(name, img) for name, img in batch if img is not None]
            unreadable += [name for name, img in batch if img is None]
            if readable:
                images = [img for _, img in readable]
                writer.write([n for n, _ in readable],
                             _predict(inferencer, images, pred_score_thr, draw=save_vis))
    finally:
        writer.close()
    if unreadable and len(files) == 1:
        raise InferenceError(f'cannot read image {files[0]}: it is not decodable as an image')
    if unreadable:
        raise InferenceError(
            f'cannot read {len(unreadable)} of {len(files)} images (not decodable as images): '
            f'{", ".join(unreadable[:10])}{" ..." if len(unreadable) > 10 else ""}; the other '
            f'{len(files) - len(unreadable)} were written to {out_dir}')
    return writer.written


def _predict(inferencer, images: List[np.ndarray], pred_score_thr: float, draw: bool) -> dict:
    """Predictions and drawings (None each without ``draw``) for a batch of BGR images, as lists
    whatever the batch size."""
    kwargs = dict(return_vis=draw, batch_size=len(images))
    if _is_detection(inferencer):
        kwargs.update(no_save_vis=True, no_save_pred=True, pred_score_thr=pred_score_thr)
    out = inferencer(images, **kwargs)
    preds, vis = out['predictions'], out['visualization']
    if len(images) == 1 and not isinstance(preds, list):  # MMSegInferencer unwraps one image
        preds, vis = [preds], [vis]
    return dict(predictions=preds, visualization=vis if draw else [None] * len(images))


class _Writer:
    """Writes drawn images (or video frames) and raw predictions as they come."""

    def __init__(self, detection: bool, out_dir: str, save_pred: bool):
        self.detection, self.out_dir, self.save_pred = detection, out_dir, save_pred
        self.video = self.video_path = self.fps = None
        self.written = []

    def open_video(self, path: str, fps: float) -> None:
        self.video_path = osp.join(self.out_dir, 'vis', _stem(path) + '.mp4')
        self.fps = fps or 25

    def write(self, names: List[str], result: dict) -> None:
        for name, pred, vis in zip(names, result['predictions'], result['visualization']):
            if self.save_pred:
                self._write_pred(name, pred)
            if vis is not None:
                self._write_vis(name, vis)

    def _write_pred(self, name: str, pred) -> None:
        stem = osp.join(self.out_dir, 'preds', _stem(name) if self.video_path is None else name)
        mmengine.mkdir_or_exist(osp.dirname(stem))
        if self.detection:
            path = stem + '.json'
            with open(path, 'w') as f:
                json.dump(pred, f)
        else:
            path = stem + '.png'
            mmcv.imwrite(np.asarray(pred).astype(np.uint8 if pred.max() < 256 else np.uint16), path)
        self.written.append(path)

    def _write_vis(self, name: str, rgb: np.ndarray) -> None:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if self.video_path is None:
            path = osp.join(self.out_dir, 'vis', osp.basename(name))
            mmcv.imwrite(bgr, path)
            self.written.append(path)
            return
        if self.video is None:
            import cv2
            mmengine.mkdir_or_exist(osp.dirname(self.video_path))
            height, width = bgr.shape[:2]
            self.video = cv2.VideoWriter(self.video_path, cv2.VideoWriter_fourcc(*'mp4v'),
                                         self.fps, (width, height))
            self.written.append(self.video_path)
        self.video.write(bgr)

    def close(self) -> None:
        if self.video is not None:
            self.video.release()


def _is_detection(inferencer) -> bool:
    return inferencer.cfg.get('default_scope') == 'mmdet'


def _read_image(path: str) -> Optional[np.ndarray]:
    """The image as BGR, as the test pipelines read files; None if it cannot be decoded."""
    try:
        return mmcv.imread(path)
    except (OSError, ValueError):
        return None


def _open_video(path: str) -> mmcv.VideoReader:
    try:
        reader = mmcv.VideoReader(path)
    except AssertionError as e:  # mmcv asserts that OpenCV opened it
        raise ValueError(f'cannot read video {path}: OpenCV cannot open it') from e
    if len(reader) == 0:
        raise ValueError(f'cannot read video {path}: it has no frames')
    return reader


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stem(path: str) -> str:
    return osp.splitext(osp.basename(path))[0]


__all__ = ['InferenceError', 'build_inferencer', 'find_inputs', 'run_inference']
