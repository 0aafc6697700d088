"""Data config for PC+ training and validation (ml_collections), consumed by `data_pipelines.make_pcplus`.

Every training config's `data` and `eval_data` blocks are this config, so any `--config.data.X` override works
with any training config.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'tfds' (prepared `phrasecut`), 'cached' (build_cache output), 'own' (annotations.jsonl folder) or
    # 'synthetic' (the synthetic shapes dataset, written and prepared on first use). In `eval_data`, '' means
    # the held-out part of the training source (PhraseCut `validation`, synthetic `validation`, 10 % of an own
    # folder's images).
    c.source = "tfds"
    c.data_dir = ""            # TFDS data_dir ('' = TFDS default ~/tensorflow_datasets; synthetic: a user cache dir)
    c.split = "train"          # TFDS split: train, validation, test, miniv
    c.cache_dir = ""           # for source='cached'
    c.own_data_dir = ""        # for source='own': folder with annotations.jsonl
    c.batch_size = 64          # the global batch (all hosts together) in training configs; per host in make_pcplus
    c.limit = 0                # use only the first N tasks of the source (0 = all)
    c.seed = 0
    c.negative_prob = 0.2      # q_neg of the paper / rd64-uni yaml
    c.templates = ()           # prompt templates, one drawn per sample ('{}' = the phrase); () = the paper's 9
                               # shuffle+ templates (clipseg_jax.prompts.TEMPLATES_SHUFFLE_PLUS)
    c.with_visual = True       # build visual supports (the original's `with_visual`); False = text prompts only
    c.visual_prompt_mode = "crop_blur_highlight352"
    c.support_render = "host"  # 'device': ship raw supports + masks, render in the step (prompts_jax)
    c.image_size = 352
    c.text_length = 77         # prompts are tokenized on the host to this many tokens (CLIP's context is 77)
    c.support_excludes_query = True   # False reproduces the original (support may be the query)
    c.min_crop_fg = 0.05
    c.crop_iterations = 50
    c.workers = 0              # > 0: build batches in this many processes (no shared GIL) instead of tf.data threads
    # source='synthetic': images per split and their size range (data_pipelines.synthetic.generate); shapes
    # apart with exact masks, all in colour (overlap=True, grayscale_every=7: PhraseCut-like uncorrected occlusion)
    c.synthetic = ml_collections.ConfigDict(dict(train_images=1500, val_images=150, min_size=96, max_size=160,
                                                 seed=0, overlap=False, grayscale_every=0))
    return c
