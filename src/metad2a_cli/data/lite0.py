"""EfficientNet-Lite0's fixed facts, in a module without torch.

The encoder names features by them without loading the network, and the network checks
its weights file against them; both import them from here, so neither imports the other
at module level.
"""

ARCH = "efficientnet_lite0"
FEATURE_DIM = 1280
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
