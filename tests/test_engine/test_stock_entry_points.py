"""The stock OpenMMLab entry points with our configs and checkpoints, in processes that import nothing of
ours but what the configs' ``custom_imports`` import: mmdet's and mmseg's own test.py, DetInferencer
and init_detector, MMSegInferencer and init_model read checkpoints that mmengine wrote (HistoryBuffer,
numpy) on PyTorch >= 2.6, and refuse a checkpoint whose pickle would run code without running it.
(mmdet's own train.py --resume is in test_resume.py, against an uninterrupted run.)"""
import os.path as osp
import sys
import textwrap

import mmdet
import mmseg

MMDET_TOOLS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools')
MMSEG_TOOLS = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools')


def test_mmdet_stock_test_evaluates_our_checkpoint(tiny, det_checkpoint, tmp_path):
    out = tiny.run([sys.executable, osp.join(MMDET_TOOLS, 'test.py'), str(tiny.config),
                    str(det_checkpoint), '--work-dir', str(tmp_path)])
    assert f'Load checkpoint from {det_checkpoint}' in out
    assert 'coco/bbox_mAP: ' in out


def test_mmseg_stock_test_evaluates_our_checkpoint(tiny, seg_checkpoint, tmp_path):
    out = tiny.run([sys.executable, osp.join(MMSEG_TOOLS, 'test.py'), str(tiny.seg_config),
                    str(seg_checkpoint), '--work-dir', str(tmp_path)])
    assert f'Load checkpoint from {seg_checkpoint}' in out
    assert 'mIoU: ' in out


def test_mmdet_stock_test_refuses_a_code_running_pickle(tiny, malicious_checkpoint, tmp_path):
    path, marker = malicious_checkpoint
    out = tiny.run([sys.executable, osp.join(MMDET_TOOLS, 'test.py'), str(tiny.config), str(path),
                    '--work-dir', str(tmp_path / 'work')], expect=1)
    assert f'CheckpointError: refusing to load {path}: it holds Python objects' in out
    assert not marker.exists()


# Run as a user's script: it imports mmdet / mmseg only; the config imports mmpoolformer.
DET_SCRIPT = """
import sys
from mmdet.apis import DetInferencer, inference_detector, init_detector
config, checkpoint, image, evil, out_dir = sys.argv[1:]
assert 'mmpoolformer' not in sys.modules
result = DetInferencer(model=config, weights=checkpoint, device='cpu')(
    image, out_dir=out_dir, pred_score_thr=0.0, no_save_pred=False)
print('DetInferencer boxes:', len(result['predictions'][0]['bboxes']))
model = init_detector(config, checkpoint, device='cpu')
print('init_detector boxes:', len(inference_detector(model, image).pred_instances))
try:
    DetInferencer(model=config, weights=evil, device='cpu')
except Exception as e:
    print('refused:', type(e).__name__, e)
"""

SEG_SCRIPT = """
import sys
from mmseg.apis import MMSegInferencer, inference_model, init_model
config, checkpoint, image, out_dir = sys.argv[1:]
assert 'mmpoolformer' not in sys.modules
result = MMSegInferencer(model=config, weights=checkpoint, device='cpu')(image, out_dir=out_dir)
print('MMSegInferencer label map:', result['predictions'].shape)
model = init_model(config, checkpoint, device='cpu')
print('init_model label map:', tuple(inference_model(model, image).pred_sem_seg.data.shape))
"""


def test_det_inferencer_and_init_detector_read_our_checkpoint_and_refuse_code(
        tiny, det_checkpoint, malicious_checkpoint, tmp_path):
    evil, marker = malicious_checkpoint
    image = tiny.data / 'images' / 'val' / 'val_00000.jpg'
    script = tmp_path / 'det.py'
    script.write_text(DET_SCRIPT)
    out = tiny.run([sys.executable, str(script), str(tiny.config), str(det_checkpoint), str(image),
                    str(evil), str(tmp_path / 'out')])
    # score_thr=0 in tiny.py and pred_score_thr=0: the untrained model's top 100 boxes
    assert 'DetInferencer boxes: 100' in out and 'init_detector boxes: 100' in out
    assert (tmp_path / 'out' / 'vis' / 'val_00000.jpg').is_file()
    assert (tmp_path / 'out' / 'preds' / 'val_00000.json').is_file()
    assert f'refused: CheckpointError refusing to load {evil}: it holds Python objects' in out
    assert not marker.exists()


def test_mmseg_inferencer_and_init_model_read_our_checkpoint(tiny, seg_checkpoint, tmp_path):
    image = tiny.data / 'images' / 'val' / 'val_00000.jpg'
    script = tmp_path / 'seg.py'
    script.write_text(SEG_SCRIPT)
    out = tiny.run([sys.executable, str(script), str(tiny.seg_config), str(seg_checkpoint),
                    str(image), str(tmp_path / 'out')])
    assert 'MMSegInferencer label map: (96, 128)' in out
    assert 'init_model label map: (1, 96, 128)' in out
    assert (tmp_path / 'out' / 'vis' / 'val_00000.jpg').is_file()


def test_mmengine_load_checkpoint_in_a_plain_process(det_checkpoint, malicious_checkpoint, tiny):
    """Every scheme mmengine reads through is wrapped once mmpoolformer is imported, and the wrapped
    loaders keep mmengine's names (which mmengine logs as the backend's)."""
    evil, marker = malicious_checkpoint
    out = tiny.run([sys.executable, '-c', textwrap.dedent(f"""
        import mmpoolformer
        from mmengine.runner import CheckpointLoader, load_checkpoint
        from torch import nn
        assert all(getattr(f, 'weights_only', False) for f in CheckpointLoader._schemes.values())
        print(sorted(f.__name__ for f in CheckpointLoader._schemes.values()))
        ckpt = CheckpointLoader.load_checkpoint({str(det_checkpoint)!r})
        print('message hub:', type(ckpt['message_hub']['log_scalars']['train/loss']).__name__)
        try:
            load_checkpoint(nn.Linear(1, 1), {str(evil)!r})
        except Exception as e:
            print('refused:', type(e).__name__)
    """)])
    assert "'load_from_http', 'load_from_local', 'load_from_mmcls'" in out
    assert 'message hub: HistoryBuffer' in out and 'refused: CheckpointError' in out
    assert not marker.exists()


def test_weights_only_cannot_be_turned_off_from_the_environment(tiny, malicious_checkpoint):
    evil, marker = malicious_checkpoint
    env = tiny.env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
    out = tiny.run([sys.executable, '-c', textwrap.dedent(f"""
        import mmpoolformer
        from mmengine.runner import CheckpointLoader
        CheckpointLoader.load_checkpoint({str(evil)!r})
    """)], env=env, expect=1)
    assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set' in out
    assert not marker.exists()

