"""mae-scale: masked-image-modeling pretraining of Vision Transformers on DeepSpeed ZeRO.

MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377.
"""

__version__ = "0.1.0"
