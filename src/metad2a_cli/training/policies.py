"""The augmentation policies by name, and the default peak learning rate, without torch
(the CLI lists them; ``augment`` implements the policies)."""

from ..errors import UserError

# name -> what it does to each training image
AUGMENT_POLICIES = {
    "none": "nothing",
    "crop": "a random crop of the zero-padded image (pad S/8)",
    "crop-flip": "the crop, then a horizontal mirror half the time (NAS-Bench-201's recipe)",
    "trivialaugment": "the crop, then one TrivialAugmentWide op (torchvision's) at a random magnitude",
}
# The best of the four on gtsrb, fashion_mnist and sklearn_digits subsets at 10 epochs, within
# noise of crop on two of them; a mirror cost most on digits (docs/fit.md, "Augmentation").
DEFAULT_AUGMENT = "none"
# What fits and databases recorded before the policy had a name trained with.
LEGACY_AUGMENT = "crop-flip"
# Fit's default peak learning rate (NAS-Bench-201's), and every database label's before a
# schedule recorded its rate.
DEFAULT_LR = 0.1


def check_policy(name: str) -> None:
    if name not in AUGMENT_POLICIES:
        raise UserError(f"--augment {name!r} is not a policy; choose one of {', '.join(AUGMENT_POLICIES)}")
