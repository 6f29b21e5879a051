"""A config's wrong key or type for the backbone is named, with what is allowed."""
import pytest

from mmpoolformer import MODELS
from mmpoolformer.models.arguments import ArgumentError, check_arguments

ALLOWED = ('arch, token_mixers, in_channels, norm_cfg, act_cfg, mlp_bias, downsample_norm_cfg, '
           'out_norm_cfg, drop_rate, drop_path_rate, use_layer_scale, pos_embed_sizes, out_indices, '
           'frozen_stages, norm_eval, with_cp, init_cfg')


def build(**kwargs):
    return MODELS.build(dict(type='mmpoolformer.PoolFormer', arch='s12', out_indices=(0, ), **kwargs))


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(ArgumentError) as error:
        build(drop_path=0.1)
    assert str(error.value) == (f"PoolFormer: unknown argument 'drop_path' (did you mean "
                                f"'drop_path_rate'?); allowed: {ALLOWED}")


@pytest.mark.parametrize('key, value, expected', [
    ('frozen_stages', '1', "frozen_stages must be int, got str '1'"),
    ('norm_eval', 'no', "norm_eval must be bool, got str 'no'"),
    ('drop_path_rate', '0.1', "drop_path_rate must be float, got str '0.1'"),
    ('norm_cfg', 'GN', "norm_cfg must be dict, got str 'GN'"),
    ('in_channels', 3.0, 'in_channels must be int, got float 3.0'),
    ('with_cp', None, 'with_cp must be bool, got NoneType None'),
])
def test_wrong_type_is_named_with_the_type_allowed(key, value, expected):
    with pytest.raises(ArgumentError) as error:
        build(**{key: value})
    assert str(error.value) == f'PoolFormer: {expected}'


@pytest.mark.parametrize('kwargs', [
    dict(drop_path_rate=0),  # an int is a float to a config
    dict(out_indices=3),  # a container annotation is left to the constructor, which takes an int
    dict(arch=dict(depths=[1, 1, 1, 1], embed_dims=[8, 8, 8, 8])),
    dict(init_cfg=None, norm_cfg=dict(type='LN2d')),
])
def test_what_the_constructor_accepts_passes(kwargs):
    MODELS.build(dict(type='mmpoolformer.PoolFormer', **kwargs))


def test_a_tools_user_gets_one_line_for_it():
    """ArgumentError is a ValueError, which the tools report in one line, and a TypeError, as Python's
    own complaint about an argument is."""
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, TypeError)


def test_open_ended_constructors_take_any_key_but_check_the_types_they_name():

    @check_arguments
    class Open:

        def __init__(self, size: int = 1, **kwargs):
            self.kwargs = kwargs

    assert Open(anything=1).kwargs == {'anything': 1}
    with pytest.raises(ArgumentError, match="Open: size must be int, got str '2'"):
        Open('2')
