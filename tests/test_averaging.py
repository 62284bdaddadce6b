"""The Averager seam's helpers: flattening to one CPU fp32 vector and back, groups and shards."""

import torch

from lowcomm.averaging import flatten, shard_bounds, unflatten, weighted_mean


def test_flatten_is_one_cpu_fp32_copy_and_unflatten_restores_shape_dtype_and_device():
    like = [torch.arange(6, dtype=torch.float16).view(2, 3), torch.tensor([1.5, -2.0, 3.0, 0.25], dtype=torch.bfloat16),
            torch.tensor(7.0)]
    vector = flatten(like)
    assert vector.dtype == torch.float32 and vector.device.type == "cpu"
    assert vector.tolist() == [0, 1, 2, 3, 4, 5, 1.5, -2.0, 3.0, 0.25, 7.0]
    like[2].add_(1)  # a copy: the caller may go on changing its tensors
    assert vector[-1] == 7.0
    back = unflatten(vector, like)
    assert [(t.shape, t.dtype, t.device) for t in back] == [(t.shape, t.dtype, t.device) for t in like]
    assert back[0].tolist() == [[0, 1, 2], [3, 4, 5]] and back[2].item() == 7.0
    assert back[2].data_ptr() == vector[-1:].data_ptr()  # same dtype and device: a view, no copy
    assert flatten([]).numel() == 0


def test_weighted_mean_and_shards_by_hand():
    mean = weighted_mean([(1.0, torch.tensor([1.0, 2.0])), (3.0, torch.tensor([5.0, -2.0]))])
    assert mean.tolist() == [4.0, -1.0]  # (1*1 + 3*5)/4, (1*2 - 3*2)/4
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
