"""Continual language learning (CLL-CLIP): languages arrive one after another.

`babelcap train --method continual --languages pt,es,de,hi` runs one stage per language, each
starting from the previous stage's model:

1. train a sentencepiece vocabulary on the language's captions in the shards and add the pieces
   the tokenizer lacks to its unigram vocabulary (the HF tokenizer then produces them, and the
   saved tokenizer reloads with them);
2. grow the token-embedding matrix (old rows kept); new rows from N(mean, std) of the existing
   rows (TEIR) or N(0, initializer_range) (plain);
3. train ONLY the token embeddings (everything else stays bit-identical) with
   mse_weight * MSE(student(target caption), teacher(parallel English caption))
   + clip_weight * InfoNCE(student text, teacher image embeddings), the teacher being the frozen
   model before the first stage;
4. TEIR: each embedding row's gradient and update (weight decay included) is scaled by
   1[token occurs in this language] / (1 + number of earlier languages that used it); special
   tokens never change;
5. evaluate every language (the accuracy matrix), then save the grown tokenizer + weights as an
   open_clip folder the next stage (and `babelcap eval`) loads.

At the end: `accuracy.csv`, `accuracy.png` (heatmap), `continual.json` (AA, F, F_en, per stage).

One module per job:

    vocabulary.py        sentencepiece training on a language's captions, tokenizer extension,
                         which token ids a language uses (steps 1 and 4)
    token_embeddings.py  growing the embedding matrix (TEIR / plain init), freezing all but the
                         embeddings, the per-row scale and the optimizer hook that applies it
    method.py            the options and the method of one stage (parameters + loss)
    driver.py            the stages in order, resume, per-stage evaluation, the report

The metrics (AA, F, F_en) are `training.cl_metrics`, the heatmap `training.plots`. The method
modules import nothing of the driver or the trainer; `training.runs` knows both by name.
"""
