"""Encoders of the families, one module per family; models/families.py says which builds which.

    single       SingleStreamEncoder   (single_stream.py)  VisualBERT, UNITER, ViLT, Oscar, UNIMO, ...
    interaction  InteractionEncoder    (single_stream.py)  InterBERT
    coattention  CoAttentionEncoder    (co_attention.py)   ViLBERT
    cross        CrossModalityEncoder  (cross.py)          LXMERT
    dual         DualEncoder           (clip.py)           CLIP
    dvae         DVAEEncoder           (dvae.py)           DALL-E stage 1 (discrete VAE)
    dalle        DalleDecoder          (dalle.py)          DALL-E stage 2 (causal decoder)

Every encoder is built as `cls(model_cfg, blocks, moe_cfg, text_spec, image_spec, needs)`; `needs`
(the union of the objectives' `requires`) lets it leave out parts no loss reaches. The output
contract is in base.py.
"""

from models.encoders.base import Encoder, EncoderOutputs
from models.encoders.clip import DualEncoder
from models.encoders.co_attention import CoAttentionEncoder
from models.encoders.cross import CrossModalityEncoder
from models.encoders.dalle import DalleDecoder
from models.encoders.dvae import DVAEEncoder
from models.encoders.single_stream import InteractionEncoder, SingleStreamEncoder

__all__ = [
    "CoAttentionEncoder",
    "CrossModalityEncoder",
    "DVAEEncoder",
    "DalleDecoder",
    "DualEncoder",
    "Encoder",
    "EncoderOutputs",
    "InteractionEncoder",
    "SingleStreamEncoder",
]
