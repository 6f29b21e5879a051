"""Bad input gives an error that names the file, and loses no training: missing and corrupt images,
missing and corrupt annotation files, boxes outside their image and images without boxes, and a
checkpoint of another model (see tiny_project.py)."""
import json
import os.path as osp
import shutil
import sys

import pytest
import torch
from tiny_project import assert_same_training_state

from mmpoolformer.engine import DataError, build_runner, load_config, run
from mmpoolformer.engine import checkpoint as checkpoint_module
from mmpoolformer.engine.checkpoint import CheckpointLayoutHook
from mmpoolformer.models.weights import CheckpointError, read_checkpoint


REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def sampler_order(n=8, seed=0):
    """The order in which the first epoch's shuffling sampler (mmengine's DefaultSampler) draws the n
    training images: each batch of 2 is the next two (all the images have one aspect ratio); with two
    processes, each draws every other image of it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def data(tiny, tmp_path):
    """A copy of the tiny project's data to break."""
    return shutil.copytree(tiny.data, tmp_path / 'shapes')


def train_image(data, index):
    return data / 'images' / 'train' / f'train_{index:05d}.jpg'


def runner_for(tiny, tmp_path, **options):
    """A runner in this process, for the errors that come before or without training."""
    cfg = load_config(str(tiny.config), options, str(tmp_path / 'work'))
    cfg.experiment_name = f'bad_input_{tmp_path.name}'
    return build_runner(cfg)


def test_corrupt_image_in_a_multi_process_run_stops_every_process_after_saving(
        tiny, data, dist_uninterrupted, tmp_path):
    """Process 1's second batch holds a corrupt image: it names the file, process 0 stops too (no
    hang), both save the iteration done together; after the fix --resume ends as the uninterrupted
    run."""
    order = sampler_order()
    bad = train_image(data, order[1::2][2])  # process 1 draws every other image: its 2nd batch
    good = bad.read_bytes()
    bad.write_bytes(good[:100])
    config = tmp_path / 'bad_data.py'
    config.write_text(f"_base_ = '{tiny.config}'\n"
                      f"train_dataloader = dict(dataset=dict(data_root='{data}/'))\n")
    work_dir, env = tmp_path / 'work', tiny.dist_env()
    cmd = tiny.dist_train_cmd(work_dir, config=config)

    out = tiny.run(cmd, env=env, expect=1, timeout=240)
    saved = work_dir / 'iter_1.pth'
    done = (f'; the 1 iterations done are saved in {saved}: fix the data and continue with '
            f'--resume')
    # (two processes print to one pipe: a line of one may be cut by the other's)
    assert (f'train.py: error: loading the data failed: AssertionError: failed to load image: {bad}'
            f'{done}') in out, out[-5000:]
    assert (f'train.py: error: stopped with process 1, which could not load its training batch (its '
            f'error names the file){done}') in out, out[-5000:]
    checkpoint = read_checkpoint(str(saved))
    assert checkpoint['meta']['iter'] == 1 and len(checkpoint['random_state']) == 2

    bad.write_bytes(good)
    out = tiny.run(cmd + ['--resume'], env=env)
    assert 'resumed epoch: 0, iter: 1' in out and 'skipping the 1 batches trained on' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', dist_uninterrupted)


def test_missing_image_in_a_worker_names_the_file_in_one_line(tiny, data, tmp_path):
    missing = train_image(data, sampler_order()[0])
    missing.unlink()
    runner = runner_for(tiny, tmp_path, **{
        'train_dataloader.dataset.data_root': f'{data}/', 'train_dataloader.num_workers': 2})
    with pytest.raises(DataError) as error:
        run(runner)
    # the worker's traceback is left out; nothing was trained, so nothing is saved
    assert str(error.value) == (f'loading the data failed: FileNotFoundError: [Errno 2] No such file '
                                f'or directory: \'{missing}\'')


def test_missing_annotation_file_is_named(tiny, tmp_path):
    runner = runner_for(tiny, tmp_path, **{'train_dataloader.dataset.ann_file': 'annotations/nope.json'})
    with pytest.raises(FileNotFoundError, match=f'{tiny.data}/annotations/nope.json'):
        run(runner)


def test_corrupt_annotation_file_is_named(tiny, data, tmp_path):
    annotations = data / 'annotations' / 'instances_train.json'
    annotations.write_text(annotations.read_text()[:200])
    runner = runner_for(tiny, tmp_path, **{'train_dataloader.dataset.data_root': f'{data}/'})
    with pytest.raises(DataError, match=rf'^cannot read annotation file {annotations} \(Unterminated'):
        run(runner)


