"""vggfast: the VGG networks (Simonyan & Zisserman, ICLR 2015) as fast fully-convolutional engines.

    import vggfast
    eng = vggfast.Engine("vgg16")                   # torchvision weights from the hub cache
    r = eng.classify("cat.jpg", scales=(256, 384, 512))
    print(r.top(5))
"""
from .configs import CONFIGS, make_spec
from .engine import Engine, Result
from .errors import VGGFastError
from .features import FeatureExtractor
from .nn import build_model
from .protocols import Ensemble
from .weights import load_weights

__version__ = "0.1.0"
__all__ = ["Engine", "Ensemble", "FeatureExtractor", "Result", "VGGFastError", "build_model",
           "load_weights", "make_spec", "CONFIGS", "__version__"]
