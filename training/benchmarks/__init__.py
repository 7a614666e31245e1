"""Readers for the public image-text benchmarks, each for the files as their publishers
distribute them, registered under the entry-point group ``babelcap.eval_datasets``:

========== ================================================================================
kind       layout (``babelcap eval --dataset KIND:PATH[,split][,key=value]``)
========== ================================================================================
xm3600     Crossmodal-3600: ``PATH/captions.jsonl`` (one line per image: ``image/key`` and per
           language ``{"caption": [...]}``) and ``PATH/images/<key>.jpg``
xtd10      XTD10: ``test_image_names.txt`` and ``test_1kcaptions_<lang>.txt`` (line i captions
           image i; de/fr under ``MIC/``, ja as ``jp`` under ``STAIR/`` as the repository has
           them) and the COCO images (``images=DIR``: a COCO root with ``train2014/`` and
           ``val2014/``, the names say which, or one flat folder; default ``PATH/images``)
multi30k   Multi30K task 1: ``data/task1/raw/<split>.<lang>[.gz]`` and
           ``data/task1/image_splits/<split>.txt`` and the images (``images=DIR``: Flickr30k's,
           the 2017/2018 Flickr test images' own download, or a COCO root for
           ``test_2017_mscoco``, whose ``name.jpg#id`` lines lose the ``#id``)
karpathy   Karpathy-style JSON (``dataset_flickr30k.json``, ``dataset_coco.json``):
           ``images[].filename/filepath/split/sentences[].raw``, with translated captions as
           shipped (``<lang>=FILE`` or next to the JSON: a Karpathy copy, COCO annotations JSON,
           Flickr30k ``.token``/TSV, CLIP_benchmark's ``flickr30k_<split>_<lang>.txt``);
           images under ``images=DIR`` (default: the JSON's folder)
manifest   a plain manifest: image path + caption + language per row (JSONL, CSV or Parquet),
           optional split column; image paths relative to the manifest (or ``images=DIR``)
========== ================================================================================

Every reader takes ``languages=None`` for every language the dataset has, and returns
`babelcap.training.eval_data.EvalData` with image *paths* (decoded batch by
batch when encoded, so 3,600 images never sit decoded in memory), each image once, captions per
language with their image's index, and the sha256 of each image file (its ``image_id``).
"""
