"""The built-in tasks: seeded models, deterministic batches and evaluation, iid and noniid
shards, held-out data kept out of training, and a few steps that lower the held-out loss."""

import math

import pytest
import torch

from lowcomm.tasks import BUILTIN, SHARDS, TaskError, check_shards, load_task
from lowcomm.tasks.codeclass import FEATURES, dataset
from lowcomm.tasks.terrain import EVAL_PIXELS, terrain_data
from lowcomm.tasks.tinylm import corpus

# (inputs shape, inputs dtype, targets shape, targets dtype) of one batch at the default size
SHAPES = {
    "tinylm": ((16, 64), torch.int64, (16, 64), torch.int64),
    "codeclass": ((32, FEATURES), torch.float32, (32,), torch.int64),
    "terrain": ((64, 2), torch.float32, (64,), torch.float32),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The simulator's setting (one thread per worker); also keeps the file fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def take(task, rank, workers, n, seed=0):
    data = task.batches(rank, workers, seed)
    return [next(data) for _ in range(n)]


def pixel(xy: torch.Tensor) -> torch.Tensor:
    """Pixel indices of terrain positions (the inverse of the normalisation to [-1, 1])."""
    width = terrain_data().width
    height = len(terrain_data().xy) // width
    col = ((xy[:, 0] + 1) / 2 * (width - 1)).round().long()
    row = ((xy[:, 1] + 1) / 2 * (height - 1)).round().long()
    return row * width + col


def test_builtin_names_and_shards():
    assert set(BUILTIN) == set(SHAPES)
    assert SHARDS == ("iid", "noniid")
    assert check_shards("noniid") == "noniid"
    with pytest.raises(TaskError, match="iid, noniid"):
        check_shards("IID")


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_same_seed_same_weights(name):
    task = load_task(name)
    a, b, c = task.make_model(3), task.make_model(3), task.make_model(4)
    for (pa, ta), (pb, tb), (_, tc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert pa == pb and torch.equal(ta, tb)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_batches_are_deterministic_and_shaped(name):
    task = load_task(name)
    first, again = take(task, 1, 4, 3), take(task, 1, 4, 3)
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = first[0]
    x_shape, x_dtype, y_shape, y_dtype = SHAPES[name]
    assert (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype) == (x_shape, x_dtype, y_shape, y_dtype)
    assert task.tokens_per_batch == math.prod(y_shape)
    assert not torch.equal(first[0][0], first[1][0])  # the stream moves on
    assert not torch.equal(take(task, 1, 4, 1, seed=1)[0][0], x)  # and depends on the seed


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_evaluate_is_deterministic(name):
    task = load_task(name)
    model = task.make_model(0)
    a, b = task.evaluate(model), task.evaluate(model)
    assert a == b and math.isfinite(a) and a > 0


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_bad_shards_are_refused(name):
    with pytest.raises(TaskError, match="shards='bogus': use one of iid, noniid"):
        load_task(name, shards="bogus")


def test_an_option_a_task_does_not_take_is_a_task_error():
    with pytest.raises(TaskError, match="'terrain' does not take"):
        load_task("terrain", data="/tmp")


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_iid_workers_differ(name):
    task = load_task(name, shards="iid")
    firsts = [take(task, rank, 4, 1)[0][0] for rank in range(4)]
    for i in range(4):
        for j in range(i):
            assert not torch.equal(firsts[i], firsts[j])


def test_codeclass_shards():
    classes = len(dataset().packages)
    assert classes == 10
    iid = {int(c) for _, y in take(load_task("codeclass", shards="iid"), 0, 4, 40) for c in y}
    noniid = {int(c) for _, y in take(load_task("codeclass", shards="noniid"), 0, 4, 40) for c in y}
    assert iid == set(range(classes))  # every worker samples the whole training set
    assert noniid < set(range(classes)) and len(noniid) <= 3  # label skew: the first packages only
    last = {int(c) for _, y in take(load_task("codeclass", shards="noniid"), 3, 4, 40) for c in y}
    assert max(noniid) <= min(last)  # later workers get later labels


def test_terrain_shards():
    iid = torch.cat([x for x, _ in take(load_task("terrain", shards="iid"), 0, 4, 20)])
    noniid = torch.cat([x for x, _ in take(load_task("terrain", shards="noniid"), 0, 4, 20)])
    assert iid[:, 0].min() < -0.9 and iid[:, 0].max() > 0.9
    assert noniid[:, 0].min() < -0.9 and noniid[:, 0].max() < -0.5  # columns 0..99 of 403: x <= -0.507
    assert iid[:, 1].min() < -0.9 and iid[:, 1].max() > 0.9 and noniid[:, 1].max() > 0.9  # strips run top to bottom


def test_tinylm_shards():
    train = bytes(corpus(None)[0].numpy())
    quarter = len(train) // 4

    def starts(shards):
        x, _ = take(load_task("tinylm", shards=shards), 0, 4, 4)[-1]
        return [train.find(bytes(w.to(torch.uint8).tolist())) for w in x]  # first occurrence of each window

    noniid, iid = starts("noniid"), starts("iid")
    assert all(0 <= s < quarter for s in noniid)
    assert all(s >= 0 for s in iid) and sum(s >= quarter for s in iid) >= 8  # of 16 windows


def test_codeclass_held_out_files_are_never_trained_on():
    data = dataset()
    train_files = set(data.files[~data.held_out].tolist())
    held_out_files = set(data.files[data.held_out].tolist())
    assert train_files and held_out_files and not train_files & held_out_files
    assert 0.1 < data.held_out.float().mean() < 0.2
    assert set(data.labels[data.held_out].tolist()) == set(range(len(data.packages)))  # every package is evaluated
    # every batch row is a training row: match rows by a random projection
    v = torch.randn(FEATURES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    train_keys = data.features[~data.held_out].double() @ v
    for x, y in take(load_task("codeclass", shards="iid"), 2, 4, 5):
        gap = ((x.double() @ v).unsqueeze(1) - train_keys).abs().min(dim=1).values
        assert gap.max() < 1e-6


def test_terrain_held_out_pixels_are_never_trained_on():
    data = terrain_data()
    train, held_out = set(data.train.tolist()), set(data.held_out.tolist())
    assert not train & held_out and len(train | held_out) == 344 * 403
    assert len(held_out) == 344 * 403 // 10 and EVAL_PIXELS <= len(held_out)
    assert float(data.elevation[data.train].mean()) == pytest.approx(0, abs=1e-4)
    seen = set()
    for x, _ in take(load_task("terrain", shards="iid"), 0, 4, 50):
        seen |= set(pixel(x).tolist())
    assert seen <= train and len(seen) > 3000


@pytest.mark.parametrize("name,start,after", [("codeclass", math.log(10), 2.25), ("terrain", 1.0, 0.9)])
def test_a_few_steps_lower_the_held_out_loss(name, start, after):
    task = load_task(name)
    model = task.make_model(0)
    opt = task.make_inner(model, task.default_lr)
    data = task.batches(0, 1, 0)
    before = task.evaluate(model)
    for _ in range(40):
        opt.zero_grad()
        task.loss(model, next(data)).backward()
        opt.step()
    assert before == pytest.approx(start, abs=0.05)  # chance level: uniform over 10 classes / the target's variance
    assert task.evaluate(model) < after  # measured: codeclass 2.306 -> 2.215, terrain 1.011 -> 0.824


def test_missing_data_is_a_task_error(monkeypatch):
    from matplotlib import cbook

    from lowcomm.tasks import codeclass, terrain
    monkeypatch.setattr(cbook, "get_sample_data", lambda *args, **kwargs: "/nonexistent/jacksboro_fault_dem.npz")
    with pytest.raises(TaskError, match="matplotlib's sample data"):
        terrain.sample_path()
    monkeypatch.setattr(codeclass, "stdlib_files", lambda: [])
    with pytest.raises(TaskError, match="needs at least 2"):
        codeclass.dataset.__wrapped__()  # uncached: the real data set stays cached for the other tests
