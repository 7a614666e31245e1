"""The model layer: CLIP through open_clip's factory, shared by the pipelines and the trainer."""
