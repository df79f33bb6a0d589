"""Task heads on a (pretrained or fresh) encoder: linear probe, VQA answer classifier, retrieval.

Each head says which encoder outputs it reads (`want`) and turns them into (loss, metrics, scores);
models/finetuner.py puts one on an encoder. `HEADS` is the registry keyed by name.
"""

from models.heads.features import image_features, pair_features, pair_features_dim
from models.heads.probe import ProbeHead
from models.heads.retrieval import RetrievalHead
from models.heads.vqa import VQAHead

HEADS = {"probe": ProbeHead, "vqa": VQAHead, "retrieval": RetrievalHead}

__all__ = ["HEADS", "ProbeHead", "RetrievalHead", "VQAHead", "image_features", "pair_features", "pair_features_dim"]
