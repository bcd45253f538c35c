"""Training data: the shapes generator + analyser, image folders, and deterministic resumable loaders.

Datasets share one item contract: `ds[i] -> (uint8 HxWx3 image, caption, attrs dict)`.
`loader` imports torch; the rest needs only numpy and PIL.
"""
from training.data.analyser import analyse, score
from training.data.folder import ImageFolderDataset
from training.data.shapes import HOLDOUT, ShapesDataset, holdout_prompts

__all__ = ["ShapesDataset", "HOLDOUT", "holdout_prompts", "ImageFolderDataset", "analyse", "score"]
