import pytest
import torch

from utils.models import CNN, MLP, cnn_feature_shape


def test_mlp_shapes_and_init():
    m = MLP(784, (100, 50), 10)
    assert m(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    w = m.net[1].weight.detach()  # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert float(w.abs().max()) <= (6 / (784 + 100)) ** 0.5 and float(w.abs().max()) > 0.5 * (6 / 884) ** 0.5


@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_cnn_output_and_feature_shapes(in_shape):
    m = CNN(in_shape, channels=(8, 16), kernel_sizes=(5, 3), stride=1, padding=(2, 1), n_classes=10)
    assert m(torch.rand(3, *in_shape)).shape == (3, 10)
    shapes = cnn_feature_shape(in_shape, (8, 16), (5, 3), 1, (2, 1))
    h = in_shape[1] // 4
    assert shapes[-1] == (16, h, h)


def test_feature_shape_matches_torch_on_strided_blocks():
    shapes = cnn_feature_shape((3, 32, 32), (4, 6), (4, 2), (2, 1), (1, 1))
    assert shapes == [(4, 8, 8), (6, 4, 4)]
    m = CNN((3, 32, 32), (4, 6), (4, 2), (2, 1), (1, 1), 10)
    assert tuple(m.features(torch.zeros(1, 3, 32, 32)).shape[1:]) == shapes[-1]


@pytest.mark.parametrize("args, block", [
    (((1, 28, 28), (8,) * 5, (3,) * 5, 1, 1), "block 5"),        # pooled away to nothing
    (((1, 28, 28), (8,), (10,), 3, 1), "block 1"),               # (28+2-10)=20 not a multiple of stride 3
    (((1, 28, 28), (8, 8), (3, 40), 1, 1), "block 2"),           # kernel larger than the padded input
    (((1, 28, 28), (8, 0), (3, 3), 1, 1), "block 2"),            # zero channels
    (((1, 28, 28), (8, 8), (3,), 1, 1), "kernel_sizes"),         # one kernel size for two blocks
    (((1, 28, 28), (), (), 1, 1), "at least one"),
])
def test_invalid_cnn_raises_naming_block(args, block):
    with pytest.raises(ValueError, match=block):
        cnn_feature_shape(*args)
    with pytest.raises(ValueError, match=block):
        CNN(*args, n_classes=10)


def test_an_int_hidden_size_is_one_layer():
    assert MLP(64, 10, 10).net[1].out_features == 10   # as (10,); scikit-learn's MLP reads an int the same way


@pytest.mark.parametrize("kw, match", [(dict(channels=(2.5,), kernel_sizes=3), "channels=.*2.5 is not a whole"),
                                       (dict(channels=(8,), kernel_sizes=(3.5,)), "kernel_sizes=.*3.5"),
                                       (dict(channels="8", kernel_sizes=3), "channels=.*not a whole"),
                                       (dict(channels=None, kernel_sizes=3), "channels=None")])
def test_cnn_refuses_sizes_that_are_no_whole_numbers(kw, match):
    with pytest.raises(ValueError, match=match):
        CNN((1, 8, 8), **kw)


def test_mlp_refuses_fractional_hidden_sizes():
    with pytest.raises(ValueError, match="hidden_sizes=.*7.5 is not a whole"):
        MLP(64, (7.5,), 10)
