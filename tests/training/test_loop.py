"""The one training loop: a deterministic order, and learning on real data."""
from repnet.training.loop import EpochSampler


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = list(EpochSampler(50, seed=1, epoch=3))
    assert a == list(EpochSampler(50, seed=1, epoch=3))
    assert a != list(EpochSampler(50, seed=1, epoch=4)) and a != list(EpochSampler(50, seed=2, epoch=3))
    assert sorted(i for i, _ in a) == list(range(50))
    assert list(EpochSampler(50, 1, 3, start=16, limit=40)) == a[16:40]
