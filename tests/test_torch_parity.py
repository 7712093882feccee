"""Every op, forward and backward, against PyTorch — only where PyTorch happens to be installed
(it is never a dependency)."""
import numpy as np
import pytest

import tinyddpm as td
import tinyddpm.functional as F

torch = pytest.importorskip("torch")
tf = torch.nn.functional

rng = np.random.default_rng(0)


def randn(*shape, offset=0.0):
    return rng.standard_normal(shape) + offset


CASES = {
    # name: (tinyddpm fn, torch fn, inputs)
    "add": (F.add, torch.add, [randn(2, 3, 4), randn(3, 1)]),
    "mul": (F.mul, torch.mul, [randn(2, 3), randn(2, 3)]),
    "div": (F.div, torch.div, [randn(4), np.abs(randn(4)) + 1]),
    "matmul": (F.matmul, torch.matmul, [randn(2, 3, 4), randn(4, 5)]),
    "exp": (F.exp, torch.exp, [randn(3, 4)]),
    "log": (F.log, torch.log, [np.abs(randn(3, 4)) + 0.1]),
    "sqrt": (F.sqrt, torch.sqrt, [np.abs(randn(3, 4)) + 0.1]),
    "relu": (F.relu, tf.relu, [randn(3, 4)]),
    "sigmoid": (F.sigmoid, torch.sigmoid, [randn(3, 4) * 5]),
    "tanh": (F.tanh, torch.tanh, [randn(3, 4)]),
    "silu": (F.silu, tf.silu, [randn(3, 4) * 4]),
    "gelu": (F.gelu, tf.gelu, [randn(3, 4) * 3]),
    "softmax": (lambda a: F.softmax(a, 1), lambda a: torch.softmax(a, 1), [randn(3, 5) * 10]),
    "sum": (lambda a: F.sum(a, (0, 2)), lambda a: a.sum((0, 2)), [randn(2, 3, 4)]),
    "mean": (lambda a: F.mean(a, 1, True), lambda a: a.mean(1, keepdim=True), [randn(2, 3, 4)]),
    "reshape_permute": (lambda a: F.permute(F.reshape(a, (4, 6)), (1, 0)), lambda a: a.reshape(4, 6).permute(1, 0),
                        [randn(2, 3, 4)]),
    "transpose": (lambda a: F.transpose(a, 0, 2), lambda a: a.transpose(0, 2), [randn(2, 3, 4)]),
    "getitem": (lambda a: a[1:, ::2], lambda a: a[1:, ::2], [randn(3, 5)]),
    "concat": (lambda a, b: F.concat([a, b], 1), lambda a, b: torch.cat([a, b], 1), [randn(2, 3), randn(2, 2)]),
    "pad": (lambda a: F.pad(a, (1, 2, 0, 1)), lambda a: tf.pad(a, (1, 2, 0, 1)), [randn(2, 3, 4)]),
    "max_pool2d": (lambda a: F.max_pool2d(a, 2), lambda a: tf.max_pool2d(a, 2), [randn(2, 3, 7, 6)]),
    "avg_pool2d": (lambda a: F.avg_pool2d(a, 2), lambda a: tf.avg_pool2d(a, 2), [randn(2, 3, 6, 5)]),
    "upsample": (lambda a: F.upsample_nearest2d(a, 2), lambda a: tf.interpolate(a, scale_factor=2, mode="nearest"),
                 [randn(2, 3, 3, 4)]),
    "embedding": (lambda t: F.embedding(np.array([1, 0, 1, 3]), t),
                  lambda t: tf.embedding(torch.tensor([1, 0, 1, 3]), t), [randn(4, 3)]),
    "linear": (F.linear, tf.linear, [randn(2, 5, 3), randn(4, 3), randn(4)]),
    "conv2d_s2p1": (lambda x, w, b: F.conv2d(x, w, b, 2, 1), lambda x, w, b: tf.conv2d(x, w, b, 2, 1),
                    [randn(2, 3, 7, 6), randn(4, 3, 3, 3), randn(4)]),
    "conv2d_1x1": (lambda x, w: F.conv2d(x, w), lambda x, w: tf.conv2d(x, w), [randn(2, 3, 5, 5), randn(4, 3, 1, 1)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), lambda x, w, b: tf.group_norm(x, 2, w, b),
                   [randn(2, 4, 3, 5, offset=1e3), randn(4), randn(4)]),
    "group_norm_silu": (lambda x, w, b, e: F.group_norm_silu(x, 2, w, b, e),
                        lambda x, w, b, e: tf.silu(tf.group_norm(x, 2, w, b)) + e[:, :, None, None],
                        [randn(2, 4, 3, 3), randn(4), randn(4), randn(2, 4)]),
    "layer_norm": (F.layer_norm, lambda x, w, b: tf.layer_norm(x, (5,), w, b), [randn(2, 3, 5, offset=10), randn(5),
                                                                                   randn(5)]),
    "attention": (F.scaled_dot_product_attention, tf.scaled_dot_product_attention,
                  [randn(2, 2, 5, 3) * 4, randn(2, 2, 7, 3) * 4, randn(2, 2, 7, 3)]),
    "mse_loss": (F.mse_loss, tf.mse_loss, [randn(3, 4), randn(3, 4)]),
    "cross_entropy": (lambda z: F.cross_entropy(z, np.array([0, 2, 1])),
                      lambda z: tf.cross_entropy(z, torch.tensor([0, 2, 1])), [randn(3, 4) * 5]),
}


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_match_torch(name):
    ours_fn, torch_fn, inputs = CASES[name]
    ours = [td.Tensor(a.copy(), requires_grad=True) for a in inputs]
    theirs = [torch.tensor(a, requires_grad=True) for a in inputs]
    out, ref = ours_fn(*ours), torch_fn(*theirs)
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-7, atol=1e-9)
    upstream = rng.standard_normal(ref.shape)
    out.backward(upstream)
    ref.backward(torch.tensor(upstream))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-6, atol=1e-8, err_msg=f"input {i}")
