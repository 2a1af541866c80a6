import pytest
import torch
from torchvision.transforms.v2 import TrivialAugmentWide

from metad2a_cli.errors import UserError
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.augment import NUM_BINS, OPS, TrivialAugment, make_policy
from metad2a_cli.training.policies import AUGMENT_POLICIES, DEFAULT_AUGMENT, LEGACY_AUGMENT
from metad2a_cli.training.recipe import EpochPlan
from metad2a_cli.training.schedule import LabelSchedule
from metad2a_cli.training.trainer import FitSettings

SIZE = 16


def images(n=12, seed=0):
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def augmented(name, seed, epoch, x):
    policy = make_policy(name, SIZE)
    plan = EpochPlan.draw(seed, epoch, len(x), policy)
    order, *params = plan.batch(0, len(x))
    return order, policy.apply(x[order], *params)


@pytest.mark.parametrize("name", list(AUGMENT_POLICIES))
def test_each_policy_keeps_shapes_and_repeats_under_a_seed(name):
    x = images()
    order, out = augmented(name, 3, 1, x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    again_order, again = augmented(name, 3, 1, x)
    assert torch.equal(order, again_order) and torch.equal(out, again)
    other_order, other = augmented(name, 3, 2, x)
    by_image, other_by_image = out[order.argsort()], other[other_order.argsort()]
    if name == "none":
        assert torch.equal(by_image, x) and torch.equal(other_by_image, x)
    else:
        assert not torch.equal(by_image, x) and not torch.equal(by_image, other_by_image)  # each epoch its own draws


def test_a_batch_is_the_same_slice_of_the_epoch_whatever_the_batch_size():
    x = images(10)
    policy = make_policy("trivialaugment", SIZE)
    plan = EpochPlan.draw(0, 0, len(x), policy)
    whole = policy.apply(x[plan.order], *plan.batch(0, 10)[1:])
    order, *params = plan.batch(4, 7)
    assert torch.equal(policy.apply(x[order], *params), whole[4:7])


def test_trivialaugment_draws_an_op_per_image():
    policy = make_policy("trivialaugment", SIZE)
    _, op, *_ = policy.draw(torch.Generator().manual_seed(0), 200)
    assert op.unique().numel() == len(OPS)  # not one op per batch, as torchvision's transform draws


@pytest.mark.parametrize("op", OPS)
def test_each_trivialaugment_op_is_torchvisions(op):
    """Batched with per-image magnitudes, each op gives what torchvision's gives image by image."""
    policy = TrivialAugment(SIZE)
    reference = TrivialAugmentWide()
    x = images(3)
    x[1] = x[1] // 4 + 60  # low contrast
    x[2] = 7  # flat
    i = OPS.index(op)
    signs = (1, -1) if policy.signed[i] else (1,)
    magnitudes = [float(policy.table[i, b]) * s for b in (0, 5, 15, 20, NUM_BINS - 1) for s in signs]
    for m in magnitudes:
        params = policy.parameters(torch.full((3,), i), torch.full((3,), m, dtype=torch.float64))
        ours = policy.apply_ops(x, *params)
        theirs = torch.stack([
            reference._apply_image_or_video_transform(im, op, m, reference.interpolation, reference._fill) for im in x
        ])
        diff = (ours.int() - theirs.int()).abs()
        if op in ("Color", "Sharpness"):  # float rounding of a blend may truncate one level lower
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, (op, m)
        else:
            assert torch.equal(ours, theirs), (op, m)


def test_unknown_policy_is_a_user_error():
    with pytest.raises(UserError, match="--augment 'flip' is not a policy; choose one of none, crop"):
        FitSettings(cell=str(Cell((3,) * 6)), augment="flip").validate()


def test_records_from_before_the_policy_was_named_trained_with_crop_flip():
    assert FitSettings.from_record({"cell": "x"}).augment == LEGACY_AUGMENT == "crop-flip"
    assert FitSettings.from_record({"cell": "x", "augment": "none"}).augment == "none"
    assert LabelSchedule.from_dict({"epochs": 3}).augment == LEGACY_AUGMENT
    assert LabelSchedule.from_dict({"epochs": 3}).lr == 0.1 == FitSettings(cell="x").lr  # every label then trained at 0.1
    assert LabelSchedule().augment == FitSettings(cell="x").augment == DEFAULT_AUGMENT
    assert LabelSchedule().fit_settings(Cell((3,) * 6), 0).augment == DEFAULT_AUGMENT