def test_boxes_outside_the_image_and_images_without_boxes_are_handled_as_mmdet_does(
        tiny, data, tmp_path):
    """mmdet's CocoDataset drops a box that does not overlap its image or is thinner than a pixel,
    keeps a box partly outside (the pipeline clips it), and, with filter_empty_gt, leaves images
    without boxes out of training."""
    path = data / 'annotations' / 'instances_train.json'
    coco = json.loads(path.read_text())
    first = {}
    for ann in coco['annotations']:
        first.setdefault(ann['image_id'], ann)
    first[1]['bbox'] = [130.0, 10.0, 20.0, 20.0]  # right of the 128-wide image
    first[2]['bbox'] = [110.0, 10.0, 40.0, 20.0]  # partly outside
    first[3]['bbox'] = [10.0, 10.0, 0.5, 20.0]  # thinner than a pixel
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] != 4]  # no boxes at all
    path.write_text(json.dumps(coco))
    boxes = {i: sum(a['image_id'] == i for a in coco['annotations']) for i in (1, 2, 3)}

    runner = runner_for(tiny, tmp_path, **{'train_dataloader.dataset.data_root': f'{data}/',
                                           'train_cfg.max_epochs': 1})
    dataset = runner.train_dataloader.dataset
    kept = {info['img_id']: info['instances'] for info in
            (dataset.get_data_info(i) for i in range(len(dataset)))}
    assert 4 not in kept and len(kept) == 7
    assert len(kept[1]) == boxes[1] - 1 and len(kept[3]) == boxes[3] - 1
    assert len(kept[2]) == boxes[2] and [110.0, 10.0, 150.0, 30.0] in [
        inst['bbox'] for inst in kept[2]]
    run(runner)  # and it trains on them
    assert runner.iter == 4  # 7 images, batches of 2, the last one short


def checkpoint_of_another_model(runner):
    """The runner's model's state dict, but for one class instead of three, with an output norm of
    another width, a tensor missing and one the model does not have."""
    state_dict = dict(runner.model.state_dict())
    state_dict['backbone.norm6.weight'] = torch.zeros(48)
    state_dict['bbox_head.retina_cls.weight'] = torch.zeros(9, 16, 3, 3)
    del state_dict['neck.fpn_convs.0.conv.weight']
    state_dict['neck.extra.weight'] = torch.zeros(1)
    return dict(state_dict=state_dict)


MISMATCH = (
    'the checkpoint does not match the model of this config: 2 tensors of other shapes: '
    'backbone.norm6.weight: checkpoint (48,), model (64,), bbox_head.retina_cls.weight: '
    'checkpoint (9, 16, 3, 3), model (27, 16, 3, 3); 1 model tensors missing in the checkpoint: '
    'neck.fpn_convs.0.conv.weight; 1 checkpoint tensors the model does not have: neck.extra.weight')


def test_checkpoint_of_another_model_lists_what_does_not_fit(tiny, tmp_path):
    runner = runner_for(tiny, tmp_path)
    with pytest.raises(CheckpointError) as error:
        CheckpointLayoutHook(strict=True).after_load_checkpoint(
            runner, checkpoint_of_another_model(runner))
    assert str(error.value) == MISMATCH


def test_checkpoint_that_does_not_fit_is_only_listed_when_fine_tuning(tiny, tmp_path, monkeypatch):
    runner = runner_for(tiny, tmp_path)
    logged = []
    monkeypatch.setattr(checkpoint_module, 'print_log', lambda msg, **kwargs: logged.append(msg))
    CheckpointLayoutHook(strict=False).after_load_checkpoint(runner, checkpoint_of_another_model(runner))
    assert logged == [MISMATCH]


def test_tools_test_refuses_a_checkpoint_of_another_model(tiny, tmp_path):
    ckpt = tmp_path / 'other.pth'
    torch.save(checkpoint_of_another_model(runner_for(tiny, tmp_path)), ckpt)
    out = tiny.run([sys.executable, osp.join(REPO, 'tools/test.py'), str(tiny.config), str(ckpt),
                    '--work-dir', str(tmp_path / 'test')], expect=1)
    assert out.strip().splitlines()[-1] == f'test.py: error: {MISMATCH}'
