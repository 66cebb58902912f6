"""What a training loop imports: the MSG masks of a grown checkpoint, attached to a model with hooks.

    masks = grow.runtime.load_masks(folder)
    masks.attach(model)           # alpha = 0: the model computes what the source did
    ... optimizer.step(); masks.step()   # ramps alpha to 1, one growth at a time
    masks.detach()                # once masks.done: the plain model is the grown model
"""

from .masks import MASKS_FILE, Masks, load_masks

__all__ = ["MASKS_FILE", "Masks", "load_masks"]
